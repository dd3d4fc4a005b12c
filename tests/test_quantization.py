"""The reference quantizer: packing layout, clipping, round-trip bounds, adversarial and non-finite rows."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oscar_hf.quantization import (
    KeyTilt,
    _codes_with_feedback,
    bit_reversal_permutation,
    clip_threshold,
    dequantize_rows,
    hadamard_matrix,
    pack_codes,
    quantize_rows,
    unpack_codes,
)


def test_packing_layout_is_planar_quarters():
    codes = torch.zeros(1, 8, dtype=torch.uint8)
    codes[0, 1] = 3  # channel 1 -> byte 1, bits 0-1
    codes[0, 2] = 1  # channel 2 = quarter 1 of byte 0 -> bits 2-3
    codes[0, 7] = 2  # channel 7 = quarter 3 of byte 1 -> bits 6-7
    packed = pack_codes(codes)
    assert packed.tolist() == [[0b00000100, 0b10000011]]
    assert torch.equal(unpack_codes(packed), codes)


@given(st.integers(1, 4), st.sampled_from([4, 64, 128, 256]), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_pack_unpack_round_trip(rows, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 4, (rows, head_dim), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (rows, head_dim // 4) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed), codes)


def test_clip_threshold_matches_torch_quantile():
    x = torch.randn(50, 128)
    for ratio in (0.5, 0.92, 0.96, 1.0):
        expected = torch.quantile(x.abs(), ratio, dim=-1)
        torch.testing.assert_close(clip_threshold(x, ratio), expected)


@given(
    st.sampled_from([64, 128]),
    st.floats(0.5, 1.0),
    st.floats(1e-3, 1e3),
    st.integers(0, 2**31 - 1),
)
@settings(max_examples=60, deadline=None)
def test_round_trip_error_is_within_half_a_step_of_the_clipped_row(head_dim, ratio, magnitude, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, head_dim, generator=g) * magnitude
    q = quantize_rows(x, ratio)
    y = dequantize_rows(q)
    threshold = clip_threshold(x, ratio).unsqueeze(-1)
    clipped = x.clamp(-threshold, threshold)
    step = q.scale.float().unsqueeze(-1)
    # Codes sit on a grid of step `scale`; fp16 rounding of offset and scale adds a tiny relative error.
    slack = 1e-3 * clipped.abs().amax(-1, keepdim=True) + 1e-6
    assert ((y - clipped).abs() <= step / 2 + slack).all()
    # Clipping never moves a value by more than the distance to its threshold.
    assert ((x - clipped).abs() <= (x.abs() - threshold).clamp_min(0) + 1e-6).all()


def test_unclipped_rows_keep_their_extremes_exactly_up_to_fp16():
    x = torch.randn(16, 128)
    y = dequantize_rows(quantize_rows(x, 1.0))
    torch.testing.assert_close(y.amin(-1), x.amin(-1), atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(y.amax(-1), x.amax(-1), atol=1e-2, rtol=1e-3)


def test_constant_row_decodes_to_itself():
    x = torch.full((3, 128), 2.5)
    q = quantize_rows(x, 0.96)
    assert (q.scale == 0).all()
    torch.testing.assert_close(dequantize_rows(q), x)


def test_one_huge_outlier_is_clipped_and_the_rest_keeps_resolution():
    x = torch.randn(1, 128)
    x[0, 5] = 1e4
    clipped = dequantize_rows(quantize_rows(x, 0.96))
    unclipped = dequantize_rows(quantize_rows(x, 1.0))
    rest = torch.arange(128) != 5
    # Without clipping the outlier sets a step of ~3e3 and every other value collapses onto one level.
    assert (clipped - x)[0, rest].abs().mean() < 0.5 * (unclipped - x)[0, rest].abs().mean()
    assert clipped[0, 5] < 10


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
def test_non_finite_row_never_corrupts_other_rows(poison):
    x = torch.randn(4, 128)
    clean = quantize_rows(x, 0.96)
    x_bad = x.clone()
    x_bad[2, 7] = poison
    bad = quantize_rows(x_bad, 0.96)
    keep = torch.tensor([0, 1, 3])
    assert torch.equal(bad.codes[keep], clean.codes[keep])
    assert torch.equal(bad.scale[keep], clean.scale[keep])
    assert torch.equal(bad.offset[keep], clean.offset[keep])
    assert torch.isfinite(dequantize_rows(bad)[keep]).all()


@pytest.mark.parametrize("groups", [1, 3, 4])
def test_tilted_feedback_is_gptq_in_each_rows_metric(groups):
    """The Woodbury / Sherman-Morrison coder (`tilt=`) gives the codes of plain GPTQ run row by row with the factor
    `cholesky(inv(S + W W^T))` of that row's own metric (float64, so that no code is a rounding tie)."""
    gen = torch.Generator().manual_seed(groups)
    heads, n, d = 2, 6, 32
    x = torch.randn(1, heads, n, d, generator=gen, dtype=torch.float64) * 2
    a = torch.randn(heads, d, d, generator=gen, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64)
    s = a @ a.mT + 1e-2 * torch.eye(d, dtype=torch.float64)
    b = torch.randn(heads, groups, d, d, generator=gen, dtype=torch.float64) * 0.1
    tilt = KeyTilt(torch.randn(heads, groups, d, generator=gen, dtype=torch.float64), b + b.mT)
    lo = x.amin(-1, keepdim=True)
    scale = (x.amax(-1, keepdim=True) - lo) / 3
    upper = torch.linalg.cholesky(torch.linalg.inv(s), upper=True)
    tilted = _codes_with_feedback(x, lo, scale, upper, tilt)

    w = tilt.means.unsqueeze(1) + torch.einsum("hnd,hgde->hnge", x[0], tilt.maps)  # [H, n, G, D]
    for h in range(heads):
        for t in range(n):
            metric = s[h] + w[h, t].T @ w[h, t]
            row_upper = torch.linalg.cholesky(torch.linalg.inv(metric), upper=True)
            one = (slice(0, 1), slice(h, h + 1), slice(t, t + 1))
            gptq = _codes_with_feedback(x[one], lo[one], scale[one], row_upper[None])
            assert torch.equal(tilted[one], gptq), (h, t)
    plain = _codes_with_feedback(x, lo, scale, upper)
    assert not torch.equal(tilted, plain)  # the tilt moves codes: the comparison means something


