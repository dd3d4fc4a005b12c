"""Error-feedback coding (`quantize_rows(..., feedback=)`): same grid and format, codes chosen to shrink the error
in a metric; carried by bundles and used by the cache when it demotes tokens."""

import pytest
import torch
from conftest import tiny_model

from oscar_hf import OscarQuantizedCache, OscarRotations
from oscar_hf.quantization import dequantize_rows, error_feedback_factor, quantize_rows


def _metric(heads, d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(heads, d, 4, generator=g)  # low rank, as query covariances are, plus a small floor
    return a @ a.transpose(-1, -2) + 1e-3 * torch.eye(d)


def _weighted_error(q, x, metric):
    e = dequantize_rows(q) - x
    return torch.einsum("bhnd,hde,bhne->bhn", e, metric, e)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_feedback_shrinks_the_metric_error_on_the_same_grid(seed):
    heads, d = 2, 64
    metric = _metric(heads, d, seed)
    x = torch.randn(1, heads, 200, d, generator=torch.Generator().manual_seed(10 + seed))
    plain = quantize_rows(x, 0.96)
    coded = quantize_rows(x, 0.96, error_feedback_factor(metric))
    assert torch.equal(plain.scale, coded.scale) and torch.equal(plain.offset, coded.offset)
    assert not torch.equal(plain.codes, coded.codes)
    plain_err, coded_err = _weighted_error(plain, x, metric), _weighted_error(coded, x, metric)
    assert coded_err.mean() < 0.8 * plain_err.mean()
    assert (coded_err < plain_err).float().mean() > 0.8  # row by row, not just on average


def test_identity_metric_gives_plain_rounding_and_bad_rows_stay_isolated():
    x = torch.randn(2, 2, 30, 32)
    x[1, 0, 3, 5] = float("nan")
    identity = error_feedback_factor(torch.eye(32).expand(2, 32, 32))
    plain, coded = quantize_rows(x, 0.9), quantize_rows(x, 0.9, identity)
    ok = torch.isfinite(x).all(-1)
    assert torch.equal(plain.codes[ok], coded.codes[ok])
    metric = error_feedback_factor(_metric(2, 32, 4))
    coded = quantize_rows(x, 0.9, metric)
    assert torch.isfinite(coded.scale[ok]).all() and torch.equal(coded.scale[ok], plain.scale[ok])


def _bundle_with_feedback(layers=2, heads=2, d=32):
    base = OscarRotations.data_free("hadamard", layers, heads, d)
    factors = error_feedback_factor(torch.stack([_metric(heads, d, i) for i in range(layers)]))
    return OscarRotations(
        "oscar", layers, heads, d, base.k_clip_ratios, base.v_clip_ratios,
        base.k_rotations.expand(layers, heads, d, d).clone(), base.v_rotations.expand(layers, heads, d, d).clone(),
        k_feedback=factors, v_feedback=factors.clone(),
    )


def test_bundle_round_trip_keeps_feedback_and_rejects_bad_factors(tmp_path):
    rot = _bundle_with_feedback()
    rot.save_pretrained(tmp_path / "b")
    back = OscarRotations.from_pretrained(tmp_path / "b")
    assert torch.equal(back.k_feedback, rot.k_feedback) and torch.equal(back.v_feedback, rot.v_feedback)
    with pytest.raises(ValueError, match="upper-triangular"):
        OscarRotations("oscar", 2, 2, 32, rot.k_clip_ratios, rot.v_clip_ratios, rot.k_rotations, rot.v_rotations,
                       k_feedback=rot.k_feedback.transpose(-1, -2).contiguous())
    bad = rot.k_feedback.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        OscarRotations("oscar", 2, 2, 32, rot.k_clip_ratios, rot.v_clip_ratios, rot.k_rotations, rot.v_rotations,
                       k_feedback=bad)


def test_cache_codes_demoted_tokens_with_the_bundle_feedback():
    model = tiny_model("qwen3")  # 2 layers, 2 KV heads, head_dim 32
    rot = _bundle_with_feedback()
    ids = torch.randint(3, model.config.vocab_size, (1, 80))
    kw = dict(sink_tokens=8, recent_tokens=16, demote_block=8)
    with_fb = OscarQuantizedCache(model.config, rotations=rot, **kw)
    plain_rot = OscarRotations("oscar", 2, 2, 32, rot.k_clip_ratios, rot.v_clip_ratios, rot.k_rotations,
                               rot.v_rotations)
    plain = OscarQuantizedCache(model.config, rotations=plain_rot, **kw)
    with torch.no_grad():
        model(ids, past_key_values=with_fb)
        model(ids, past_key_values=plain)
    got, ref = with_fb.layers[0].body_rows()[0], plain.layers[0].body_rows()[0]
    # Same grid (the prefill's keys are the same), different codes: the feedback reached the demotion path.
    assert torch.equal(got.scale, ref.scale) and not torch.equal(got.codes, ref.codes)
