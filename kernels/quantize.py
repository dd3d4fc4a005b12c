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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from oscar_hf.quantization import CODES_PER_BYTE, PARAM_DTYPE

_FP16_MAX = tl.constexpr(65504.0)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


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


@triton.jit(do_not_specialize=["n_rows"])
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
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_FEEDBACK: tl.constexpr,
    EXACT_PRODUCTS: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    t = (pid_t * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = t < n_rows
    QD: tl.constexpr = D // 4
    x_row = x_ptr + b * sx_b + h * sx_h + t[:, None] * sx_t

    x = tl.load(x_row + tl.arange(0, D)[None, :] * sx_d, mask=row_ok[:, None], other=0.0).to(tl.float32)
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

    packed = tl.zeros([BLOCK_R, QD], dtype=tl.int32)
    if HAS_FEEDBACK:
        # Sequential coding of the unclipped row (the reference's order of operations, element for element): channel
        # j is read out of the register tile, rounded on the grid, and its error divided by F[j, j] and spread over
        # the later channels with F[j, j+1:].
        cols = tl.arange(0, D)
        byte_cols = tl.arange(0, QD)
        f_base = fb_ptr + h * s_fb_h
        for j in range(D):
            xj = tl.sum(tl.where(cols[None, :] == j, x, 0.0), axis=1)
            code = tl.floor(tl.math.div_rn(xj - lo, safe_scale) + 0.5)
            code = tl.minimum(tl.maximum(code, 0.0), 3.0)
            err = tl.math.div_rn(xj - (code * safe_scale + lo), tl.load(f_base + j * D + j))
            f_row = tl.load(f_base + j * D + cols, mask=cols > j, other=0.0)
            if EXACT_PRODUCTS:  # a product rounded on its own, as in PyTorch: no fused multiply-add contraction
                x = x - libdevice.mul_rn(err[:, None], f_row[None, :])
            else:
                x = x - err[:, None] * f_row[None, :]
            code = tl.where(code != code, 0.0, code)
            packed = packed | tl.where(byte_cols[None, :] == j % QD, code.to(tl.int32)[:, None] << (2 * (j // QD)), 0)
    else:
        for s in tl.static_range(4):
            cols = s * QD + tl.arange(0, QD)
            xq = tl.load(x_row + cols[None, :] * sx_d, mask=row_ok[:, None], other=0.0).to(tl.float32)
            xq = tl.minimum(tl.maximum(xq, -thr), thr)
            code = tl.floor(tl.math.div_rn(xq - lo[:, None], safe_scale[:, None]) + 0.5)
            code = tl.where(code != code, 0.0, code)
            code = tl.minimum(tl.maximum(code, 0.0), 3.0)
            packed = packed | (code.to(tl.int32) << (2 * s))

    tl.store(
        codes_ptr + b * sc_b + h * sc_h + t[:, None] * sc_t + tl.arange(0, QD)[None, :],
        packed.to(tl.uint8),
        mask=row_ok[:, None],
    )
    tl.store(scale_ptr + b * ss_b + h * ss_h + t * ss_t, scale.to(tl.float16), mask=row_ok)
    tl.store(offset_ptr + b * so_b + h * so_h + t * so_t, lo.to(tl.float16), mask=row_ok)


def _as_4d(t: torch.Tensor, trailing: int) -> torch.Tensor:
    """View `t` as `[B, H, T, *trailing dims]`, adding leading unit dims (no copy)."""
    lead = t.dim() - trailing
    if lead > 3:
        raise ValueError(f"Expected at most 3 leading dims, got shape {tuple(t.shape)}.")
    return t.reshape((1,) * (3 - lead) + tuple(t.shape)) if lead < 3 else t


def can_quantize(rows: torch.Tensor) -> bool:
    """Whether `quantize_rows_into` handles `rows` (else use `oscar_hf.quantization.quantize_rows`)."""
    d = rows.shape[-1]
    return (
        rows.is_cuda or _interpreting()
    ) and rows.dtype in SUPPORTED_DTYPES and d >= 16 and d & (d - 1) == 0 and rows.dim() <= 4


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def quantize_rows_into(
    rows: torch.Tensor,
    clip_ratio: float,
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    feedback: torch.Tensor | None = None,
    block_rows: int = 16,
    num_warps: int = 4,
) -> None:
    """Quantize `rows` `[..., T, D]` (already rotated) into `codes` `[..., T, D/4]` uint8 and `scale`/`offset`
    `[..., T]` float16, which may be strided views of a larger buffer (the layer's body at `body_len`).
    `feedback`: an error-feedback factor `[heads or 1, D, D]` (`quantization.error_feedback_factor`), or None for
    plain rounding."""
    if not can_quantize(rows):
        raise ValueError(
            f"The Triton quantizer takes CUDA rows of dtype {SUPPORTED_DTYPES} and a power-of-two head_dim >= 16; "
            f"got {rows.dtype} rows of shape {tuple(rows.shape)} on {rows.device}. Use "
            "`oscar_hf.quantization.quantize_rows` instead."
        )
    d = rows.shape[-1]
    lead = tuple(rows.shape[:-1])
    if tuple(codes.shape) != lead + (d // CODES_PER_BYTE,) or tuple(scale.shape) != lead or tuple(offset.shape) != lead:
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
    if feedback is not None:
        fb = feedback.to(device=rows.device, dtype=torch.float32).reshape(-1, d, d).contiguous()
        if fb.shape[0] not in (1, h):
            raise ValueError(f"A feedback factor of {fb.shape[0]} groups does not fit rows of {h} heads.")
        s_fb_h = d * d if fb.shape[0] > 1 else 0
    else:
        fb, s_fb_h = torch.empty(1, dtype=torch.float32, device=rows.device), 0
    grid = (b * h, triton.cdiv(n, block_rows))
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
        D=d,
        BLOCK_R=block_rows,
        HAS_FEEDBACK=feedback is not None,
        EXACT_PRODUCTS=not _interpreting(),  # the interpreter computes in NumPy, which never fuses
        num_warps=num_warps,
    )


def quantize_rows(rows: torch.Tensor, clip_ratio: float = 1.0, feedback: torch.Tensor | None = None):
    """`oscar_hf.quantization.quantize_rows` on the Triton kernel: returns new `QuantizedRows`."""
    from oscar_hf.quantization import QuantizedRows

    lead = tuple(rows.shape[:-1])
    codes = torch.empty(lead + (rows.shape[-1] // CODES_PER_BYTE,), dtype=torch.uint8, device=rows.device)
    scale = torch.empty(lead, dtype=PARAM_DTYPE, device=rows.device)
    offset = torch.empty(lead, dtype=PARAM_DTYPE, device=rows.device)
    flat = rows.reshape(-1, rows.shape[-1]) if rows.dim() > 4 else rows
    if rows.dim() > 4:
        if feedback is not None:
            raise ValueError("Error-feedback coding takes rows of at most 4 dims ([B, H, T, D]).")
        quantize_rows_into(flat, clip_ratio, codes.view(-1, codes.shape[-1]), scale.view(-1), offset.view(-1))
    else:
        quantize_rows_into(rows, clip_ratio, codes, scale, offset, feedback)
    return QuantizedRows(codes, scale, offset)