def test_per_head_clip_ratios_broadcast_over_rows():
    x = torch.randn(2, 3, 5, 64)  # batch, heads, tokens, head_dim
    ratios = torch.tensor([0.5, 0.9, 1.0]).view(1, 3, 1)
    got = clip_threshold(x, ratios)
    for h, r in enumerate([0.5, 0.9, 1.0]):
        torch.testing.assert_close(got[:, h], torch.quantile(x[:, h].abs(), r, dim=-1))


@pytest.mark.parametrize("n", [1, 2, 64, 128, 256])
def test_hadamard_is_orthonormal_with_equal_magnitudes(n):
    h = hadamard_matrix(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=h.dtype))
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)))


@pytest.mark.parametrize("n", [0, 3, 96, 100])
def test_hadamard_rejects_non_power_of_two(n):
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(n)


def test_bit_reversal_is_a_permutation_and_an_involution():
    p = bit_reversal_permutation(128)
    assert sorted(p.tolist()) == list(range(128))
    assert torch.equal(p[p], torch.arange(128))
    assert p[:4].tolist() == [0, 64, 32, 96]


def test_token_pair_layout_places_each_byte_by_the_formula_and_round_trips_from_odd_starts():
    from oscar_hf.quantization import read_token_pairs, write_token_pairs

    gen = torch.Generator().manual_seed(11)
    plane = torch.zeros(2, 3, 12, 8, dtype=torch.uint8)
    codes = torch.randint(0, 256, (2, 3, 11, 8), generator=gen).to(torch.uint8)
    write_token_pairs(plane, codes[:, :, :5], 0)
    write_token_pairs(plane, codes[:, :, 5:], 5)  # starts inside a pair: token 5 shares its pair with token 4
    assert torch.equal(read_token_pairs(plane, 11), codes)
    flat = plane.reshape(2, 3, -1)
    t, i = torch.meshgrid(torch.arange(11), torch.arange(8), indexing="ij")
    assert torch.equal(flat[:, :, (t // 2) * 16 + 2 * i + t % 2], codes)
    with pytest.raises(ValueError, match="do not fit"):
        write_token_pairs(plane, codes[:, :, :3], 10)
    with pytest.raises(ValueError, match="even capacity"):
        read_token_pairs(torch.zeros(1, 1, 5, 8, dtype=torch.uint8), 3)
