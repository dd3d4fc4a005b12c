"""OscarQuantizedCache in transformers models: exactness with covering windows, mixed-segment attention, generate()."""

import warnings

import pytest
import torch
from conftest import tiny_model
from transformers import DynamicCache

from oscar_hf import OscarQuantizedCache, OscarRotations, cache_keyword
from oscar_hf.attention import segment_attention_reference
from oscar_hf.evaluation import decode_mode_run
from oscar_hf.layer import OscarQuantizedLayer, OscarSegments
from oscar_hf.quantization import dequantize_rows, hadamard_matrix

FAMILIES = ["qwen3", "llama"]


def step_logits(model, cache, ids, prefill, steps):
    """Prefill `ids[:, :prefill]`, then feed `steps` tokens one by one; the logits of every forward, concatenated."""
    out = [model(input_ids=ids[:, :prefill], past_key_values=cache).logits]
    for pos in range(prefill, prefill + steps):
        out.append(model(input_ids=ids[:, pos : pos + 1], past_key_values=cache).logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["oscar", "sdpa"])
@pytest.mark.parametrize("method", ["naive", "hadamard"])
@torch.no_grad()
def test_covering_windows_match_dynamic_cache(family, attn, method):
    model = tiny_model(family, attn_implementation=attn)
    ids = torch.randint(3, 128, (2, 60))
    exact = step_logits(model, DynamicCache(config=model.config), ids, 28, 32)
    cache = OscarQuantizedCache(model.config, method=method, sink_tokens=16, recent_tokens=64)
    got = step_logits(model, cache, ids, 28, 32)
    assert all(layer.body_len == 0 for layer in cache.layers)
    # float32 model: only the rotation's rounding separates the two
    torch.testing.assert_close(got, exact, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_covering_windows_match_dynamic_cache_in_bf16(family):
    model = tiny_model(family).to(torch.bfloat16)
    ids = torch.randint(3, 128, (1, 60))
    exact = step_logits(model, DynamicCache(config=model.config), ids, 28, 32).float()
    got = step_logits(model, OscarQuantizedCache(model.config, method="hadamard"), ids, 28, 32).float()
    # Stored rotated in bf16: one extra bf16 rounding per element, nothing more.
    assert (got - exact).abs().max() < 0.1
    assert (got.argmax(-1) == exact.argmax(-1)).float().mean() > 0.95


def fill_layer(layer, total, chunks=(37, 1, 1, 90, 1)):
    """Feed random states through `layer.update` in uneven chunks until it holds `total` tokens."""
    torch.manual_seed(1)
    fed = []
    while sum(x.shape[-2] for x in fed) < total:
        n = min(chunks[len(fed) % len(chunks)], total - sum(x.shape[-2] for x in fed))
        k = torch.randn(2, 2, n, 64) * 3
        v = torch.randn(2, 2, n, 64)
        layer.update(k, v, return_segments=True)
        fed.append(k)
    return fed


def hadamard_layer(**kw):
    h = hadamard_matrix(64, torch.float32).unsqueeze(0)
    return OscarQuantizedLayer(h, h, 0.96, 0.92, **kw)


def test_demotion_keeps_windows_and_quantizes_in_blocks():
    layer = hadamard_layer(sink_tokens=8, recent_tokens=20, demote_block=16)
    fill_layer(layer, 300)
    assert layer.sink_len == 8
    assert 20 <= layer.recent_len < 20 + 16
    assert layer.body_len == 300 - 8 - layer.recent_len
    assert layer.get_seq_length() == 300


def test_body_grows_geometrically_not_every_step():
    layer = hadamard_layer(sink_tokens=4, recent_tokens=8, demote_block=1)
    capacities = []
    for _ in range(300):
        layer.update(torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64), return_segments=True)
        capacities.append(layer.body_capacity)
    assert layer.body_len == 30_000 - 4 - 8
    # 300 demotions, but the capacity changes only a logarithmic number of times (1024-token pages, x1.5)
    assert len(set(capacities)) <= 10
    assert capacities[-1] < 1.5 * 30_000 + 1024


def test_max_cache_len_allocates_the_body_once():
    layer = hadamard_layer(sink_tokens=4, recent_tokens=8, max_cache_len=2000)
    layer.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))
    capacity = layer.body_capacity
    for _ in range(1900):
        layer.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64), return_segments=True)
    assert layer.body_capacity == capacity >= 2000 - 12


def naive_attention(q, k, v, scale):
    """softmax(q k^T * scale) v written out, [B, H, 1, D] query over [B, H, L, D] keys (no GQA)."""
    w = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    return w @ v


