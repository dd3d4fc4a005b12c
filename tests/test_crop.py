"""`crop` is exact: it puts a layer back as if the removed tokens had never arrived, even when they made the window
demote tokens to the 2-bit body (those come back from the undo ring). transformers reads `is_croppable` as that
promise and runs assisted decoding on it."""

import pytest
import torch
from conftest import tiny_model

from oscar_hf import OscarQuantizedCache
from oscar_hf.layer import OscarQuantizedLayer

HEADS, DIM = 2, 32


def _layer(static: bool, sink=3, recent=6, block=4) -> OscarQuantizedLayer:
    # No rotation: a float32 rotation of a long chunk may round a row differently from the same row in a short chunk,
    # and this compares storage, bit for bit, across chunkings.
    return OscarQuantizedLayer(None, None, 0.96, 0.92, sink_tokens=sink, recent_tokens=recent, demote_block=block,
                               max_cache_len=400 if static else None, layer_idx=0)


def _state(layer: OscarQuantizedLayer):
    """Everything a later forward can read: the lengths and every held row (the body as its codes and grids)."""
    sink, body, recent = layer.lengths[:3].tolist()
    (k, v) = layer.body_rows()
    rows = [layer.sink_keys[:, :, :sink], layer.sink_values[:, :, :sink], layer.recent_keys[:, :, :recent],
            layer.recent_values[:, :, :recent], k.codes, k.scale, k.offset, v.codes, v.scale, v.offset]
    return (sink, body, recent), rows


def _assert_same(a: OscarQuantizedLayer, b: OscarQuantizedLayer):
    (la, ra), (lb, rb) = _state(a), _state(b)
    assert la == lb
    for x, y in zip(ra, rb):
        assert torch.equal(x, y)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_crop_after_demotions_equals_appending_only_the_kept_tokens(static):
    """Random chunks (single tokens as decoding, short runs as verification forwards, a long prompt) and random crops
    of up to the recent window: after every crop the layer equals one fed only the kept tokens, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    total = 300
    keys = torch.randn(1, HEADS, total, DIM, generator=gen).bfloat16()
    values = torch.randn(1, HEADS, total, DIM, generator=gen).bfloat16()
    layer, length, crops_into_demotions = _layer(static), 0, 0
    layer.update(keys[:, :, :37], values[:, :, :37])
    length = 37
    while length < total - 10:
        n = int(torch.randint(1, 6, (1,), generator=gen))
        layer.update(keys[:, :, length : length + n], values[:, :, length : length + n])
        length += n
        if torch.rand(1, generator=gen) < 0.5:
            body = layer.body_len
            removed = int(torch.randint(1, n + 3, (1,), generator=gen))
            layer.crop(-removed)
            length -= removed
            crops_into_demotions += layer.body_len < body
            fresh = _layer(static)
            fresh.update(keys[:, :, :length], values[:, :, :length])
            _assert_same(layer, fresh)
    assert crops_into_demotions >= 5  # the case the undo ring is for


def test_deep_crop_keeps_what_the_ring_holds_and_warns(caplog):
    """Deeper than the ring (max(recent, 64) + block rows): the tokens it no longer holds stay 2-bit, with a warning;
    the lengths stay consistent and the layer keeps working."""
    layer = _layer(False, sink=2, recent=4, block=2)
    gen = torch.Generator().manual_seed(2)
    layer.update(torch.randn(1, HEADS, 200, DIM, generator=gen).bfloat16(),
                 torch.randn(1, HEADS, 200, DIM, generator=gen).bfloat16())
    body, recent = layer.body_len, layer.recent_len
    assert (body, recent, layer.undo_capacity) == (194, 4, 66)
    layer.crop(-66)  # 132 kept past the sink: body 128, and the ring (positions 128..193) gives back 128..131
    assert "stay 2-bit" not in caplog.text and (layer.body_len, layer.recent_len) == (128, 4)
    layer.update(torch.randn(1, HEADS, 2, DIM).bfloat16(), torch.randn(1, HEADS, 2, DIM).bfloat16())
    assert (layer.body_len, layer.recent_len) == (130, 4)
    layer.crop(-70)  # 64 kept past the sink: body 60 and 4 exact, but the ring starts at position 130 - 66 = 64
    assert "4 demoted tokens stay 2-bit" in caplog.text
    assert (layer.sink_len, layer.body_len, layer.recent_len) == (2, 64, 0)


@torch.no_grad()
def test_verification_forward_then_crop_continues_like_greedy():
    """The issue's case: a verification forward of 4 tokens that makes the window demote, `crop(-4)`, then the next
    token: the logits equal a cache that never saw the 4 tokens."""
    model = tiny_model("qwen3")
    ids = torch.randint(3, 128, (1, 80))
    windows = dict(method="hadamard", sink_tokens=4, recent_tokens=16, demote_block=8)
    a, b = OscarQuantizedCache(model.config, **windows), OscarQuantizedCache(model.config, **windows)
    model(input_ids=ids[:, :43], past_key_values=a)
    model(input_ids=ids[:, :43], past_key_values=b)
    body = a.layers[0].body_len
    model(input_ids=ids[:, 43:47], past_key_values=a)
    assert a.layers[0].body_len > body  # the verification forward demoted a block
    a.crop(-4)
    assert a.layers[0].body_len == body
    la = model(input_ids=ids[:, 47:48], past_key_values=a).logits
    lb = model(input_ids=ids[:, 47:48], past_key_values=b).logits
    assert torch.equal(la, lb)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("family", ["qwen3", "llama", "mistral"])
@torch.no_grad()
def test_assisted_decoding_gives_greedy_tokens_across_demotions(family, static):
    """The issue's symptom: with 4 assistant tokens and windows that demote every few tokens, assisted decoding must
    give the tokens of plain greedy decoding. Needs both halves: exact crops, and verification forwards whose queries
    each see the body they would see decoding token by token (`OscarSegments.query_body_lengths`)."""
    model = tiny_model(family)
    assistant = tiny_model("llama", attn_implementation="eager", seed=1, layers=1)
    assistant.generation_config.num_assistant_tokens = 4
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assistant.generation_config.assistant_confidence_threshold = 0.0
    windows = dict(method="hadamard", sink_tokens=4, recent_tokens=8, demote_block=4)
    if static:
        windows["max_cache_len"] = 128
    greedy = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, disable_compile=True)
    for seed in range(2):
        ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(seed))
        cache = OscarQuantizedCache(model.config, **windows)
        expected = model.generate(ids, past_key_values=cache, **greedy)
        assert cache.layers[0].body_len > 40
        got = model.generate(ids, past_key_values=OscarQuantizedCache(model.config, **windows), **greedy,
                             assistant_model=assistant)
        assert torch.equal(got, expected)
