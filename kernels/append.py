"""Triton window write of a static layer's decode step: the new tokens, rotated into the layer's stored space, into
the sink or the recent window, the window shifted when its oldest block was just demoted, and the lengths advanced,
all read from and written to device memory.

`oscar_hf.ops.append_device` runs a step as two launches: the write kernel of `kernels/quantize.py` (keys and values of
the oldest window block into the 2-bit body and the undo ring, in one launch, predicated on a `DemoteSchedule`: it
returns at once unless the step overflows the window), then `append_window` (this module: one program per (batch, head,
slice of 16 columns)). The window write takes the model's states and rotates them itself
(`quantization.rotate_new_states` is the reference), so that a compiled step has no separate rotation kernels; given the
step's query, it rotates that too (`decode_attention`'s stage 0). Every program reads the lengths before any is
advanced: the last program to finish, counted in the lengths' reserved slot, advances them and clears the count. The
reference of the whole step is `oscar_hf.ops.append_host` after `rotate_new_states`; a step never reads anything back to
the host, so it is captured in CUDA graphs once and replayed across demotions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from oscar_hf.kernels.decode_attention import _interpreting, _rotate_query_tile, _rotated_columns, _round
from oscar_hf.layer import LENGTH_SLOTS


class DemoteSchedule(NamedTuple):
    """When a decode step demotes: `lengths` the layer's int32 `(sink, body, recent, reserved)` on the device;
    `new_tokens` the step's token count; the sink's and the recent window's capacities. The oldest `demote_block`
    window tokens are demoted (to body position `body`) when `recent + new tokens past the sink > window capacity`
    and the body has room for them, unless the step would take the cache past `max_tokens` (then nothing is
    written)."""

    lengths: torch.Tensor
    new_tokens: int
    sink_capacity: int
    window_capacity: int
    max_tokens: int


@triton.jit
def step_plan(lengths_ptr, n_new, sink_cap, window, body_cap, block, max_tokens):
    """(sink, body, recent) before the step, how many new tokens the sink takes, whether the window's oldest block is
    demoted, and whether the step fits `max_tokens`: the rule of `ops.append_host`, read by every kernel of the step
    (these and the write kernel's `DemoteSchedule` mode), so they agree on it."""
    sink_len = tl.load(lengths_ptr)
    body_len = tl.load(lengths_ptr + 1)
    recent_len = tl.load(lengths_ptr + 2)
    to_sink = tl.minimum(tl.maximum(sink_cap - sink_len, 0), n_new)
    demote = (recent_len + n_new - to_sink > window) & (body_len + block <= body_cap)
    fits = sink_len + body_len + recent_len + n_new <= max_tokens
    return sink_len, body_len, recent_len, to_sink, demote, fits


@triton.jit
def _write_new_rows(src, src_rows, src_col, sink, window, sink_rows, window_rows, valid, to_sink, to_window, rotation,
                    mean, cols, D: tl.constexpr, ROTATE: tl.constexpr, CENTER: tl.constexpr,
                    INTERPRETING: tl.constexpr):
    """Columns `cols` of rows `src_rows` of `src` as the layer stores them (`quantization.rotate_new_states`:
    `x @ rotation - mean` in float32, one rounding) into the sink or the window: each program writes one slice of
    columns, so only a `[D, len(cols)]` slice of the rotation is loaded and live in registers."""
    y = _rotated_columns(src + src_rows, src_col, valid, rotation, cols, D, ROTATE)
    if CENTER:
        y = y.to(tl.float32) - tl.load(mean + cols)[None, :]
    if y.dtype == tl.float32:  # `_round`: the interpreter would truncate to bf16 where torch and the GPU round
        y = _round(y, sink.dtype.element_ty, INTERPRETING)
    tl.store(sink + sink_rows[:, None] + cols[None, :], y, mask=to_sink[:, None])
    tl.store(window + window_rows[:, None] + cols[None, :], y, mask=to_window[:, None])


@triton.jit(debug=True, do_not_specialize=["n_new", "sink_cap", "window", "body_cap", "block", "max_tokens"])
def _append_rows_kernel(
    new_k, sk_b, sk_h, sk_t, sk_d, new_v, sv_b, sv_h, sv_t, sv_d,
    sink_k, sink_v, ss_b, ss_h, ss_t,
    rec_k, rec_v, sr_b, sr_h, sr_t,
    k_rot, v_rot, k_rot_h, v_rot_h, k_mean, k_mean_h,
    lengths_ptr, num_heads, n_new, sink_cap, window, body_cap, block, max_tokens,
    q_ptr, sq_b, sq_h, sq_t, qr_ptr, group,
    D: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    HAS_RK: tl.constexpr, HAS_RV: tl.constexpr, HAS_KMEAN: tl.constexpr, INTERPRETING: tl.constexpr,
    HAS_QUERY: tl.constexpr = False, BLOCK_M: tl.constexpr = 16,
):
    sink_len, body_len, recent_len, to_sink, demote, fits = step_plan(
        lengths_ptr, n_new, sink_cap, window, body_cap, block, max_tokens)
    # Past max_cache_len: a device-side assertion (as an out-of-range index_copy_ in transformers' StaticCache), and
    # nothing written where assertions are compiled out (the interpreter).
    tl.device_assert(fits, "OscarQuantizedCache is full: build it with a larger max_cache_len")
    # One program per (batch x head, slice of COLS output columns): a row's columns are independent (its rotation
    # reads the whole input row, which every slice loads), so the shift and the write split along them too, and a
    # decode step of few (batch x head) rows still spreads over D / COLS times as many SMs.
    pid = tl.program_id(0)
    b = (pid // num_heads).to(tl.int64)
    h = (pid % num_heads).to(tl.int64)
    col_slice = tl.program_id(1) * COLS + tl.arange(0, COLS)
    cols = col_slice[None, :]
    rows = tl.arange(0, ROWS)
    s_base = b * ss_b + h * ss_h
    r_base = b * sr_b + h * sr_h
    # The window's oldest block went to the body (the write kernel ran first): the rest moves down by `block`. Each
    # row is read before the barrier and written after it; later reads lie above every earlier write.
    shift = demote & fits
    kept = tl.where(shift, recent_len - block, recent_len)
    if shift:  # one step in `block`: the others skip the loop
        for start in range(0, window, ROWS):
            dst = start + rows
            move = dst + block < recent_len
            src = (r_base + (dst + block) * sr_t)[:, None] + cols
            k = tl.load(rec_k + src, mask=move[:, None], other=0.0)
            v = tl.load(rec_v + src, mask=move[:, None], other=0.0)
            tl.debug_barrier()
            out = (r_base + dst * sr_t)[:, None] + cols
            tl.store(rec_k + out, k, mask=move[:, None])
            tl.store(rec_v + out, v, mask=move[:, None])
            tl.debug_barrier()
    # The new tokens: the first `to_sink` fill the sink, the rest follow the window's `kept` tokens.
    for start in range(0, n_new, ROWS):
        i = start + rows
        ok = tl.where(fits, i < n_new, False)
        sink_rows = s_base + (sink_len + i) * ss_t
        window_rows = r_base + (kept + i - to_sink) * sr_t
        to_s = ok & (i < to_sink)
        to_w = ok & (i >= to_sink)
        _write_new_rows(new_k, b * sk_b + h * sk_h + i * sk_t, sk_d, sink_k, rec_k, sink_rows, window_rows, ok, to_s,
                        to_w, k_rot + h * k_rot_h, k_mean + h * k_mean_h, col_slice, D, HAS_RK, HAS_KMEAN,
                        INTERPRETING)
        _write_new_rows(new_v, b * sv_b + h * sv_h + i * sv_t, sv_d, sink_v, rec_v, sink_rows, window_rows, ok, to_s,
                        to_w, v_rot + h * v_rot_h, k_mean, col_slice, D, HAS_RV, False, INTERPRETING)
    if HAS_QUERY:
        # This KV head's columns of the step's rotated query tile, as `decode_attention`'s stage 0 computes them, so
        # that the decode launches no rotation of its own.
        _rotate_query_tile(q_ptr, sq_b, sq_h, sq_t, b, h, group, n_new, k_rot + h * k_rot_h, qr_ptr, pid, col_slice,
                           D, BLOCK_M, HAS_RK, INTERPRETING)
    # The lengths advance once every program has read them: the last program to finish (the one that counts the
    # others' arrivals in the reserved slot) writes them and clears the count for the next step. The barrier keeps
    # this program's own step_plan reads, in every warp, before its arrival.
    tl.debug_barrier()
    arrived = tl.atomic_add(lengths_ptr + 3, 1, sem="acq_rel")
    if arrived == tl.num_programs(0) * tl.num_programs(1) - 1:
        if fits:
            tl.store(lengths_ptr, sink_len + to_sink)
            tl.store(lengths_ptr + 1, tl.where(demote, body_len + block, body_len))
            tl.store(lengths_ptr + 2, kept + n_new - to_sink)
        tl.store(lengths_ptr + 3, 0)


def _per_head_operand(t: torch.Tensor | None, name: str, shape: str, heads: int, size: int, absent: torch.Tensor):
    """`(tensor, per-head stride)` of a float32 operand of `size` elements per group, one group or one per head, that
    the kernel reads in place; `(absent, 0)` for None (a pointer the kernel never reads)."""
    if t is None:
        return absent, 0
    if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() not in (size, heads * size):
        raise ValueError(f"{name} must be a contiguous float32 {shape}, got {tuple(t.shape)} {t.dtype}.")
    return t, (size if t.numel() > size else 0)


def append_window(keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, sink_keys: torch.Tensor,
                  sink_values: torch.Tensor, recent_keys: torch.Tensor, recent_values: torch.Tensor, demote_block: int,
                  body_capacity: int, max_tokens: int, k_rotation: torch.Tensor | None = None,
                  v_rotation: torch.Tensor | None = None, k_mean: torch.Tensor | None = None,
                  query: torch.Tensor | None = None) -> torch.Tensor | None:
    """Write a decode step's rows `[B, H, n, D]` (n <= min(demote_block, recent capacity)) into the sink and the
    recent window and advance `lengths`, after the write kernel has demoted the window's oldest block when the step
    overflows it (see the module docstring). One launch whose grid depends on shapes only.

    The rows are written as given, or, with `k_rotation` / `v_rotation` (float32 `[groups, D, D]`, groups 1 or H) and
    `k_mean` (float32 `[1, 1 or H, 1, D]`), rotated and centred on the way as `quantization.rotate_new_states` does:
    keys `x @ R_K[h] - mean[h]`, values `x @ R_V[h]`, in float32, rounded once to the buffers' dtype.

    With `query` (the step's `[B, H * group, n, D]` query states, not rotated) the same launch also rotates it by R_K
    into `decode_attention`'s stage-0 layout and returns that buffer, for `decode_attention(..., rotated_query=...)`:
    the decode step then launches no rotation of its own."""
    batch, heads, n, d = keys.shape
    if values.shape != keys.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must have one shape.")
    for a, b_ in ((sink_keys, sink_values), (recent_keys, recent_values)):
        if (a.stride() != b_.stride() or a.stride(-1) != 1 or a.shape[:2] != keys.shape[:2] or a.shape[-1] != d
                or a.dtype != sink_keys.dtype or b_.dtype != sink_keys.dtype):
            raise ValueError("the sink and window buffers must be [B, H, capacity, D] of one dtype, K and V in one "
                             "layout.")
    if d & (d - 1):
        raise ValueError(f"head_dim {d} is not a power of two.")
    if lengths.dtype != torch.int32 or lengths.numel() < LENGTH_SLOTS:
        raise ValueError("lengths must be int32 (sink, body, recent, reserved): the kernel counts its programs in "
                         "the reserved slot.")
    rotation_shape = f"[1 or {heads}, {d}, {d}] rotation"
    k_rot, k_rot_h = _per_head_operand(k_rotation, "k_rotation", rotation_shape, heads, d * d, keys)
    v_rot, v_rot_h = _per_head_operand(v_rotation, "v_rotation", rotation_shape, heads, d * d, keys)
    mean, mean_h = _per_head_operand(k_mean, "k_mean", f"[1, 1 or {heads}, 1, {d}]", heads, d, keys)
    if (k_rotation is not None or v_rotation is not None) and d < 16:
        raise ValueError(f"A rotation needs head_dim >= 16 (a tl.dot operand), got {d}.")
    args = (n, sink_keys.shape[2], recent_keys.shape[2], body_capacity, demote_block, max_tokens)
    rotated = None
    q_args, group, block_m = (keys, 0, 0, 0, keys), 0, 16
    if query is not None:
        from oscar_hf.kernels.decode_attention import query_tile_rows

        if (query.dim() != 4 or query.shape[0] != batch or query.shape[1] % heads or query.shape[2] != n
                or query.shape[3] != d or query.stride(-1) != 1):
            raise ValueError(f"query {tuple(query.shape)} does not fit keys {tuple(keys.shape)}: it must be "
                             f"[{batch}, a multiple of {heads} heads, {n}, {d}], contiguous in head_dim.")
        group = query.shape[1] // heads
        block_m = query_tile_rows(group * n)
        rotated = torch.empty(batch * heads * block_m * d, dtype=query.dtype, device=query.device)
        q_args = (query, query.stride(0), query.stride(1), query.stride(2), rotated)
    # 16 columns a program: 40 KiB of shared memory on sm_90 (Triton 3.6), as the per-head kernel took; 32 took 72.
    cols = 16
    _append_rows_kernel[(batch * heads, d // cols)](
        keys, *keys.stride(), values, *values.stride(),
        sink_keys, sink_values, *sink_keys.stride()[:3],
        recent_keys, recent_values, *recent_keys.stride()[:3],
        k_rot, v_rot, k_rot_h, v_rot_h, mean, mean_h,
        lengths, heads, *args, *q_args, group, D=d, ROWS=16, COLS=cols,
        HAS_RK=k_rotation is not None, HAS_RV=v_rotation is not None, HAS_KMEAN=k_mean is not None,
        INTERPRETING=_interpreting(), HAS_QUERY=query is not None, BLOCK_M=block_m, num_warps=4,
    )
    return rotated
