"""generate() beyond plain decoding: assisted and prompt-lookup decoding (crop, multi-token steps), beams, a cache
reused across chat turns, batch expansion and selection, and left-padded batches.

Each mode runs twice: with windows covering the whole sequence, where it must give DynamicCache's tokens, and with
windows small enough to quantize, where it must give the tokens of the same mode run on `FakeQuantCache` (the oracle,
eager attention; see `fake_quant.py`).
"""

import pytest
import torch
from conftest import tiny_model
from fake_quant import FakeQuantCache
from transformers import DynamicCache

from oscar_hf import OscarQuantizedCache, OscarRotations

COVERING = dict(sink_tokens=8, recent_tokens=128)
SMALL = dict(sink_tokens=4, recent_tokens=8, demote_block=4)
# A recent window shorter than the candidate runs, so that rejected candidates are cropped out of the 2-bit body.
TINY_RECENT = dict(sink_tokens=4, recent_tokens=2, demote_block=2)
# The same windows in a static cache (`max_cache_len`): short chunks take the `oscar_hf::append` op, beams reorder in
# place, crops move the device-side lengths.
TINY_RECENT_STATIC = dict(TINY_RECENT, max_cache_len=128)
SMALL_STATIC = dict(SMALL, max_cache_len=128)


def models(family="llama"):
    """The model under test ("oscar" attention) and the same weights with eager attention for the references."""
    return tiny_model(family, attn_implementation="oscar"), tiny_model(family, attn_implementation="eager")


def caches(model, reference, windows):
    """(cache under test, its reference): DynamicCache for covering windows, the oracle for quantizing ones."""
    rotations = OscarRotations.data_free("hadamard", model.config.num_hidden_layers, 2, model.config.head_dim)
    cache = OscarQuantizedCache(model.config, rotations=rotations, **windows)
    if windows["recent_tokens"] >= 128:
        return cache, DynamicCache(config=reference.config)
    oracle_windows = {k: v for k, v in windows.items() if k != "max_cache_len"}
    return cache, FakeQuantCache(reference.config, rotations, **oracle_windows)


def quantized(cache):
    return max(layer.body_len for layer in cache.quantized_layers()) > 0


GREEDY = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)


@pytest.mark.parametrize("windows", [COVERING, TINY_RECENT, TINY_RECENT_STATIC],
                         ids=["covering", "quantized", "quantized-static"])
@pytest.mark.parametrize("mode", ["assistant", "prompt_lookup", "beam"])
@torch.no_grad()
def test_speculative_and_beam_decoding_give_the_reference_tokens(windows, mode):
    model, reference = models()
    if mode == "assistant":
        assistant = tiny_model("llama", attn_implementation="eager", seed=1, layers=1)
        # Always five candidates, so that rejections crop more tokens than the recent window holds.
        assistant.generation_config.num_assistant_tokens = 5
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assistant.generation_config.assistant_confidence_threshold = 0.0
        kwargs = dict(assistant_model=assistant)
        ids = torch.randint(3, 128, (1, 30))
    elif mode == "prompt_lookup":
        # A repetitive prompt, so that the lookup proposes multi-token candidates that are partly rejected.
        kwargs = dict(prompt_lookup_num_tokens=4)
        ids = torch.randint(3, 128, (1, 6)).repeat(1, 5)
    else:
        kwargs = dict(num_beams=3)
        ids = torch.randint(3, 128, (2, 30))
    cache, ref_cache = caches(model, reference, windows)
    length = dict(max_new_tokens=12, min_new_tokens=12) if mode == "assistant" else {}
    # Speculative decoding over quantizing windows must give greedy decoding's tokens: the oracle decodes token by
    # token, so each step sees the body the windows give it (the verification forwards' per-query view).
    ref_kwargs = {} if mode != "beam" and windows is not COVERING else kwargs
    expected = reference.generate(ids, past_key_values=ref_cache, **{**GREEDY, **length}, **ref_kwargs)
    got = model.generate(ids, past_key_values=cache, **{**GREEDY, **length}, **kwargs)
    assert torch.equal(got, expected)
    assert quantized(cache) == (windows is not COVERING)
    assert cache.get_seq_length() == ref_cache.get_seq_length()


