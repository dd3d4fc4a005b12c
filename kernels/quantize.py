"""Triton write path: per-row quantile clip + asymmetric 2-bit quantization + planar packing, stored in place.

The math is `oscar_hf.quantization.quantize_rows`, step for step (that function is the reference these kernels are
tested against): read the order statistics of `|row|` around the `clip_ratio` quantile (by bisection over float bit
patterns: exact, and no sort), clip, take the row's min and max, round offset and scale to float16 *before* choosing
codes, then `code = floor((x - offset) / scale + 0.5)` clamped to 0..3, with an IEEE-rounded division so that codes
agree with the reference bit for bit.

One program quantizes `BLOCK_R` rows of one (batch, head) and writes their codes, scales and offsets straight into
the layer's preallocated body buffers, so a demotion is one launch per tensor and no temporary.

With an error-feedback factor (`quantization.error_feedback_factor`, which a calibrated bundle carries) the grid is
the same but codes are chosen channel by channel, each rounding error pushed onto the channels not yet coded, as
`quantization._codes_with_feedback` does: a loop over the D channels with the row block held in registers.

With a key tilt too (`quantization.KeyTilt`: the G <= 8 query heads that read a KV head, whose means shift with the
key) each row is coded in its own metric `S + W W^T`, W `[D, G]` = the tilt's query means for this key, which weighs
the error by the queries that will attend to this key. GPTQ in that metric needs, at each channel, the inverse of
the metric restricted to the channels not yet coded. Through Woodbury's identity that is `P - Z C Z^T`, P the
restricted `S^-1` (read off the factor U, as in plain feedback), `Z = P W` and `C = (I + W^T Z)^-1`; Z's row j is
`U[j, j] V[j]` with `V = U W` fixed, and `Y = Z C` `[D, G]` follows the coding by one rank-1 step per channel. So a
program keeps per row the row, V and Y (O(D G): 2 G + 1 times the plain-feedback state, no G x G matrix in the
loop): it first builds W, V and `Z = U^T V` in one pass over the channels each, inverts `I + V^T V` by sweeping its
G pivots and forms Y, then codes channel j with the move `(P[:, j] - Y z_j) / (P[j, j] - z_j . Y[j])` and the update
`Y -= move Y[j]^T / denom`. Work per row is about 5 D^2 G multiply-adds against D^2 for plain feedback. G is padded
to a power of two with zero columns, which change no value. One warp per program (`_tilt_launch`): each step reads
column j of x, V and Y (a warp gather) and then works within its rows, so no step needs a barrier; the operands of
the next step are loaded during this one.

Bit-exactness: every product is rounded on its own (`mul_rn`: no fused multiply-add, as PyTorch's separate kernels
compute it), every division is IEEE (`div_rn`), and every sum over channels or query heads is taken term by term in
index order, each term read out of its tile exactly (a gather, or a masked reduction that adds only zeros). The
reference uses the same order, so codes agree bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from oscar_hf.kernels.append import DemoteSchedule, step_plan
from oscar_hf.kernels.decode_attention import _interpreting
from oscar_hf.quantization import CODES_PER_BYTE, PARAM_DTYPE

_FP16_MAX = tl.constexpr(65504.0)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_TILT_GROUPS = 8  # query heads per KV head the tilted coding keeps in registers (V and Y: [rows, G, D])


@triton.jit
def _row_order_statistic(bits, k):
    """The `k`-th smallest (0-based) of each row of `bits` [R, D]: the int32 patterns of non-negative floats, whose
    integer order is their float order. Bisection over the 31-bit pattern range: 31 counting passes, no sort, so the
    result is an element of the row, exactly."""
    lo = tl.zeros([bits.shape[0]], dtype=tl.int32)
    hi = tl.full([bits.shape[0]], 0x7FFFFFFF, dtype=tl.int32)
    for _ in tl.static_range(31):
        mid = lo + (hi - lo) // 2
        enough = tl.sum((bits <= mid[:, None]).to(tl.int32), axis=1) >= k + 1
        hi = tl.where(enough, mid, hi)
        lo = tl.where(enough, lo, mid + 1)
    return lo


@triton.jit
def _row_clip_threshold(absx, clip_ratio, D: tl.constexpr):
    """The `clip_ratio` quantile of each row of `absx` [R, D], as `torch.quantile` (linear interpolation between
    the order statistics around `clip_ratio * (D - 1)`)."""
    pos = clip_ratio * (D - 1)
    lo_f = tl.minimum(tl.maximum(tl.floor(pos), 0.0), D - 1.0)
    frac = pos - lo_f
    lo_k = lo_f.to(tl.int32)
    bits = absx.to(tl.int32, bitcast=True)
    lo_bits = _row_order_statistic(bits, lo_k)
    lo_val = lo_bits.to(tl.float32, bitcast=True)
    # The next order statistic is the same value when it is repeated, else the smallest value above it.
    count_le = tl.sum((bits <= lo_bits[:, None]).to(tl.int32), axis=1)
    above = tl.min(tl.where(bits > lo_bits[:, None], absx, float("inf")), axis=1)
    hi_val = tl.where((count_le >= lo_k + 2) | (lo_k + 1 >= D), lo_val, above)
    return lo_val + frac * (hi_val - lo_val)


@triton.jit
def _mul(a, b, EXACT: tl.constexpr):
    """`a * b` rounded on its own, as PyTorch computes it: never contracted with a later add into a fused
    multiply-add (which the interpreter, computing in NumPy, never does anyway)."""
    if EXACT:
        return libdevice.mul_rn(a, b)
    else:
        return a * b


@triton.jit
def _column(a, j):
    """`a[..., j]` for a channel index `j` the same for all rows. The last axis is spread over the lanes of the warp:
    a gather reads the value from its lane with shuffles and no adds, where a masked sum takes a reduction tree and,
    for several warps, shared memory and a barrier."""
    idx = tl.full(a.shape[:-1] + [1], j, tl.int32)
    return tl.sum(tl.gather(a, idx, axis=len(a.shape) - 1), axis=len(a.shape) - 1)


@triton.jit
def _sweep_inverse(a, GP: tl.constexpr):
    """The inverse of each symmetric positive definite `a` [R, GP, GP] (here `I + V^T V`: no pivoting needed) by the
    sweep operator on each pivot in order, as `quantization._sweep_inverse`; exactly symmetric."""
    gi = tl.arange(0, GP)
    on_r = gi[None, :, None]
    on_c = gi[None, None, :]
    for p in tl.static_range(GP):
        col = tl.sum(tl.where(on_c == p, a, 0.0), axis=2)  # a[:, :, p]
        row = tl.sum(tl.where(on_r == p, a, 0.0), axis=1)  # a[:, p, :]
        piv = tl.sum(tl.where(gi[None, :] == p, col, 0.0), axis=1)[:, None, None]
        swept = a - tl.math.div_rn(col[:, :, None] * row[:, None, :], piv)
        swept = tl.where((on_r == p) | (on_c == p), tl.math.div_rn(a, piv), swept)
        a = tl.where((on_r == p) & (on_c == p), tl.math.div_rn(tl.full(piv.shape, -1.0, tl.float32), piv), swept)
    return -a


@triton.jit
def _tilt_state(x_t, sx_d, row_ok, f_base, m_base, p_base, D: tl.constexpr, BLOCK_R: tl.constexpr,
                G: tl.constexpr, GP: tl.constexpr, EXACT: tl.constexpr):
    """`V = U W` and `Y = Z C` [R, GP, D] at the start for the rows at `x_t` ([R] pointers), as
    `quantization._tilt_state`: W = means + x maps, V = U W, Z = U^T V (each a pass over the channels), C the inverse
    of I + V^T V, Y = Z C. Columns g >= G (padding to a power of two) are zero in W, V, Z and Y; C is I there. Each
    pass loads the next channel's operands while it works on this one: the loads do not depend on the loop's state,
    and their latency, not the arithmetic, would otherwise set the pace."""
    cols = tl.arange(0, D)
    gi = tl.arange(0, GP)
    g_ok = gi < G
    m_ptrs = p_base + gi[:, None] * (D * D) + cols[None, :]
    w = tl.broadcast_to(tl.load(m_base + gi[:, None] * D + cols[None, :], mask=g_ok[:, None], other=0.0)[None, :, :],
                        [BLOCK_R, GP, D])
    x_next = tl.load(x_t, mask=row_ok, other=0.0).to(tl.float32)
    m_next = tl.load(m_ptrs, mask=g_ok[:, None], other=0.0)
    for i in range(D):  # W[g, e] = means[g, e] + sum_i x_i maps[g, i, e]
        xi, mi = x_next, m_next
        x_next = tl.load(x_t + (i + 1) * sx_d, mask=row_ok & (i + 1 < D), other=0.0).to(tl.float32)
        m_next = tl.load(m_ptrs + (i + 1) * D, mask=g_ok[:, None] & (i + 1 < D), other=0.0)
        w = w + _mul(xi[:, None, None], mi[None, :, :], EXACT)
    v = tl.zeros([BLOCK_R, GP, D], dtype=tl.float32)
    u_next = tl.load(f_base + cols * D)
    for i in range(D):  # V[:, k] = sum_i U[k, i] W[:, i]
        ui = u_next
        u_next = tl.load(f_base + cols * D + i + 1, mask=i + 1 < D, other=0.0)
        wi = _column(w, i)
        v = v + _mul(ui[None, None, :], wi[:, :, None], EXACT)
    z = tl.zeros([BLOCK_R, GP, D], dtype=tl.float32)
    a = tl.broadcast_to(tl.where(gi[:, None] == gi[None, :], 1.0, 0.0)[None, :, :], [BLOCK_R, GP, GP])
    u_next = tl.load(f_base + cols)
    for i in range(D):  # Z[:, k] = sum_i U[i, k] V[:, i]; W^T Z = V^T V
        ui = u_next
        u_next = tl.load(f_base + (i + 1) * D + cols, mask=i + 1 < D, other=0.0)
        vi = _column(v, i)
        z = z + _mul(ui[None, None, :], vi[:, :, None], EXACT)
        a = a + _mul(vi[:, :, None], vi[:, None, :], EXACT)
    c = _sweep_inverse(a, GP)
    y = tl.zeros([BLOCK_R, GP, D], dtype=tl.float32)
    for g in tl.static_range(GP):  # Y[:, a, k] = sum_g Z[:, g, k] C[:, g, a]
        z_g = tl.sum(tl.where(gi[None, :, None] == g, z, 0.0), axis=1)
        c_g = tl.sum(tl.where(gi[None, :, None] == g, c, 0.0), axis=1)
        y = y + _mul(z_g[:, None, :], c_g[:, :, None], EXACT)
    return v, y


@triton.jit
def _tilted_codes(x, lo, safe_scale, row_ok, x_t, sx_d, f_base, m_base, p_base, D: tl.constexpr, BLOCK_R: tl.constexpr,
                  G: tl.constexpr, GP: tl.constexpr, EXACT_PRODUCTS: tl.constexpr):
    """Packed codes of the rows `x` coded as plain feedback below, in each row's own metric S + W W^T (see the module
    docstring): channel j's error moves the later channels by move / denom, move = P[:, j] - Z C z_j and
    denom = P[j, j] - z_j^T C z_j, with P[:, j] = U[j, j] U[j, :], z_j = U[j, j] V[j] and C z_j = Y[j]; then
    Y -= move (C z_j)^T / denom."""
    QD: tl.constexpr = D // 4
    packed = tl.zeros([BLOCK_R, QD], dtype=tl.int32)
    cols = tl.arange(0, D)
    byte_cols = tl.arange(0, QD)
    gi = tl.arange(0, GP)
    v, y = _tilt_state(x_t, sx_d, row_ok, f_base, m_base, p_base, D, BLOCK_R, G, GP, EXACT_PRODUCTS)
    f_next = tl.load(f_base + cols, mask=cols > 0, other=0.0)
    diag_next = tl.load(f_base)
    for j in range(D):
        f_row, u_jj = f_next, diag_next
        f_next = tl.load(f_base + (j + 1) * D + cols, mask=(cols > j + 1) & (j + 1 < D), other=0.0)
        diag_next = tl.load(f_base + (j + 1) * (D + 1), mask=j + 1 < D, other=1.0)
        xj = _column(x, j)
        code = tl.floor(tl.math.div_rn(xj - lo, safe_scale) + 0.5)
        code = tl.minimum(tl.maximum(code, 0.0), 3.0)
        err = xj - (code * safe_scale + lo)
        u = tl.math.div_rn(f_row, u_jj)
        z_j = _mul(u_jj, _column(v, j), EXACT_PRODUCTS)  # [R, GP]
        cz = _column(y, j)
        zcz = tl.zeros([BLOCK_R], dtype=tl.float32)
        zc = tl.zeros([BLOCK_R, D], dtype=tl.float32)
        for g in tl.static_range(GP):
            z_jg = tl.sum(tl.where(gi[None, :] == g, z_j, 0.0), axis=1)
            zcz = zcz + _mul(z_jg, tl.sum(tl.where(gi[None, :] == g, cz, 0.0), axis=1), EXACT_PRODUCTS)
            y_g = tl.sum(tl.where(gi[None, :, None] == g, y, 0.0), axis=1)  # [R, D]
            zc = zc + _mul(y_g, z_jg[:, None], EXACT_PRODUCTS)
        p_jj = _mul(u_jj, u_jj, EXACT_PRODUCTS)
        denom = p_jj - zcz
        move = tl.where(cols[None, :] > j, _mul(p_jj, u, EXACT_PRODUCTS)[None, :] - zc, 0.0)
        x = x - _mul(tl.math.div_rn(err, denom)[:, None], move, EXACT_PRODUCTS)
        y = y - _mul(move[:, None, :], tl.math.div_rn(cz, denom[:, None])[:, :, None], EXACT_PRODUCTS)
        code = tl.where(code != code, 0.0, code)
        packed = packed | tl.where(byte_cols[None, :] == j % QD, code.to(tl.int32)[:, None] << (2 * (j // QD)), 0)
    return packed


@triton.jit
def _feedback_codes(x, lo, safe_scale, f_base, D: tl.constexpr, BLOCK_R: tl.constexpr, EXACT_PRODUCTS: tl.constexpr):
    """Packed codes of the unclipped rows `x`, coded in sequence (the reference's order of operations, element for
    element): channel j is read out of the register tile, rounded on the grid, and its error spread over the later
    channels with F[j, j+1:] / F[j, j]."""
    QD: tl.constexpr = D // 4
    packed = tl.zeros([BLOCK_R, QD], dtype=tl.int32)
    cols = tl.arange(0, D)
    byte_cols = tl.arange(0, QD)
    for j in range(D):
        xj = tl.sum(tl.where(cols[None, :] == j, x, 0.0), axis=1)
        code = tl.floor(tl.math.div_rn(xj - lo, safe_scale) + 0.5)
        code = tl.minimum(tl.maximum(code, 0.0), 3.0)
        err = xj - (code * safe_scale + lo)
        u = tl.math.div_rn(tl.load(f_base + j * D + cols, mask=cols > j, other=0.0), tl.load(f_base + j * D + j))
        x = x - _mul(err[:, None], u[None, :], EXACT_PRODUCTS)
        code = tl.where(code != code, 0.0, code)
        packed = packed | tl.where(byte_cols[None, :] == j % QD, code.to(tl.int32)[:, None] << (2 * (j // QD)), 0)
    return packed


@triton.jit
def _plain_codes(x_row, sx_d, row_ok, thr, lo, safe_scale, D: tl.constexpr, BLOCK_R: tl.constexpr):
    """Packed codes of the clipped rows at `x_row`, each channel rounded on its row's grid."""
    QD: tl.constexpr = D // 4
    packed = tl.zeros([BLOCK_R, QD], dtype=tl.int32)
    for s in tl.static_range(4):
        cols = s * QD + tl.arange(0, QD)
        xq = tl.load(x_row + cols[None, :] * sx_d, mask=row_ok[:, None], other=0.0).to(tl.float32)
        xq = tl.minimum(tl.maximum(xq, -thr), thr)
        code = tl.floor(tl.math.div_rn(xq - lo[:, None], safe_scale[:, None]) + 0.5)
        code = tl.where(code != code, 0.0, code)
        code = tl.minimum(tl.maximum(code, 0.0), 3.0)
        packed = packed | (code.to(tl.int32) << (2 * s))
    return packed