def test_mixed_segment_attention_equals_attention_over_dequantized_cache():
    layer = hadamard_layer(sink_tokens=8, recent_tokens=20, demote_block=16)
    fill_layer(layer, 203)
    k_new, v_new = torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64)
    keys_rot, values_rot = layer.rotate_states(k_new, v_new)
    layer.update(k_new, v_new, return_segments=True)
    segments = OscarSegments(layer, 1, keys_rot, values_rot)
    q = torch.randn(2, 2, 1, 64)

    # The dequantized cache, built here from the raw segment tensors and un-rotated back to the model's space.
    body_k, body_v = layer.body_rows()
    h = hadamard_matrix(64, torch.float32)
    k_all = torch.cat(
        [layer.sink_keys[:, :, :8], dequantize_rows(body_k), layer.recent_keys[:, :, : layer.recent_len]], 2
    )
    v_all = torch.cat(
        [layer.sink_values[:, :, :8], dequantize_rows(body_v), layer.recent_values[:, :, : layer.recent_len]], 2
    )
    expected = naive_attention(q, k_all @ h.T, v_all @ h.T, 0.125)

    got = segment_attention_reference(q, segments, None, 0.125)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # Per-segment partial softmaxes merged with log-sum-exp (what the split-K kernel does) give the same output.
    qr = q @ h
    partial = []
    for ks, vs in (
        (k_all[:, :, :8], v_all[:, :, :8]),
        (k_all[:, :, 8:-20], v_all[:, :, 8:-20]),
        (k_all[:, :, -20:], v_all[:, :, -20:]),
    ):
        s = (qr @ ks.transpose(-1, -2)) * 0.125
        lse = torch.logsumexp(s, -1, keepdim=True)
        partial.append((lse, torch.softmax(s, -1) @ vs))
    total = torch.logsumexp(torch.cat([p[0] for p in partial], -1), -1, keepdim=True)
    merged = sum(torch.exp(lse - total) * o for lse, o in partial) @ h.T
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_segment_path_and_dequantized_fallback_agree_on_a_multi_turn_prompt(family):
    ids = torch.randint(3, 128, (2, 190))
    results = []
    for attn in ("oscar", "sdpa"):
        model = tiny_model(family, attn_implementation=attn)
        cache = OscarQuantizedCache(model.config, method="hadamard", sink_tokens=8, recent_tokens=16, demote_block=8)
        model(input_ids=ids[:, :100], past_key_values=cache)
        for pos in range(100, 120):
            model(input_ids=ids[:, pos : pos + 1], past_key_values=cache)
        assert cache.layers[0].body_len > 0
        # A second turn: a 70-token prompt continuing the quantized history, longer than the recent window and than
        # the forwards that attend token by token (at most 64 tokens, "oscar" only: see test_crop.py).
        results.append(model(input_ids=ids[:, 120:190], past_key_values=cache).logits)
    torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_quantized_history_changes_the_output_but_stays_close():
    model = tiny_model("qwen3")
    ids = torch.randint(3, 128, (1, 200))
    exact = step_logits(model, DynamicCache(config=model.config), ids, 150, 20)
    cache = OscarQuantizedCache(model.config, method="hadamard", sink_tokens=4, recent_tokens=8, demote_block=4)
    got = step_logits(model, cache, ids, 150, 20)
    diff = (got[:, 150:] - exact[:, 150:]).abs().max()
    assert 0 < diff < 0.5 * exact.abs().max()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_sample=False),
        dict(do_sample=True, top_k=20, temperature=0.8),
        dict(do_sample=True, num_return_sequences=3),
        dict(num_beams=3, do_sample=False),
    ],
    ids=["greedy", "sampling", "sampling-3-sequences", "beam"],
)
@torch.no_grad()
def test_generate_modes_with_covering_windows_equal_dynamic_cache(kwargs):
    model = tiny_model("qwen3")
    ids = torch.randint(3, 128, (2, 12))
    torch.manual_seed(5)
    expected = model.generate(ids, max_new_tokens=24, min_new_tokens=24, **kwargs)
    torch.manual_seed(5)
    cache = OscarQuantizedCache(model.config, method="hadamard", sink_tokens=16, recent_tokens=64)
    got = model.generate(ids, past_key_values=cache, max_new_tokens=24, min_new_tokens=24, **kwargs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kwargs", [dict(do_sample=False), dict(num_beams=3, do_sample=False)], ids=["greedy", "beam"])
@torch.no_grad()
def test_generate_with_quantized_history_runs_and_quantizes(kwargs):
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 40))
    cache = OscarQuantizedCache(model.config, method="hadamard", sink_tokens=4, recent_tokens=8, demote_block=4)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=30, min_new_tokens=30, **kwargs)
    assert out.shape[1] == 70
    layer = cache.layers[0]
    assert layer.body_len > 0 and layer.get_seq_length() == 69