@pytest.mark.parametrize("windows", [COVERING, SMALL], ids=["covering", "quantized"])
@torch.no_grad()
def test_one_cache_reused_across_chat_turns_gives_the_reference_tokens(windows):
    model, reference = models("qwen3")
    cache, ref_cache = caches(model, reference, windows)
    history = {id(cache): torch.randint(3, 128, (1, 20)), id(ref_cache): None}
    history[id(ref_cache)] = history[id(cache)].clone()
    for turn in range(3):
        # The next user message, appended to everything said so far; longer than 64 tokens, so that its forward is a
        # prefill chunk (its tokens attend to each other exactly, as the oracle's do; shorter forwards attend as
        # token-by-token decoding would, which test_crop.py checks against greedy decoding).
        user = torch.randint(3, 128, (1, 70))
        for m, c in ((model, cache), (reference, ref_cache)):
            prompt = history[id(c)] if turn == 0 else torch.cat([history[id(c)], user], dim=1)
            history[id(c)] = m.generate(
                prompt, past_key_values=c, max_new_tokens=12, min_new_tokens=12, do_sample=False
            )
        assert torch.equal(history[id(cache)], history[id(ref_cache)])
        # The cache holds all but the last generated token, which the next turn feeds first.
        assert cache.get_seq_length() == history[id(cache)].shape[1] - 1
    assert quantized(cache) == (windows is SMALL)


@pytest.mark.parametrize("windows", [COVERING, SMALL], ids=["covering", "quantized"])
@torch.no_grad()
def test_batch_repeat_interleave_and_select_follow_the_reference(windows):
    model, reference = models("qwen3")
    cache, ref_cache = caches(model, reference, windows)
    ids = torch.randint(3, 128, (2, 30))
    steps = torch.randint(3, 128, (4, 8))
    logits = []
    for m, c in ((model, cache), (reference, ref_cache)):
        out = [m(input_ids=ids, past_key_values=c).logits[:, -1:].repeat_interleave(2, dim=0)]
        c.batch_repeat_interleave(2)  # as a search that forks every sequence in two
        for t in range(5):
            out.append(m(input_ids=steps[:, t : t + 1], past_key_values=c).logits)
        c.batch_select_indices(torch.tensor([3, 0]))  # keep two of the four, in a new order
        for t in range(5, 8):
            out.append(torch.zeros_like(out[-1]).index_copy(0, torch.tensor([3, 0]), m(
                input_ids=steps[[3, 0], t : t + 1], past_key_values=c).logits))
        logits.append(torch.cat(out, dim=1))
    got, want = logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert quantized(cache) == (windows is SMALL)
    assert cache.layers[0].batch_size == 2


def left_padded(prompts, pad_id=0):
    width = max(p.shape[-1] for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[-1] :] = p
        mask[row, width - p.shape[-1] :] = 1
    return ids, mask


@torch.no_grad()
def test_left_padded_batch_matches_single_sequences_with_covering_windows():
    model = tiny_model("qwen3")
    prompts = [torch.randint(3, 128, (n,)) for n in (21, 13, 6)]
    ids, mask = left_padded(prompts)
    cache = OscarQuantizedCache(model.config, method="hadamard", **COVERING)
    batch = model.generate(ids, attention_mask=mask, past_key_values=cache, **GREEDY)[:, ids.shape[1] :]
    for row, prompt in enumerate(prompts):
        alone = model.generate(
            prompt[None], past_key_values=OscarQuantizedCache(model.config, method="hadamard", **COVERING), **GREEDY
        )[:, prompt.shape[-1] :]
        assert torch.equal(batch[row : row + 1], alone)


@pytest.mark.parametrize("windows", [SMALL, SMALL_STATIC], ids=["dynamic", "static"])
@torch.no_grad()
def test_left_padded_batch_with_quantization_follows_the_position_oracle(windows):
    """Windows count cache positions, pads included (see the README's known limits): a padded sequence keeps fewer of
    its own first tokens in the sink than it would alone. The oracle states exactly that; the tokens must match it."""
    model, reference = models("qwen3")
    prompts = [torch.randint(3, 128, (n,)) for n in (30, 22, 12)]
    ids, mask = left_padded(prompts)
    cache, oracle = caches(model, reference, windows)
    expected = reference.generate(ids, attention_mask=mask, past_key_values=oracle, **GREEDY)
    got = model.generate(ids, attention_mask=mask, past_key_values=cache, **GREEDY)
    assert torch.equal(got, expected) and quantized(cache)