@triton.jit(do_not_specialize=["n_rows", "t0", "n_new", "sink_cap", "window", "body_cap", "max_tokens"])
def _quantize_rows_kernel(
    x_ptr,
    codes_ptr,
    scale_ptr,
    offset_ptr,
    n_rows,
    num_heads,
    sx_b,
    sx_h,
    sx_t,
    sx_d,
    sc_b,
    sc_h,
    sc_t,
    ss_b,
    ss_h,
    ss_t,
    so_b,
    so_h,
    so_t,
    clip_ratio,
    fb_ptr,
    s_fb_h,
    means_ptr,
    maps_ptr,
    s_means_h,
    s_maps_h,
    t0,
    ctrl_ptr,
    ring_ptr,
    sr_b,
    sr_h,
    sr_t,
    ring_cap,
    n_new,
    sink_cap,
    window,
    body_cap,
    max_tokens,
    x2_ptr,
    codes2_ptr,
    scale2_ptr,
    offset2_ptr,
    clip2,
    fb2_ptr,
    s_fb2_h,
    ring2_ptr,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_FEEDBACK: tl.constexpr,
    HAS_TILT: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    EXACT_PRODUCTS: tl.constexpr,
    PAIRS: tl.constexpr = False,
    DEVICE_OFFSET: tl.constexpr = False,
    RING: tl.constexpr = False,
    SCHEDULE: tl.constexpr = False,
    PAIRED: tl.constexpr = False,
    SECOND_FEEDBACK: tl.constexpr = False,
):
    if SCHEDULE:
        # A decode step's demotion (`append.DemoteSchedule`): `ctrl` is the layer's lengths (sink, body, recent); the
        # oldest window block is demoted, to body position `body`, when the step's new tokens would overflow the window.
        # Launched every step, it returns at once unless a block is waiting, so the step never asks the host.
        _, body_len, _, _, demote, fits = step_plan(ctrl_ptr, n_new, sink_cap, window, body_cap, n_rows, max_tokens)
        go = demote & fits
        if go == 0:
            return
        t0 = body_len.to(tl.int64)
    elif DEVICE_OFFSET:
        # A predicated write: `ctrl` = (go, first token); nothing is written unless `go` is non-zero.
        go = tl.load(ctrl_ptr)
        t0 = tl.load(ctrl_ptr + 1).to(tl.int64)
        if go == 0:
            return
    second = False
    if PAIRED:
        # Keys and values of a demotion in one launch (`quantize_rows_into(..., values=...)`): programs with
        # program_id(2) = 1 code the second rows, of the same shapes and strides, into their token-pair code plane.
        second = tl.program_id(2) == 1
        if second:
            x_ptr, codes_ptr, scale_ptr, offset_ptr = x2_ptr, codes2_ptr, scale2_ptr, offset2_ptr
            clip_ratio, fb_ptr, s_fb_h, ring_ptr = clip2, fb2_ptr, s_fb2_h, ring2_ptr
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    t = (pid_t * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = t < n_rows
    QD: tl.constexpr = D // 4
    x_row = x_ptr + b * sx_b + h * sx_h + t[:, None] * sx_t

    x_in = tl.load(x_row + tl.arange(0, D)[None, :] * sx_d, mask=row_ok[:, None], other=0.0)
    if RING:
        # The exact row also goes to the undo ring (body position p at slot p % capacity), for an exact `crop`.
        slot = (t0 + t) % ring_cap
        ring_row = ring_ptr + b * sr_b + h * sr_h + slot[:, None] * sr_t
        tl.store(ring_row + tl.arange(0, D)[None, :], x_in.to(ring_ptr.dtype.element_ty), mask=row_ok[:, None])
    x = x_in.to(tl.float32)
    thr = _row_clip_threshold(tl.abs(x), clip_ratio, D)[:, None]
    xc = tl.minimum(tl.maximum(x, -thr), thr)
    lo = tl.min(xc, axis=1)
    hi = tl.max(xc, axis=1)
    # Offset and scale are rounded to float16 first; codes are chosen against the rounded grid.
    lo = tl.minimum(tl.maximum(lo, -_FP16_MAX), _FP16_MAX).to(tl.float16).to(tl.float32)
    scale = tl.math.div_rn(hi - lo, 3.0)
    scale = tl.where(scale != scale, scale, tl.minimum(scale, _FP16_MAX)).to(tl.float16).to(tl.float32)
    # A constant row has a null range: any code decodes to the offset.
    safe_scale = tl.where(scale > 0, scale, 1.0)

    f_base = fb_ptr + h * s_fb_h
    if HAS_TILT:
        tilted = True
        if PAIRED:
            tilted = not second  # the values of a tilted layer's demotion: coded as an untilted layer's values
        if tilted:
            packed = _tilted_codes(x, lo, safe_scale, row_ok, x_ptr + b * sx_b + h * sx_h + t * sx_t, sx_d, f_base,
                                   means_ptr + h * s_means_h, maps_ptr + h * s_maps_h, D, BLOCK_R, G, GP,
                                   EXACT_PRODUCTS)
        elif SECOND_FEEDBACK:
            packed = _feedback_codes(x, lo, safe_scale, f_base, D, BLOCK_R, EXACT_PRODUCTS)
        else:
            packed = _plain_codes(x_row, sx_d, row_ok, thr, lo, safe_scale, D, BLOCK_R)
    elif HAS_FEEDBACK:
        packed = _feedback_codes(x, lo, safe_scale, f_base, D, BLOCK_R, EXACT_PRODUCTS)
    else:
        packed = _plain_codes(x_row, sx_d, row_ok, thr, lo, safe_scale, D, BLOCK_R)

    if DEVICE_OFFSET:  # codes, scale and offset are the whole buffers, written from token t0
        t_out = t0 + t
    else:
        t_out = t
    code_at = t_out[:, None] * sc_t + tl.arange(0, QD)[None, :]
    if PAIRS or PAIRED:  # token-pair codes (`quantization.write_token_pairs`); token t is t0 + t of the plane
        tt = t0 + t
        pair_at = (tt // 2)[:, None] * (2 * sc_t) + 2 * tl.arange(0, QD)[None, :] + (tt % 2)[:, None]
        if PAIRS:
            code_at = pair_at
        else:  # (PAIRED) the first rows' plane is plain, the second's token-pair interleaved
            code_at = tl.where(second, pair_at, code_at)
    tl.store(codes_ptr + b * sc_b + h * sc_h + code_at, packed.to(tl.uint8), mask=row_ok[:, None])
    tl.store(scale_ptr + b * ss_b + h * ss_h + t_out * ss_t, scale.to(tl.float16), mask=row_ok)
    tl.store(offset_ptr + b * so_b + h * so_h + t_out * so_t, lo.to(tl.float16), mask=row_ok)


def _tilt_launch(padded_groups: int, rows: int) -> tuple[int, int]:
    """Rows and warps per program for the tilted coding. One warp: each channel step reads a column of x, V and Y
    and then only works within its rows, so one warp per program needs no barrier (several warps split D and meet
    in shared memory at every step). Two rows per program (four for G <= 2, one for G = 8: 168-213 registers on
    sm_90, no spill) when there are enough rows to fill the GPU; one row otherwise (a 64-token demotion of 8 heads
    is 512 rows: 512 one-warp programs, about four per SM)."""
    if rows < 2048:
        return 1, 1
    return {1: 4, 2: 4, 4: 2}.get(padded_groups, 1), 1


def _as_4d(t: torch.Tensor, trailing: int) -> torch.Tensor:
    """View `t` as `[B, H, T, *trailing dims]`, adding leading unit dims (no copy)."""
    lead = t.dim() - trailing
    if lead > 3:
        raise ValueError(f"Expected at most 3 leading dims, got shape {tuple(t.shape)}.")
    return t.reshape((1,) * (3 - lead) + tuple(t.shape)) if lead < 3 else t


def can_quantize(rows: torch.Tensor, tilt=None) -> bool:
    """Whether `quantize_rows_into` handles `rows` (and `tilt`, a `quantization.KeyTilt` or None; else use
    `oscar_hf.quantization.quantize_rows`)."""
    d = rows.shape[-1]
    return (
        (rows.is_cuda or _interpreting())
        and rows.dtype in SUPPORTED_DTYPES
        and d >= 16
        and d & (d - 1) == 0
        and rows.dim() <= 4
        and (tilt is None or 1 <= tilt.means.shape[-2] <= MAX_TILT_GROUPS)
    )


def quantize_rows_into(
    rows: torch.Tensor,
    clip_ratio: float,
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    feedback: torch.Tensor | None = None,
    tilt=None,
    block_rows: int | None = None,
    num_warps: int | None = None,
    token_pairs_from: int | None = None,
    device_offset: torch.Tensor | None = None,
    ring: torch.Tensor | None = None,
    values: ValueRows | None = None,
) -> None:
    """Quantize `rows` `[..., T, D]` (already rotated) into `codes` `[..., T, D/4]` uint8 and `scale`/`offset`
    `[..., T]` float16, which may be strided views of a larger buffer (the layer's body at `body_len`).
    `feedback`: an error-feedback factor `[heads or 1, D, D]` (`quantization.error_feedback_factor`), or None for
    plain rounding. `tilt`: a `quantization.KeyTilt` (G <= 8 query heads per KV head; with `feedback`, the factor of
    its base metric) to code each row in its own metric `S + W W^T`. `block_rows` / `num_warps`: rows and warps per
    program; by default 16 rows on 4 warps, and with a tilt one warp (`_tilt_launch`).
    `token_pairs_from`: when given, `codes` is a whole token-pair interleaved plane `[..., capacity, D/4]`
    (`quantization.write_token_pairs`, contiguous) and the rows are its tokens `token_pairs_from ..`.
    `device_offset`: an int32 tensor `(go, first)` on the rows' device, read by the kernel: `codes`, `scale` and
    `offset` are then whole buffers `[..., capacity, ...]` written from token `first`, and nothing is written unless
    `go` is non-zero (with `token_pairs_from` given too, `codes` is the token-pair plane). The launch never depends
    on these values, so a captured graph replays it at every step; the caller guarantees `first + T <= capacity`.
    `device_offset` may also be an `append.DemoteSchedule` (the layer's lengths and a decode step's geometry): the
    kernel then derives `go` and `first` from the lengths itself (a block is demoted when the step would overflow the
    window), so a decode step computes nothing for it on the host or in other kernels.
    `ring` (with `device_offset` only): a `[..., capacity, D]` buffer of the rows' dtype that also receives each row
    exact, row t at slot `(first + t) % capacity` (the layer's undo ring, for an exact `crop`), under the same `go`.
    `values` (a `ValueRows`; with a `DemoteSchedule` and no `token_pairs_from`): a demotion's value rows, coded in
    the same launch into their token-pair plane, with their own clip ratio, factor and ring (never a tilt). They must
    have the keys' shapes and strides, and without a tilt the keys' kind of coder (a factor or none); `can_pair` says
    whether they do (else launch twice)."""
    if ring is not None:
        if device_offset is None:
            raise ValueError("ring needs device_offset: its slots follow the body position `first`.")
        if (tuple(ring.shape[:-2]) != tuple(rows.shape[:-2]) or ring.shape[-1] != rows.shape[-1]
                or ring.dtype != rows.dtype or ring.stride(-1) != 1 or ring.shape[-2] < 1 or ring.dim() != 4):
            raise ValueError(
                f"ring {tuple(ring.shape)} {ring.dtype} does not fit rows {tuple(rows.shape)} {rows.dtype}: it must be "
                "[B, H, capacity, D] of the rows' dtype, contiguous in D."
            )
    schedule = device_offset if isinstance(device_offset, DemoteSchedule) else None
    if schedule is not None:
        device_offset = schedule.lengths
    if device_offset is not None:
        if device_offset.dtype != torch.int32 or device_offset.numel() < 2 or device_offset.device != rows.device:
            raise ValueError("device_offset must be an int32 tensor (go, first) on the rows' device.")
        if schedule is not None and device_offset.numel() < 3:
            raise ValueError("A DemoteSchedule's lengths must hold (sink, body, recent).")
        cap = scale.shape[-1] if scale.dim() else 0
        if rows.shape[-2] > cap:
            raise ValueError(f"{rows.shape[-2]} rows do not fit buffers of {cap} tokens.")
        lead_rows = tuple(rows.shape[:-2])
        if tuple(scale.shape[:-1]) != lead_rows or tuple(offset.shape) != tuple(scale.shape):
            raise ValueError(f"scale/offset {tuple(scale.shape)} do not match rows {tuple(rows.shape)}.")
    if tilt is not None and feedback is None:
        raise ValueError("A key tilt refines error feedback: pass the factor of its base metric as `feedback`.")
    if not can_quantize(rows, tilt):
        raise ValueError(
            f"The Triton quantizer takes CUDA rows of dtype {SUPPORTED_DTYPES} and a power-of-two head_dim >= 16 "
            f"(and a key tilt of at most {MAX_TILT_GROUPS} query heads); got {rows.dtype} rows of shape "
            f"{tuple(rows.shape)} on {rows.device}"
            + ("" if tilt is None else f" with a tilt of {tilt.means.shape[-2]} query heads")
            + ". Use `oscar_hf.quantization.quantize_rows` instead."
        )
    d = rows.shape[-1]
    lead = tuple(rows.shape[:-1])
    if device_offset is not None:
        lead = lead[:-1] + (scale.shape[-1],)
    code_lead = lead
    if token_pairs_from is not None:
        n_rows = rows.shape[-2] if rows.dim() >= 2 else 0
        cap = codes.shape[-2] if codes.dim() >= 2 else 0
        first = 0 if device_offset is not None else token_pairs_from
        if not codes.is_contiguous() or cap % 2 or first < 0 or first + n_rows > cap:
            raise ValueError(
                f"A token-pair interleaved code plane must be contiguous with an even capacity holding tokens "
                f"{token_pairs_from}..{token_pairs_from + n_rows}; got shape {tuple(codes.shape)}."
            )
        code_lead = lead[:-1] + (cap,)
    if (
        tuple(codes.shape) != code_lead + (d // CODES_PER_BYTE,)
        or tuple(scale.shape) != lead
        or tuple(offset.shape) != lead
    ):
        raise ValueError(
            f"Output shapes {tuple(codes.shape)}, {tuple(scale.shape)}, {tuple(offset.shape)} do not match rows "
            f"{tuple(rows.shape)}: codes must be [..., {d // CODES_PER_BYTE}] and scale/offset [...]."
        )
    if codes.dtype != torch.uint8 or scale.dtype != PARAM_DTYPE or offset.dtype != PARAM_DTYPE:
        raise ValueError(f"codes must be uint8 and scale/offset {PARAM_DTYPE}; got {codes.dtype}, {scale.dtype}.")
    if codes.stride(-1) != 1:
        raise ValueError("codes must be contiguous in its last dimension.")
    for t in (codes, scale, offset):
        if t.device != rows.device:
            raise ValueError(f"rows are on {rows.device} but an output is on {t.device}.")
    if rows.numel() == 0:
        return
    if not 0.0 < float(clip_ratio) <= 1.0:
        raise ValueError(f"clip_ratio is a quantile and must lie in (0, 1], got {clip_ratio}.")
    x, c, s, o = _as_4d(rows, 1), _as_4d(codes, 1), _as_4d(scale, 0), _as_4d(offset, 0)
    b, h, n, _ = x.shape
    fb, s_fb_h = _factor_arg(feedback, "feedback", d, h, torch.empty(1, dtype=torch.float32, device=rows.device))
    groups = 1
    if tilt is not None:
        groups = tilt.means.shape[-2]
        means = tilt.means.to(device=rows.device, dtype=torch.float32).reshape(-1, groups, d).contiguous()
        maps = tilt.maps.to(device=rows.device, dtype=torch.float32).reshape(-1, groups, d, d).contiguous()
        if means.shape[0] not in (1, h) or maps.shape[0] != means.shape[0]:
            raise ValueError(
                f"A key tilt of {means.shape[0]} and {maps.shape[0]} head groups (means, maps) does not fit rows of "
                f"{h} heads: both must have 1 or {h}."
            )
        s_means_h = groups * d if means.shape[0] > 1 else 0
        s_maps_h = groups * d * d if means.shape[0] > 1 else 0
    else:
        means = maps = torch.empty(1, dtype=torch.float32, device=rows.device)
        s_means_h = s_maps_h = 0
    padded_groups = triton.next_power_of_2(groups)
    if tilt is None:
        block_rows, num_warps = block_rows or 16, num_warps or 4
    else:
        default_rows, default_warps = _tilt_launch(padded_groups, b * h * n)
        block_rows, num_warps = block_rows or default_rows, num_warps or default_warps
    grid = (b * h, triton.cdiv(n, block_rows))
    second = (x, c, s, o, float(clip_ratio), fb, s_fb_h, ring if ring is not None else x)
    if values is not None:
        reason = _unpaired_reason(rows, codes, scale, offset, feedback, tilt, token_pairs_from, schedule, ring, values)
        if reason is not None:
            raise ValueError(f"values cannot be coded in the keys' launch: {reason}.")
        # The values take the keys' rows and warps a program (with a tilt, the one-warp launch of its coder).
        grid = grid + (2,)
        v_fb, s_v_fb_h = _factor_arg(values.feedback, "value", d, h, fb)
        second = (_as_4d(values.rows, 1), _as_4d(values.codes, 1), _as_4d(values.scale, 0), _as_4d(values.offset, 0),
                  float(values.clip_ratio), v_fb, s_v_fb_h, values.ring)
    _quantize_rows_kernel[grid](
        x,
        c,
        s,
        o,
        n,
        h,
        *x.stride(),
        *c.stride()[:3],
        *s.stride(),
        *o.stride(),
        float(clip_ratio),
        fb,
        s_fb_h,
        means,
        maps,
        s_means_h,
        s_maps_h,
        token_pairs_from or 0,
        device_offset if device_offset is not None else fb,
        ring if ring is not None else x,
        *(ring.stride()[:3] if ring is not None else (0, 0, 0)),
        ring.shape[-2] if ring is not None else 1,
        schedule.new_tokens if schedule is not None else 0,
        schedule.sink_capacity if schedule is not None else 0,
        schedule.window_capacity if schedule is not None else 0,
        s.shape[2],
        schedule.max_tokens if schedule is not None else 0,
        *second,
        D=d,
        BLOCK_R=block_rows,
        HAS_FEEDBACK=feedback is not None,
        HAS_TILT=tilt is not None,
        G=groups,
        GP=padded_groups,
        EXACT_PRODUCTS=not _interpreting(),  # the interpreter computes in NumPy, which never fuses
        PAIRS=token_pairs_from is not None,
        DEVICE_OFFSET=device_offset is not None,
        RING=ring is not None,
        SCHEDULE=schedule is not None,
        PAIRED=values is not None,
        SECOND_FEEDBACK=values is not None and values.feedback is not None,
        num_warps=num_warps,
    )


def _factor_arg(feedback: torch.Tensor | None, name: str, d: int, heads: int, absent: torch.Tensor):
    """`(factor, per-head stride)` of an error-feedback factor `[1 or heads, d, d]` as the kernel reads it (float32,
    contiguous, on `absent`'s device); `(absent, 0)` for None."""
    if feedback is None:
        return absent, 0
    fb = feedback.to(device=absent.device, dtype=torch.float32).reshape(-1, d, d).contiguous()
    if fb.shape[0] not in (1, heads):
        raise ValueError(f"A {name} factor of {fb.shape[0]} groups does not fit rows of {heads} heads.")
    return fb, (d * d if fb.shape[0] > 1 else 0)


class ValueRows(NamedTuple):
    """A demotion's value rows for `quantize_rows_into(..., values=...)`: `codes` is their whole token-pair plane."""

    rows: torch.Tensor
    clip_ratio: float
    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    feedback: torch.Tensor | None
    ring: torch.Tensor


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device


def _unpaired_reason(rows, codes, scale, offset, feedback, tilt, token_pairs_from, schedule, ring,
                     values: ValueRows) -> str | None:
    """Why `values` cannot share the keys' launch (None when they can): the kernel reads both through one set of
    shapes and strides."""
    if schedule is None or token_pairs_from is not None or ring is None:
        return "a paired launch is a demotion's (a DemoteSchedule and a ring, plain key codes)"
    if not 0.0 < float(values.clip_ratio) <= 1.0:
        return f"the values' clip_ratio {values.clip_ratio} is not in (0, 1]"
    if tilt is None and (feedback is None) != (values.feedback is None):
        # (without a tilt both take the keys' branch of the coder; a tilted layer's values have their own)
        return "one of keys and values has an error-feedback factor and the other has not"
    pairs = (rows, values.rows), (codes, values.codes), (scale, values.scale), (offset, values.offset), \
        (ring, values.ring)
    if not all(_same_layout(a, b) for a, b in pairs):
        return "the value tensors differ from the keys' in shape, strides, dtype or device"
    if not values.codes.is_contiguous() or values.codes.shape[-2] % 2:
        return "the value code plane must be contiguous with an even capacity (token pairs)"
    return None


def can_pair(rows, codes, scale, offset, feedback, tilt, schedule, ring, values: ValueRows) -> bool:
    """Whether `quantize_rows_into(rows, ..., values=values)` takes both in one launch."""
    return (can_quantize(rows, tilt) and can_quantize(values.rows)
            and _unpaired_reason(rows, codes, scale, offset, feedback, tilt, None, schedule, ring, values) is None)


def quantize_rows(rows: torch.Tensor, clip_ratio: float = 1.0, feedback: torch.Tensor | None = None, tilt=None):
    """`oscar_hf.quantization.quantize_rows` on the Triton kernel: returns new `QuantizedRows`."""
    from oscar_hf.quantization import QuantizedRows

    lead = tuple(rows.shape[:-1])
    codes = torch.empty(lead + (rows.shape[-1] // CODES_PER_BYTE,), dtype=torch.uint8, device=rows.device)
    scale = torch.empty(lead, dtype=PARAM_DTYPE, device=rows.device)
    offset = torch.empty(lead, dtype=PARAM_DTYPE, device=rows.device)
    flat = rows.reshape(-1, rows.shape[-1]) if rows.dim() > 4 else rows
    if rows.dim() > 4:
        if feedback is not None or tilt is not None:
            raise ValueError("Error-feedback coding takes rows of at most 4 dims ([B, H, T, D]).")
        quantize_rows_into(flat, clip_ratio, codes.view(-1, codes.shape[-1]), scale.view(-1), offset.view(-1))
    else:
        quantize_rows_into(rows, clip_ratio, codes, scale, offset, feedback, tilt)
    return QuantizedRows(codes, scale, offset)