@torch.no_grad()
def test_generate_takes_the_cache_under_either_keyword_and_ours_warns_no_deprecation():
    """transformers 5.24 renamed `past_key_values` to `cache`: the old name must keep working, and our own calls (which
    pass `cache_keyword(model)`) must not trip the deprecation."""
    model = tiny_model("qwen3")
    ids = torch.randint(3, 128, (1, 40))
    windows = dict(method="hadamard", sink_tokens=4, recent_tokens=8, demote_block=4)
    legacy = OscarQuantizedCache(model.config, **windows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        expected = model.generate(ids, past_key_values=legacy, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    current = OscarQuantizedCache(model.config, **windows)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        got = model.generate(
            ids, **{cache_keyword(model): current}, max_new_tokens=12, min_new_tokens=12, do_sample=False
        )
        run = decode_mode_run(model, ids[0], 30, cache=OscarQuantizedCache(model.config, **windows))
    assert torch.equal(got, expected) and current.layers[0].body_len > 0
    assert run.cache.layers[0].body_len > 0 and run.logprobs.shape[0] == 10


@torch.no_grad()
def test_crop_then_continue_equals_never_having_seen_the_cropped_tokens():
    model = tiny_model("qwen3")
    ids = torch.randint(3, 128, (1, 80))
    a = OscarQuantizedCache(model.config, method="hadamard", sink_tokens=4, recent_tokens=16, demote_block=16)
    model(input_ids=ids[:, :60], past_key_values=a)
    model(input_ids=ids[:, 60:65], past_key_values=a)
    body_before = a.layers[0].body_len
    a.crop(-5)
    assert a.get_seq_length() == 60 and a.layers[0].body_len == body_before > 0
    b = OscarQuantizedCache(model.config, method="hadamard", sink_tokens=4, recent_tokens=16, demote_block=16)
    model(input_ids=ids[:, :60], past_key_values=b)
    la = model(input_ids=ids[:, 60:61], past_key_values=a).logits
    lb = model(input_ids=ids[:, 60:61], past_key_values=b).logits
    torch.testing.assert_close(la, lb)


@torch.no_grad()
def test_reset_allows_reuse_with_another_batch_size():
    model = tiny_model("qwen3")
    cache = OscarQuantizedCache(model.config, method="naive", sink_tokens=4, recent_tokens=8)
    model(input_ids=torch.randint(3, 128, (2, 30)), past_key_values=cache)
    with pytest.raises(ValueError, match="reset"):
        model(input_ids=torch.randint(3, 128, (3, 1)), past_key_values=cache)
    cache.reset()
    assert cache.get_seq_length() == 0
    ids = torch.randint(3, 128, (3, 30))
    got = model(input_ids=ids, past_key_values=cache).logits
    torch.testing.assert_close(got, model(input_ids=ids).logits)


def test_bits_per_element_at_128k_context_is_at_most_2_30():
    model = tiny_model("qwen3", head_dim=128, layers=1)
    cache = OscarQuantizedCache(model.config, method="hadamard")
    states = torch.randn(1, 2, 128 * 1024, 128, dtype=torch.bfloat16)
    cache.update(states, states, 0)
    bits = cache.kv_bits_per_element()
    layer = cache.layers[0]
    assert layer.sink_len == 64 and 256 <= layer.recent_len < 320
    # 2 bits per code + 32 bits of scale/offset per 128 values + the exact windows' share
    expected = (2.25 * layer.body_len + 16 * (layer.sink_len + layer.recent_len)) / layer.get_seq_length()
    assert bits == pytest.approx(expected)
    assert bits <= 2.30


def test_bits_per_element_requires_tokens():
    cache = OscarQuantizedCache(tiny_model("qwen3").config, method="naive")
    with pytest.raises(ValueError, match="no tokens"):
        cache.kv_bits_per_element()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="oscar"), "needs fitted rotations"),
        (dict(method="quarot"), "Unknown method"),
        (dict(), "Pass `rotations="),
        (dict(method="naive", sink_tokens=-1), "sink_tokens"),
        (dict(method="naive", recent_tokens=-5), "recent_tokens"),
        (dict(method="naive", demote_block=0), "demote_block"),
        (dict(method="hadamard", k_clip_ratio=0.0), "k_clip_ratio"),
        (dict(method="hadamard", v_clip_ratio=1.5), "v_clip_ratio"),
    ],
)
def test_bad_arguments_fail_with_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OscarQuantizedCache(tiny_model("qwen3").config, **kwargs)


