"""The least-squares grid refit (`quantization.refit_grid`, `key_grid_refit=True` on the cache): after error-feedback
coding, each row's scale and offset are refitted in the row's metric, the codes kept."""

import torch

from oscar_hf.layer import OscarQuantizedLayer
from oscar_hf.quantization import (
    KeyTilt,
    QuantizedRows,
    dequantize_rows,
    hadamard_matrix,
    metric_from_factor,
    quantize_rows,
    refit_grid,
)


def _problem(d=32, g=2, heads=2, n=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(heads, d, d, generator=gen, dtype=torch.float64) * torch.logspace(0, -1, d, dtype=torch.float64)
    s = a @ a.transpose(-1, -2) / d + 0.01 * torch.eye(d, dtype=torch.float64)
    factor = torch.linalg.cholesky(torch.linalg.inv(s), upper=True).float()
    b = 0.05 * torch.randn(heads, g, d, d, generator=gen)
    tilt = KeyTilt(torch.randn(heads, g, d, generator=gen), b + b.transpose(-1, -2))
    rows = torch.randn(1, heads, n, d, generator=gen) * 2 + 0.5
    return s, factor, tilt, rows


def _metric_error(rows, q, s, w=None):
    """`e^T (S + W W^T) e` per row, float64, straight from the definition."""
    e = (rows.double() - dequantize_rows(q).double()).unsqueeze(-1)
    metric = s[None, :, None].expand(*e.shape[:-1], e.shape[-2])
    if w is not None:
        metric = metric + w @ w.transpose(-1, -2)
    return (e.transpose(-1, -2) @ metric @ e).squeeze(-1).squeeze(-1)


def test_refit_keeps_the_codes_and_lowers_the_metric_error_of_every_row():
    s, factor, tilt, rows = _problem()
    for t in (None, tilt):
        q = quantize_rows(rows, 0.96, factor, t)
        r = refit_grid(rows, q, metric_from_factor(factor), t)
        w = None if t is None else t.columns(rows).double()
        before, after = _metric_error(rows, q, s, w), _metric_error(rows, r, s, w)
        assert torch.equal(r.codes, q.codes)
        assert r.scale.dtype == q.scale.dtype and r.offset.dtype == q.offset.dtype
        assert (after <= before * (1 + 1e-5)).all()  # float32 sums against the float64 check: a rounding's width
        assert after.mean() < 0.9 * before.mean()  # and a real gain: clipping and feedback leave the grid off
        assert (r.scale != q.scale).float().mean() > 0.5


def test_refit_solves_the_normal_equations():
    """With an identity metric the refit is ordinary least squares of the row on (codes, 1)."""
    d = 16
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(1, 1, 50, d, generator=gen)
    eye = torch.eye(d).unsqueeze(0)
    q = quantize_rows(rows, 0.9, eye)
    r = refit_grid(rows, q, metric_from_factor(eye))
    codes = dequantize_rows(QuantizedRows(q.codes, torch.ones_like(q.scale), torch.zeros_like(q.offset)))
    design = torch.stack([codes, torch.ones_like(codes)], -1).double()  # [1, 1, n, d, 2]
    sol = torch.linalg.lstsq(design, rows.double().unsqueeze(-1)).solution.squeeze(-1)
    refitted = r.scale != q.scale
    assert refitted.any()
    assert torch.allclose(r.scale.double()[refitted], sol[..., 0][refitted], rtol=2e-3)
    assert torch.allclose(r.offset.double()[refitted], sol[..., 1][refitted], rtol=2e-3, atol=2e-3)


def test_degenerate_and_nonfinite_rows_keep_their_grid():
    d = 16
    eye = torch.eye(d).unsqueeze(0)
    rows = torch.randn(1, 1, 4, d)
    rows[0, 0, 1] = 0.7  # constant: one code value, singular normal equations
    rows[0, 0, 2, 3] = float("nan")
    q = quantize_rows(rows, 1.0, eye)
    r = refit_grid(rows, q, eye)  # the identity is its own metric
    for i in (1, 2):
        assert r.scale[0, 0, i].isnan() == q.scale[0, 0, i].isnan()
        assert torch.equal(r.scale[0, 0, i].nan_to_num(), q.scale[0, 0, i].nan_to_num())
        assert torch.equal(r.offset[0, 0, i].nan_to_num(), q.offset[0, 0, i].nan_to_num())
    assert torch.isfinite(r.scale[0, 0, [0, 1, 3]]).all()


def test_metric_from_factor_inverts_the_feedback_factor():
    s, factor, _, _ = _problem()
    torch.testing.assert_close(metric_from_factor(factor).double(), s, rtol=1e-4, atol=1e-5)


def test_the_cache_refits_demoted_keys_only():
    """`key_grid_refit=True`: the body's key grid is the refit of the demoted (tilted) key rows, demoted 3 at a time;
    the key codes and everything about the values are those without it."""
    torch.manual_seed(0)
    d, heads, sink = 32, 2, 4
    h = hadamard_matrix(d).float().expand(heads, d, d)
    _, factor, tilt, _ = _problem(d=d, heads=heads)
    keys, values = torch.randn(1, heads, 60, d), torch.randn(1, heads, 60, d)
    kwargs = dict(layer_idx=0, k_feedback=factor, v_feedback=factor, k_tilt=tilt, sink_tokens=sink, recent_tokens=8,
                  demote_block=3)
    refit = OscarQuantizedLayer(h, h, 0.96, 0.92, key_grid_refit=True, **kwargs)
    plain = OscarQuantizedLayer(h, h, 0.96, 0.92, **kwargs)
    for layer in (refit, plain):
        layer.update(keys[:, :, :20], values[:, :, :20])
        for t in range(20, 60):  # decode steps: demotions of 3 tokens
            layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    (rk, rv), (pk, pv) = refit.body_rows(), plain.body_rows()
    n = refit.body_len
    assert n == plain.body_len and n > 30
    assert torch.equal(rk.codes, pk.codes)
    for got, want in ((rv.codes, pv.codes), (rv.scale, pv.scale), (rv.offset, pv.offset)):
        assert torch.equal(got, want)
    rotated = keys[:, :, sink : sink + n] @ h[0]
    expected = refit_grid(rotated, quantize_rows(rotated, 0.96, factor, tilt), metric_from_factor(factor), tilt)
    assert torch.equal(rk.codes, expected.codes)
    torch.testing.assert_close(rk.scale, expected.scale, rtol=1e-3, atol=0)
    torch.testing.assert_close(rk.offset, expected.offset, rtol=1e-3, atol=1e-4)
    assert (rk.scale != pk.scale).float().mean() > 0.5
