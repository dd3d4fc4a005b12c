"""Needle retrieval mechanics: case construction, scoring, and chunked feeding through exact and 2-bit caches."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CALIBRATION_SPLIT, tiny_model
from transformers import DynamicCache

from oscar_hf import OscarQuantizedCache
from oscar_hf.evaluation.retrieval import build_cases, feed_chunks, is_exact_match, run_retrieval


class CharTokenizer:
    """One token per ASCII character (ids 1..127), id 0 separates documents: enough tokenizer for the mechanics."""

    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def code_tokens(num_docs=3, lines=400) -> np.ndarray:
    """Python-like text (functions with indented bodies) as character ids, documents separated by id 0."""
    docs = []
    for d in range(num_docs):
        text = "".join(
            f"def f{d}_{i}(x):\n    y = x + {i}\n    return y * {d}\n\n" for i in range(lines // 4)
        )
        docs.append([ord(c) for c in text])
    out = []
    for doc in docs:
        out.extend(doc + [0])
    return np.array(out, dtype=np.uint16)


class InductionModel(torch.nn.Module):
    """A stand-in language model that retrieves perfectly: it predicts the token that followed the latest earlier
    occurrence of the last `match` tokens (an ideal induction head). `shift` makes it copy from the wrong offset."""

    def __init__(self, vocab=128, match=6, shift=0):
        super().__init__()
        self.vocab, self.match, self.shift = vocab, match, shift
        self.device = torch.device("cpu")

    def forward(self, input_ids, past_key_values=None, **kwargs):
        history = past_key_values.__dict__.setdefault("history", [])  # the "cache" is a namespace per case
        history.extend(input_ids[0].tolist())
        target = 0
        tail = history[-self.match :]
        for pos in range(len(history) - self.match - 1, -1, -1):
            if history[pos : pos + self.match] == tail:
                target = history[min(pos + self.match + self.shift, len(history) - 1)]
                break
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[0, -1, target] = 1.0
        return type("Out", (), {"logits": logits})()


def test_cases_plant_the_needle_once_at_spread_depths_and_end_with_the_query():
    tok = CharTokenizer()
    cases = build_cases(tok, code_tokens(), 6, context_tokens=600, depth_range=(0.1, 0.7), seed=3)
    assert len(cases) == 6
    depths = [c.depth for c in cases]
    assert depths == sorted(depths) and 0.08 < depths[0] and depths[-1] < 0.75
    for case in cases:
        text = tok.decode(case.input_ids)
        needle = tok.decode(case.input_ids[case.needle_index : case.needle_index + case.needle_tokens])
        assert needle.strip() == f'{case.key} = "{case.value}"'
        assert text.count(case.value) == 1
        assert text.endswith(f'{case.key} = "')
        assert abs(len(case.input_ids) - 600) <= 20
        assert 0 not in case.input_ids  # a haystack never spans two documents
    again = build_cases(tok, code_tokens(), 6, context_tokens=600, depth_range=(0.1, 0.7), seed=3)
    assert [c.input_ids for c in again] == [c.input_ids for c in cases]


def test_too_few_tokens_for_a_case_is_an_error_with_the_way_out():
    with pytest.raises(ValueError, match="shorter --retrieval-context"):
        build_cases(CharTokenizer(), code_tokens(lines=40), 2, context_tokens=3000)


@pytest.mark.parametrize(
    "continuation, correct",
    [('c41d07be"\n', True), ('c41d07be")', True), ("c41d07be", False), ('c41d07bef"', False), ('c41d07b"', False)],
)
def test_exact_match_needs_the_whole_value_and_the_closing_quote(continuation, correct):
    assert is_exact_match(continuation, "c41d07be") is correct


def test_a_perfect_retriever_scores_one_and_a_misaligned_one_zero():
    tok = CharTokenizer()
    cases = build_cases(tok, code_tokens(), 4, context_tokens=500, seed=1)
    perfect = run_retrieval(InductionModel(), tok, cases, SimpleNamespace, chunk_tokens=128, max_new_tokens=10)
    assert perfect["exact_match"] == 1.0 and perfect["correct"] == 4
    assert all(a["continuation"].startswith(a["value"] + '"') for a in perfect["answers"])
    shifted = run_retrieval(InductionModel(shift=1), tok, cases, SimpleNamespace, chunk_tokens=128, max_new_tokens=10)
    assert shifted["exact_match"] == 0.0


def test_chunked_feeding_through_an_exact_cache_equals_one_forward():
    model = tiny_model("qwen3", attn_implementation="sdpa").float()
    ids = torch.randint(3, 128, (1, 300))
    whole = feed_chunks(model, ids, DynamicCache(config=model.config), None)
    chunked = feed_chunks(model, ids, DynamicCache(config=model.config), 64)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)


def test_only_chunked_feeding_makes_the_query_read_the_2bit_history():
    model = tiny_model("qwen3").float()
    ids = torch.randint(3, 128, (1, 300))
    exact = feed_chunks(model, ids, DynamicCache(config=model.config), None)

    def cache():
        return OscarQuantizedCache(model.config, method="naive", sink_tokens=4, recent_tokens=8, demote_block=8)

    one_forward = cache()
    torch.testing.assert_close(feed_chunks(model, ids, one_forward, None), exact, rtol=1e-4, atol=1e-4)
    chunked = cache()
    out = feed_chunks(model, ids, chunked, 64)
    assert all(layer.body_len > 0 for layer in chunked.quantized_layers())
    assert (out - exact).abs().max() > 1e-3


@pytest.mark.slow
def test_reference_model_can_do_the_retrieval_task_with_an_exact_cache(ref_model_path):
    """The task must be within the model's reach before quantized caches are scored on it: the 25M-parameter code
    model finds about half of the needles (12/24 measured in float32 with oscar-eval), so fewer than 8 of these 24 cases
    (about a minute on an idle 2-core CPU) mean the task or its construction broke."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref_model_path)
    model = AutoModelForCausalLM.from_pretrained(ref_model_path, dtype=torch.float32, attn_implementation="oscar")
    tokens = np.load(ref_model_path / "heldout_tokens.npy", mmap_mode="r")[CALIBRATION_SPLIT:]
    cases = build_cases(tokenizer, tokens, 24, context_tokens=3072)
    assert min(len(c.input_ids) for c in cases) >= 3000
    exact = run_retrieval(model.eval(), tokenizer, cases, chunk_tokens=512)
    print(f"exact cache: {exact['correct']}/24 needles retrieved")
    assert exact["correct"] >= 8