def test_rotations_for_another_model_are_rejected():
    config = tiny_model("qwen3").config
    other = OscarRotations.data_free("hadamard", num_layers=3, num_kv_heads=2, head_dim=32)
    with pytest.raises(ValueError, match="layers: bundle 3"):
        OscarQuantizedCache(config, rotations=other)
    other = OscarRotations.data_free("hadamard", num_layers=2, num_kv_heads=2, head_dim=64)
    with pytest.raises(ValueError, match="head_dim: bundle 64"):
        OscarQuantizedCache(config, rotations=other)


def test_non_orthogonal_or_non_finite_rotations_are_rejected():
    good = OscarRotations.data_free("hadamard", num_layers=2, num_kv_heads=2, head_dim=32)
    bad = good.k_rotations.clone()
    bad[1, 0] *= 1.1
    with pytest.raises(ValueError, match="layer 1 is not orthogonal"):
        OscarRotations("oscar", 2, 2, 32, good.k_clip_ratios, good.v_clip_ratios, bad, good.v_rotations)
    bad = good.k_rotations.clone()
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        OscarRotations("oscar", 2, 2, 32, good.k_clip_ratios, good.v_clip_ratios, bad, good.v_rotations)


@torch.no_grad()
def test_check_finite_reports_nan_states_with_the_layer():
    model = tiny_model("qwen3")
    cache = OscarQuantizedCache(model.config, method="naive", check_finite=True)
    k = torch.randn(1, 2, 5, 32)
    k[0, 1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="Layer 0 received 1 .* keys rows holding NaN"):
        cache.update(k, torch.randn(1, 2, 5, 32), 0)


@torch.no_grad()
def test_nan_states_without_the_check_stay_in_their_own_rows():
    layer = hadamard_layer(sink_tokens=0, recent_tokens=0, demote_block=1)
    k = torch.randn(1, 2, 6, 64)
    k[0, 0, 2] = float("nan")
    layer.update(k, torch.randn(1, 2, 6, 64))
    keys, _ = layer.dequantized_rotated(torch.float32)
    finite_rows = torch.isfinite(keys).all(-1)
    assert not finite_rows[0, 0, 2] and finite_rows.sum() == 11


@torch.no_grad()
def test_from_pretrained_builds_the_cache_from_a_saved_bundle(tmp_path):
    model = tiny_model("qwen3")
    rotations = OscarRotations.data_free("hadamard", num_layers=2, num_kv_heads=2, head_dim=32, k_clip_ratio=0.9)
    rotations.save_pretrained(tmp_path)
    cache = OscarQuantizedCache.from_pretrained(str(tmp_path), config=model.config, recent_tokens=32)
    assert cache.method == "hadamard" and cache.layers[1].k_clip_ratio == pytest.approx(0.9)
    assert cache.layers[0].recent_tokens == 32
    ids = torch.randint(3, 128, (1, 20))
    torch.testing.assert_close(model(ids, past_key_values=cache).logits, model(ids).logits)
    with pytest.raises(ValueError, match="layers"):
        OscarQuantizedCache.from_pretrained(str(tmp_path), config=tiny_model("qwen3", layers=3).config)


# --- A bundle's recorded windows are the cache's defaults (issue 21) -------------------------------------------------


@torch.no_grad()
def test_the_windows_a_bundle_records_are_the_cache_defaults_and_values_passed_win(tmp_path):
    model = tiny_model("qwen3")
    bundle = OscarRotations.data_free("hadamard", 2, 2, 32)
    bundle.metadata["windows"] = {"sink_tokens": 8, "recent_tokens": 24}
    bundle.save_pretrained(tmp_path)

    def windows(cache):
        return {(layer.sink_tokens, layer.recent_tokens) for layer in cache.quantized_layers()}

    cache = OscarQuantizedCache.from_pretrained(tmp_path, config=model.config, demote_block=8)
    assert windows(cache) == {(8, 24)} and (cache.sink_tokens, cache.recent_tokens) == (8, 24)
    model(input_ids=torch.randint(3, 128, (1, 100)), past_key_values=cache)
    layer = cache.layers[0]
    assert layer.sink_len == 8 and 24 <= layer.recent_len < 32 and layer.body_len == 100 - 8 - layer.recent_len
    # a value passed wins, the other window still comes from the bundle
    assert windows(OscarQuantizedCache(model.config, rotations=bundle, recent_tokens=40)) == {(8, 40)}
    assert windows(OscarQuantizedCache(model.config, rotations=bundle, sink_tokens=0, recent_tokens=0)) == {(0, 0)}
    # nothing recorded (the calibration-free baselines): 64 and 256
    assert windows(OscarQuantizedCache(model.config, method="hadamard")) == {(64, 256)}
    del bundle.metadata["windows"]
    assert windows(OscarQuantizedCache(model.config, rotations=bundle)) == {(64, 256)}
