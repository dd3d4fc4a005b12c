"""`GraphDecoder` without a GPU: the graph-mode cache path (device-indexed appends, demotion between steps) must
decode exactly like the ordinary cache path. The capture itself is exercised on the GPU (benchmarks/bench_e2e.py)."""

import pytest
import torch

from conftest import tiny_model
from oscar_hf import OscarQuantizedCache
from oscar_hf.graphs import GraphDecoder


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_graph_mode_greedy_tokens_equal_generate(family):
    model = tiny_model(family)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    kw = dict(method="hadamard", sink_tokens=8, recent_tokens=16, demote_block=4, max_cache_len=120)
    # No EOS: generate() must run plain greedy for all 50 steps, as the decoder does.
    expected = model.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=OscarQuantizedCache(model.config, **kw), max_new_tokens=50, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )
    cache = OscarQuantizedCache(model.config, **kw)
    got = GraphDecoder(model, cache).generate(ids, 50)
    assert torch.equal(got, expected)
    layer = cache.layers[0]
    assert layer.body_len > 40  # decoding demoted tokens to the 2-bit body between steps
    assert layer.lengths.tolist() == [layer.sink_len, layer.body_len, layer.recent_len]


def test_graph_mode_chunked_prefill_matches_one_shot():
    model = tiny_model("qwen3")
    ids = torch.randint(0, model.config.vocab_size, (1, 60))
    kw = dict(method="hadamard", sink_tokens=8, recent_tokens=16, demote_block=4, max_cache_len=100)
    whole = GraphDecoder(model, OscarQuantizedCache(model.config, **kw)).generate(ids, 10)
    chunked = GraphDecoder(model, OscarQuantizedCache(model.config, **kw)).generate(ids, 10, chunk_size=60)
    assert torch.equal(whole, chunked)


def test_graph_mode_refuses_what_it_cannot_capture():
    model = tiny_model("qwen3")
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    with pytest.raises(ValueError, match="max_cache_len"):
        GraphDecoder(model, OscarQuantizedCache(model.config, method="hadamard", sink_tokens=8)).prefill(ids)
    with pytest.raises(ValueError, match="sink_tokens"):
        cache = OscarQuantizedCache(model.config, method="hadamard", sink_tokens=32, max_cache_len=64)
        GraphDecoder(model, cache).prefill(ids)
    full = OscarQuantizedCache(model.config, method="hadamard", sink_tokens=4, recent_tokens=4, demote_block=4,
                               max_cache_len=24)
    dec = GraphDecoder(model, full)
    logits = dec.prefill(ids)
    with pytest.raises(ValueError, match="full"):
        for _ in range(10):
            logits = dec.step(logits.argmax(-1, keepdim=True))
    sdpa = tiny_model("qwen3", attn_implementation="sdpa")
    with pytest.raises(ValueError, match='attn_implementation="oscar"'):
        GraphDecoder(sdpa, OscarQuantizedCache(sdpa.config, method="hadamard", max_cache_len=64))


def test_generate_prefill_chunk_size_feeds_the_prompt_through_the_cache():
    """`generate(prefill_chunk_size=...)` (transformers' chunked prefill): later chunks attend over the 2-bit history,
    as a manual chunk-by-chunk forward does."""
    model = tiny_model("qwen3")
    ids = torch.randint(3, model.config.vocab_size, (1, 100))
    kw = dict(method="hadamard", sink_tokens=8, recent_tokens=16, demote_block=4)
    cache = OscarQuantizedCache(model.config, **kw)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=1, do_sample=False, eos_token_id=None,
                         pad_token_id=0, prefill_chunk_size=32)
    manual = OscarQuantizedCache(model.config, **kw)
    with torch.no_grad():
        for start in range(0, 100, 32):
            logits = model(ids[:, start : start + 32], past_key_values=manual).logits[0, -1]
    assert out[0, 100].item() == logits.argmax().item()
    assert manual.layers[0].body_len > 0  # the prompt's middle was quantized before the last chunks attended to it
    one_shot = OscarQuantizedCache(model.config, **kw)
    with torch.no_grad():
        exact_logits = model(ids, past_key_values=one_shot).logits[0, -1]
    assert not torch.allclose(logits, exact_logits)  # chunks read the quantized history, not the exact prompt


def test_reset_leaves_graph_mode_so_the_cache_serves_a_new_prompt():
    model = tiny_model("qwen3")
    kw = dict(method="hadamard", sink_tokens=8, recent_tokens=16, demote_block=4, max_cache_len=100)
    ids = torch.randint(3, model.config.vocab_size, (1, 40))
    cache = OscarQuantizedCache(model.config, **kw)
    GraphDecoder(model, cache).generate(ids, 5)
    assert cache.layers[0].graph_mode
    cache.reset()
    assert not cache.layers[0].graph_mode
    with torch.no_grad():
        again = model(ids, past_key_values=cache).logits
        fresh = model(ids, past_key_values=OscarQuantizedCache(model.config, **kw)).logits
    assert torch.equal(again, fresh)
