"""Triton window write of a static layer's decode step: the new tokens into the sink or the recent window, the window
shifted when its oldest block was just demoted, and the lengths advanced, all read from and written to device memory.

`oscar_hf.ops.append_device` runs a step as three launches: the write kernel of `kernels/quantize.py` twice (keys and
values of the oldest window block into the 2-bit body and the undo ring, predicated on a `DemoteSchedule`: it returns
at once unless the step overflows the window), then `append_window` (this module: one program per (batch, head)).
Every program reads the lengths before any is advanced: the last program to finish, counted in the lengths' reserved
slot, advances them and clears the count. The reference of the whole step is `oscar_hf.ops.append_host`; a step
never reads anything back to the host, so it is captured in CUDA graphs once and replayed across demotions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


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


@triton.jit(debug=True, do_not_specialize=["n_new", "sink_cap", "window", "body_cap", "block", "max_tokens"])
def _append_rows_kernel(
    new_k, new_v, sn_b, sn_h, sn_t,
    sink_k, sink_v, ss_b, ss_h, ss_t,
    rec_k, rec_v, sr_b, sr_h, sr_t,
    lengths_ptr, num_heads, n_new, sink_cap, window, body_cap, block, max_tokens,
    D: tl.constexpr, ROWS: tl.constexpr,
):
    sink_len, body_len, recent_len, to_sink, demote, fits = step_plan(
        lengths_ptr, n_new, sink_cap, window, body_cap, block, max_tokens)
    # Past max_cache_len: a device-side assertion (as an out-of-range index_copy_ in transformers' StaticCache), and
    # nothing written where assertions are compiled out (the interpreter).
    tl.device_assert(fits, "OscarQuantizedCache is full: build it with a larger max_cache_len")
    pid = tl.program_id(0)
    b = (pid // num_heads).to(tl.int64)
    h = (pid % num_heads).to(tl.int64)
    cols = tl.arange(0, D)[None, :]
    rows = tl.arange(0, ROWS)
    n_base = b * sn_b + h * sn_h
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
        src = (n_base + i * sn_t)[:, None] + cols
        k = tl.load(new_k + src, mask=ok[:, None], other=0.0)
        v = tl.load(new_v + src, mask=ok[:, None], other=0.0)
        to_s = ok & (i < to_sink)
        at_s = (s_base + (sink_len + i) * ss_t)[:, None] + cols
        tl.store(sink_k + at_s, k.to(sink_k.dtype.element_ty), mask=to_s[:, None])
        tl.store(sink_v + at_s, v.to(sink_v.dtype.element_ty), mask=to_s[:, None])
        to_w = ok & (i >= to_sink)
        at_w = (r_base + (kept + i - to_sink) * sr_t)[:, None] + cols
        tl.store(rec_k + at_w, k.to(rec_k.dtype.element_ty), mask=to_w[:, None])
        tl.store(rec_v + at_w, v.to(rec_v.dtype.element_ty), mask=to_w[:, None])
    # The lengths advance once every program has read them: the last program to finish (the one that counts the
    # others' arrivals in the reserved slot) writes them and clears the count for the next step. The barrier keeps
    # this program's own step_plan reads, in every warp, before its arrival.
    tl.debug_barrier()
    arrived = tl.atomic_add(lengths_ptr + 3, 1, sem="acq_rel")
    if arrived == tl.num_programs(0) - 1:
        if fits:
            tl.store(lengths_ptr, sink_len + to_sink)
            tl.store(lengths_ptr + 1, tl.where(demote, body_len + block, body_len))
            tl.store(lengths_ptr + 2, kept + n_new - to_sink)
        tl.store(lengths_ptr + 3, 0)




def append_window(keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, sink_keys: torch.Tensor,
                  sink_values: torch.Tensor, recent_keys: torch.Tensor, recent_values: torch.Tensor, demote_block: int,
                  body_capacity: int, max_tokens: int) -> None:
    """Write a decode step's rotated rows `[B, H, n, D]` (n <= min(demote_block, recent capacity)) into the sink and
    the recent window and advance `lengths`, after the write kernel has demoted the window's oldest block when the step
    overflows it (see the module docstring). One launch whose grid depends on shapes only."""
    batch, heads, n, d = keys.shape
    if values.shape != keys.shape or values.stride() != keys.stride() or keys.stride(-1) != 1:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must share one layout, "
                         "contiguous in head_dim.")
    for a, b_ in ((sink_keys, sink_values), (recent_keys, recent_values)):
        if a.stride() != b_.stride() or a.stride(-1) != 1 or a.shape[:2] != keys.shape[:2] or a.shape[-1] != d:
            raise ValueError("the sink and window buffers must be [B, H, capacity, D], K and V in one layout.")
    if d & (d - 1):
        raise ValueError(f"head_dim {d} is not a power of two.")
    if lengths.dtype != torch.int32 or lengths.numel() < 4:
        raise ValueError("lengths must be int32 (sink, body, recent, reserved): the kernel counts its programs in "
                         "the reserved slot.")
    args = (n, sink_keys.shape[2], recent_keys.shape[2], body_capacity, demote_block, max_tokens)
    _append_rows_kernel[(batch * heads,)](
        keys, values, *keys.stride()[:3],
        sink_keys, sink_values, *sink_keys.stride()[:3],
        recent_keys, recent_values, *recent_keys.stride()[:3],
        lengths, heads, *args, D=d, ROWS=16, num_warps=4,
    )
