"""The attention tilt of the key coding (`quantization.KeyTilt`): each key row is coded with error feedback in the
metric `S + W W^T` of the queries that will attend to it. The coder keeps that per-row metric through Woodbury /
Sherman-Morrison updates; these tests hold it to the direct construction and follow the tilt through calibration,
the bundle and the cache."""

import pytest
import torch
from conftest import tiny_model

from oscar_hf import OscarQuantizedCache, OscarRotations
from oscar_hf.calibrate.core import DEFAULT_KEY_TILT, calibrate
from oscar_hf.layer import OscarQuantizedLayer
from oscar_hf.quantization import KeyTilt, dequantize_rows, hadamard_matrix, quantize_rows, unpack_codes


def _problem(d=32, g=3, heads=2, n=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(heads, d, d, generator=gen, dtype=torch.float64)
    s = a @ a.transpose(-1, -2) / d + 0.1 * torch.eye(d, dtype=torch.float64)
    factor = torch.linalg.cholesky(torch.linalg.inv(s), upper=True).float()
    b = 0.05 * torch.randn(heads, g, d, d, generator=gen)
    tilt = KeyTilt(torch.randn(heads, g, d, generator=gen), b + b.transpose(-1, -2))
    rows = torch.randn(1, heads, n, d, generator=gen)
    return s, factor, tilt, rows


def _gptq_per_row(rows, s, w):
    """GPTQ with every row's own factor `cholesky(inv(S + W W^T))`, float64: the definition the coder must meet."""
    metric = s[None, :, None] + w @ w.transpose(-1, -2)
    u = torch.linalg.cholesky(torch.linalg.inv(metric), upper=True)
    x = rows.double().clone()
    lo = rows.amin(-1, keepdim=True).half().double()
    scale = ((rows.amax(-1, keepdim=True) - rows.amin(-1, keepdim=True).half().float()) / 3).half().double()
    codes = torch.empty_like(x)
    for j in range(x.shape[-1]):
        c = torch.floor((x[..., j : j + 1] - lo) / scale + 0.5).clamp(0, 3)
        codes[..., j : j + 1] = c
        x[..., j + 1 :] -= (x[..., j : j + 1] - (c * scale + lo)) / u[..., j, j : j + 1] * u[..., j, j + 1 :]
    return codes


def _metric_error(rows, q, s, w):
    e = (rows - dequantize_rows(q)).double().unsqueeze(-1)
    metric = s[None, :, None] + w @ w.transpose(-1, -2)
    return (e.transpose(-1, -2) @ metric @ e).squeeze(-1).squeeze(-1)


@pytest.mark.parametrize("g", [1, 3, 4])
def test_tilted_feedback_equals_gptq_with_each_rows_own_metric(g):
    s, factor, tilt, rows = _problem(g=g, seed=g)
    codes = unpack_codes(quantize_rows(rows, 1.0, factor, tilt).codes).double()
    reference = _gptq_per_row(rows, s, tilt.columns(rows).double())
    assert (codes != reference).float().mean() <= 0.005  # float32 against float64: a rare tie may flip


def test_tilt_lowers_the_error_in_the_tilted_metric_and_a_zero_tilt_changes_nothing():
    s, factor, tilt, rows = _problem(n=400)
    w = tilt.columns(rows).double()
    tilted, plain = quantize_rows(rows, 1.0, factor, tilt), quantize_rows(rows, 1.0, factor)
    assert _metric_error(rows, tilted, s, w).mean() < 0.9 * _metric_error(rows, plain, s, w).mean()
    zero = KeyTilt(torch.zeros_like(tilt.means), torch.zeros_like(tilt.maps))
    assert torch.equal(quantize_rows(rows, 1.0, factor, zero).codes, plain.codes)
    with pytest.raises(ValueError, match="feedback"):
        quantize_rows(rows, 1.0, None, tilt)


def _bundle(layers=2, heads=2, d=32, g=2, **override):
    base = OscarRotations.data_free("hadamard", layers, heads, d)
    eye = torch.eye(d).expand(layers, heads, d, d).clone()
    tensors = dict(k_feedback=eye, v_feedback=eye.clone(), k_tilt_means=torch.randn(layers, heads, g, d),
                   k_tilt_maps=0.01 * torch.randn(layers, heads, g, d, d))
    tensors.update(override)
    return OscarRotations("oscar", layers, heads, d, base.k_clip_ratios, base.v_clip_ratios,
                          base.k_rotations.expand(layers, heads, d, d).clone(),
                          base.v_rotations.expand(layers, heads, d, d).clone(), **tensors)


def test_tilt_round_trips_through_the_bundle_and_bad_tilts_are_refused(tmp_path):
    rot = _bundle()
    rot.save_pretrained(tmp_path / "b")
    back = OscarRotations.from_pretrained(tmp_path / "b")
    assert torch.equal(back.k_tilt_means, rot.k_tilt_means) and torch.equal(back.k_tilt_maps, rot.k_tilt_maps)
    assert back.layer_key_tilt(1).maps.shape == (2, 2, 32, 32) and _bundle(k_tilt_means=None, k_tilt_maps=None)
    with pytest.raises(ValueError, match="both be given"):
        _bundle(k_tilt_maps=None)
    with pytest.raises(ValueError, match="needs k_feedback"):
        _bundle(k_feedback=None)
    with pytest.raises(ValueError, match="k_tilt_maps has shape"):
        _bundle(k_tilt_maps=torch.zeros(2, 2, 2, 32, 16))
    with pytest.raises(ValueError, match="k_tilt_means has shape"):
        _bundle(k_tilt_means=torch.zeros(2, 3, 2, 32), k_tilt_maps=torch.zeros(2, 3, 2, 32, 32))
    bad = rot.k_tilt_maps.clone()
    bad[0, 1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        _bundle(k_tilt_maps=bad)


def test_the_cache_codes_demoted_keys_with_the_tilt():
    torch.manual_seed(0)
    d, heads = 32, 2
    h = hadamard_matrix(d).float().expand(heads, d, d)
    _, factor, tilt, _ = _problem(d=d, g=2, heads=heads)
    keys, values = torch.randn(1, heads, 40, d), torch.randn(1, heads, 40, d)
    layer = OscarQuantizedLayer(h, h, 0.96, 0.92, layer_idx=0, k_feedback=factor, k_tilt=tilt, sink_tokens=4,
                                recent_tokens=8, demote_block=4)
    layer.update(keys, values)
    body_keys, _ = layer.body_rows()
    n = layer.body_len
    assert n > 0
    expected = quantize_rows(keys[:, :, 4 : 4 + n] @ h[0], 0.96, factor, tilt)
    assert torch.equal(body_keys.codes, expected.codes)
    assert not torch.equal(body_keys.codes, quantize_rows(keys[:, :, 4 : 4 + n] @ h[0], 0.96, factor).codes)


def test_calibration_fits_a_tilt_by_default_and_refuses_it_where_it_does_not_apply():
    model = tiny_model()
    cfg = model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    tokens = torch.randint(0, 97, (1536,))
    rot, report = calibrate(model, tokens, seq_len=256, heldout_tokens=512, progress=False)
    assert rot.metadata["calibration"]["key_tilt"] == DEFAULT_KEY_TILT
    assert rot.k_tilt_means.shape == (cfg.num_hidden_layers, cfg.num_key_value_heads, group, cfg.head_dim)
    assert rot.k_tilt_maps.abs().sum() > 0 and torch.equal(rot.k_tilt_maps, rot.k_tilt_maps.transpose(-1, -2))
    # The default strength was chosen on the reference model; on this random model the Gaussian model's own strength
    # (1) is the one to expect a lower held-back key error than plain Hadamard rounding from.
    _, report = calibrate(model, tokens, seq_len=256, heldout_tokens=512, progress=False, key_tilt=1.0)
    assert sum(report.errors["k_oscar"]) < sum(report.errors["k_hadamard"])
    OscarQuantizedCache(config=cfg, rotations=rot)  # accepted by the cache
    off, _ = calibrate(model, tokens, seq_len=256, heldout_tokens=512, key_tilt=0, progress=False)
    assert off.k_tilt_means is None and off.metadata["calibration"]["key_tilt"] == 0.0
    layer, _ = calibrate(model, tokens, seq_len=256, grouping="layer", progress=False)  # tilt off by default there
    assert layer.k_tilt_means is None
    with pytest.raises(ValueError, match="key_tilt"):
        calibrate(model, tokens, seq_len=256, grouping="layer", key_tilt=2.0, progress=False)
