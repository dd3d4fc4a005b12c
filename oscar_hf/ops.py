"""The torch ops a decode step runs, so that `torch.compile` (and `generate()`'s compiled step) sees them:

- `oscar_hf::append(keys, values, lengths, <ten segment buffers>, undo_keys, undo_values, demote_block, max_tokens,
  k_clip_ratio, v_clip_ratio, k_feedback?, v_feedback?, k_tilt_means?, k_tilt_maps?, k_metric?, k_rotation?,
  v_rotation?, k_mean_rotated?) -> ()` appends up to `min(demote_block, recent_tokens)` new tokens, given as the
  model's key and value states and stored rotated (`quantization.rotate_new_states`): into the sink while it is not
  full, else into the recent window; when the window would overflow it first quantizes its oldest `demote_block`
  tokens into the 2-bit body at `body_len` (keeping exact copies in the undo ring, for `crop`) and shifts the rest
  left. It mutates the segment buffers, the ring and `lengths` (int32 `(sink_len, body_len, recent_len, reserved)`;
  the reserved slot is 0 between steps).
- `oscar_hf::decode_attention(query, <ten segment buffers>, lengths, k_rotation?, v_rotation?, attention_mask?,
  scaling?, launch) -> Tensor` attends over the segments and returns the un-rotated output `[B, Hq, q_len, D]`
  (a view of `[B, q_len, Hq, D]` memory). `launch` is `kernels.decode_attention.DecodeOptions.to_ints()`.
- `oscar_hf::append_decode_attention(query, keys, values, <append's other arguments>, attention_mask?, scaling?,
  launch) -> Tensor` is `append` then `decode_attention`, what the `"oscar"` attention function runs for a static
  layer's step (`OscarQuantizedCache` leaves the write to it, `OscarSegments.pending`): on CUDA the window write also
  rotates the query, so the decode launches no rotation kernel.

The same ops run eagerly and compiled, so both give the same tokens. On the CPU (and wherever the kernels are off) they
read the lengths on the host and call the PyTorch reference (`rotate_new_states`, `storage.quantize_into_body`,
`reference_attention.attend_rotated`). On CUDA they read nothing back: `append` is two Triton launches, the write kernel
in its predicated mode for keys and values (it launches every step and returns at once unless a block is waiting)
and the window write, which rotates the new rows itself (`kernels.append`), and
`decode_attention` is the Triton decode kernel reading the lengths from device memory, its grid sized from the buffers'
capacity (query rotation, body, windows, merge; `append_decode_attention` leaves the rotation to the window write). Call
them through `append(layer, ...)`, `decode_attention(query, layer, ...)` and `append_decode_attention(query, layer,
keys, values, ...)`.
"""

from __future__ import annotations

import torch

from .quantization import KeyTilt, rotate_new_states
from .reference_attention import attend_rotated
from .storage import dequantize_segments, quantize_into_body, remember_demoted

# A decode step's demotion codes keys and values in one launch (`kernels.quantize.can_pair`); False: two launches, as
# before (for timing one against the other).
PAIRED_DEMOTION = True
# The `kernels.decode_attention.DecodeOptions` the attention function's decode launches with (None: the defaults);
# for benchmarks that time a launch option through generate(). Read when a step is traced: reset the compiled step
# after changing it.
DECODE_OPTIONS = None

SEGMENT_NAMES = (
    "sink_keys", "sink_values", "recent_keys", "recent_values",
    "body_key_codes", "body_key_scale", "body_key_offset", "body_value_codes", "body_value_scale", "body_value_offset",
)


# ---------------------------------------------------------------------------------------------------------- append
def append_host(keys, values, lengths, segments, undo, demote_block, max_tokens, k_clip_ratio, v_clip_ratio,
                k_feedback=None, v_feedback=None, k_tilt=None, k_metric=None) -> None:
    """The reference `append`: the lengths read on the host, the reference (or kernel) coder. Raises when the cache
    would hold more than `max_tokens` (its `max_cache_len`)."""
    sink_k, sink_v, rec_k, rec_v = segments[:4]
    body = list(segments[4:])
    sink_len, body_len, recent_len = lengths[:3].tolist()
    n, sink_cap, window = keys.shape[2], sink_k.shape[2], rec_k.shape[2]
    if sink_len + body_len + recent_len + n > max_tokens:
        raise ValueError(
            f"The cache is full: max_cache_len={max_tokens} leaves no room for {n} more tokens after "
            f"{sink_len + body_len + recent_len}. Build it with a larger max_cache_len."
        )
    taken = max(0, min(n, sink_cap - sink_len))
    if taken:
        sink_k[:, :, sink_len : sink_len + taken] = keys[:, :, :taken]
        sink_v[:, :, sink_len : sink_len + taken] = values[:, :, :taken]
        sink_len += taken
    m = n - taken
    if m and recent_len + m > window:
        if recent_len < demote_block or body_len + demote_block > body[0].shape[2]:
            raise ValueError(
                f"The cache is full ({body_len} tokens in a 2-bit body of {body[0].shape[2]}): build it with a larger "
                "max_cache_len."
            )
        quantize_into_body(rec_k[:, :, :demote_block], rec_v[:, :, :demote_block], body_len, body, k_clip_ratio,
                           v_clip_ratio, k_feedback, v_feedback, k_tilt, k_metric)
        remember_demoted(*undo, rec_k[:, :, :demote_block], rec_v[:, :, :demote_block], body_len)
        kept = recent_len - demote_block
        rec_k[:, :, :kept] = rec_k[:, :, demote_block:recent_len].clone()
        rec_v[:, :, :kept] = rec_v[:, :, demote_block:recent_len].clone()
        body_len, recent_len = body_len + demote_block, kept
    if m:
        rec_k[:, :, recent_len : recent_len + m] = keys[:, :, taken:]
        rec_v[:, :, recent_len : recent_len + m] = values[:, :, taken:]
        recent_len += m
    lengths[:3].copy_(torch.tensor([sink_len, body_len, recent_len], dtype=torch.int32))


def append_device(keys, values, lengths, segments, undo, demote_block, max_tokens, k_clip_ratio, v_clip_ratio,
                  k_feedback=None, v_feedback=None, k_tilt=None, *, k_rotation=None, v_rotation=None,
                  k_mean_rotated=None, query=None) -> torch.Tensor | None:
    """`append` without reading anything back, in two launches: the Triton write kernel for keys and values, predicated
    on the lengths (`kernels.append.DemoteSchedule`: the window's oldest block into the 2-bit body and its exact rows
    into the undo ring, only when the step overflows the window), then `kernels.append.append_window` (the new rows,
    rotated and centred there when the rotations and the mean key are given, the window shift, the lengths). Runs on
    CUDA, and on the CPU under `TRITON_INTERPRET=1` (tests). The caller guarantees `n <= min(demote_block,
    recent_tokens)`. Past `max_tokens` a device-side assertion fires (compiled in on the GPU) and nothing is written.
    With `query` the window write also rotates the step's query for the decode kernel and returns it
    (`append_window`)."""
    from .kernels.append import DemoteSchedule, append_window
    from .kernels.quantize import ValueRows, can_pair, quantize_rows_into

    sink_k, sink_v, rec_k, rec_v = segments[:4]
    kc, ks, ko, vc, vs, vo = segments[4:]
    when = DemoteSchedule(lengths, keys.shape[2], sink_k.shape[2], rec_k.shape[2], max_tokens)
    demoted_values = ValueRows(rec_v[:, :, :demote_block], v_clip_ratio, vc, vs, vo, v_feedback, undo[1])
    if PAIRED_DEMOTION and can_pair(rec_k[:, :, :demote_block], kc, ks, ko, k_feedback, k_tilt, when, undo[0],
                                    demoted_values):
        # Keys and values in one launch: it returns at once in all but one step of `demote_block`.
        quantize_rows_into(rec_k[:, :, :demote_block], k_clip_ratio, kc, ks, ko, k_feedback, k_tilt,
                           device_offset=when, ring=undo[0], values=demoted_values)
    else:
        quantize_rows_into(rec_k[:, :, :demote_block], k_clip_ratio, kc, ks, ko, k_feedback, k_tilt,
                           device_offset=when, ring=undo[0])
        quantize_rows_into(rec_v[:, :, :demote_block], v_clip_ratio, vc, vs, vo, v_feedback, None, token_pairs_from=0,
                           device_offset=when, ring=undo[1])
    return append_window(keys, values, lengths, sink_k, sink_v, rec_k, rec_v, demote_block, kc.shape[2], max_tokens,
                         k_rotation, v_rotation, k_mean_rotated, query)


def _append_impl(
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    sink_keys: torch.Tensor,
    sink_values: torch.Tensor,
    recent_keys: torch.Tensor,
    recent_values: torch.Tensor,
    body_key_codes: torch.Tensor,
    body_key_scale: torch.Tensor,
    body_key_offset: torch.Tensor,
    body_value_codes: torch.Tensor,
    body_value_scale: torch.Tensor,
    body_value_offset: torch.Tensor,
    undo_keys: torch.Tensor,
    undo_values: torch.Tensor,
    demote_block: int,
    max_tokens: int,
    k_clip_ratio: float,
    v_clip_ratio: float,
    k_feedback: torch.Tensor | None,
    v_feedback: torch.Tensor | None,
    k_tilt_means: torch.Tensor | None,
    k_tilt_maps: torch.Tensor | None,
    k_metric: torch.Tensor | None,
    k_rotation: torch.Tensor | None = None,
    v_rotation: torch.Tensor | None = None,
    k_mean_rotated: torch.Tensor | None = None,
) -> None:
    segments = (sink_keys, sink_values, recent_keys, recent_values, body_key_codes, body_key_scale, body_key_offset,
                body_value_codes, body_value_scale, body_value_offset)
    _append_segments(keys, values, lengths, segments, (undo_keys, undo_values), demote_block, max_tokens,
                     k_clip_ratio, v_clip_ratio, k_feedback, v_feedback, k_tilt_means, k_tilt_maps, k_metric,
                     k_rotation, v_rotation, k_mean_rotated)


def _append_segments(keys, values, lengths, segments, undo, demote_block, max_tokens, k_clip_ratio, v_clip_ratio,
                     k_feedback, v_feedback, k_tilt_means, k_tilt_maps, k_metric, k_rotation, v_rotation,
                     k_mean_rotated, query=None) -> torch.Tensor | None:
    """`oscar_hf::append`'s work: on CUDA the device path (returning the rotated `query` when one is given, else
    None), elsewhere the reference (returning None)."""
    tilt = None if k_tilt_means is None else KeyTilt(k_tilt_means, k_tilt_maps)
    if keys.is_cuda and k_metric is None and _kernels_on() and _can_write(keys, tilt, k_feedback):
        with torch.cuda.device(keys.device):
            return append_device(keys, values, lengths, segments, undo, demote_block, max_tokens, k_clip_ratio,
                                 v_clip_ratio, k_feedback, v_feedback, tilt, k_rotation=k_rotation,
                                 v_rotation=v_rotation, k_mean_rotated=k_mean_rotated, query=query)
    _refuse_if_capturing(keys, "the append (the Triton write kernel cannot serve this layer's coder)")
    keys, values = rotate_new_states(keys, values, k_rotation, v_rotation, k_mean_rotated, segments[0].dtype)
    append_host(keys, values, lengths, segments, undo, demote_block, max_tokens, k_clip_ratio, v_clip_ratio, k_feedback,
                v_feedback, tilt, k_metric)
    return None


_append_op = torch.library.custom_op(
    "oscar_hf::append", mutates_args=("lengths",) + SEGMENT_NAMES + ("undo_keys", "undo_values"))(_append_impl)


@_append_op.register_fake
def _(*args, **kwargs) -> None:
    return None


def _eager_or_op(impl, op):
    """The op while torch.compile traces; its implementation, called directly, otherwise. Eagerly the op's dispatch
    adds nothing a decode step needs (no autograd through the cache) and costs host time: a mutating custom op
    re-reads its 27-argument schema on every call (`torch._library.utils.fill_defaults`, ~0.2 ms a call on a CPU,
    36 layers a step)."""
    return op if torch.compiler.is_compiling() else impl


def _layer_append_args(layer) -> tuple:
    """`oscar_hf::append`'s arguments after the new states, from `layer`."""
    tilt = layer.k_tilt
    return (
        layer.lengths, *layer.segment_tensors(), layer.undo_keys, layer.undo_values, layer.demote_block,
        layer.max_cache_len, layer.k_clip_ratio, layer.v_clip_ratio, layer.k_feedback, layer.v_feedback,
        None if tilt is None else tilt.means, None if tilt is None else tilt.maps, layer.k_metric,
        layer.k_rotation, layer.v_rotation, layer.k_mean_rotated,
    )


def append(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Append a static layer's new (unrotated) key and value states through `oscar_hf::append`, which stores them
    rotated (`quantization.rotate_new_states`; on CUDA inside the window-write kernel)."""
    _eager_or_op(_append_impl, torch.ops.oscar_hf.append)(keys, values, *_layer_append_args(layer))


# ---------------------------------------------------------------------------------------------------------- attention
def _decode_attention_impl(
    query: torch.Tensor,
    sink_keys: torch.Tensor,
    sink_values: torch.Tensor,
    recent_keys: torch.Tensor,
    recent_values: torch.Tensor,
    body_key_codes: torch.Tensor,
    body_key_scale: torch.Tensor,
    body_key_offset: torch.Tensor,
    body_value_codes: torch.Tensor,
    body_value_scale: torch.Tensor,
    body_value_offset: torch.Tensor,
    lengths: torch.Tensor,
    k_rotation: torch.Tensor | None,
    v_rotation: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    launch: list[int],
) -> torch.Tensor:
    segments = (sink_keys, sink_values, recent_keys, recent_values, body_key_codes, body_key_scale, body_key_offset,
                body_value_codes, body_value_scale, body_value_offset)
    if query.is_cuda and _kernels_on():
        from .kernels.decode_attention import DecodeOptions
        from .kernels.decode_attention import decode_attention as kernel

        # Lengths on the query's device: read there (grid from capacities); on the CPU (a dynamic layer): host ints.
        lens = lengths if lengths.device == query.device else tuple(lengths[:3].tolist())
        with torch.cuda.device(query.device):
            return kernel(query, segments, lens, k_rotation, v_rotation, attention_mask, scaling,
                          DecodeOptions.from_ints(launch))
    _refuse_if_capturing(query, "decode attention (the Triton kernels are off)")
    return decode_attention_reference(query, segments, lengths, k_rotation, v_rotation, attention_mask, scaling)


_decode_attention_op = torch.library.custom_op("oscar_hf::decode_attention", mutates_args=())(
    _decode_attention_impl)


@_decode_attention_op.register_fake
def _(query, *args, **kwargs):
    b, h, q, d = query.shape
    return query.new_empty(b, q, h, d).transpose(1, 2)


# ------------------------------------------------------------------------------------------ append, then attention
def _append_decode_attention_impl(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    sink_keys: torch.Tensor,
    sink_values: torch.Tensor,
    recent_keys: torch.Tensor,
    recent_values: torch.Tensor,
    body_key_codes: torch.Tensor,
    body_key_scale: torch.Tensor,
    body_key_offset: torch.Tensor,
    body_value_codes: torch.Tensor,
    body_value_scale: torch.Tensor,
    body_value_offset: torch.Tensor,
    undo_keys: torch.Tensor,
    undo_values: torch.Tensor,
    demote_block: int,
    max_tokens: int,
    k_clip_ratio: float,
    v_clip_ratio: float,
    k_feedback: torch.Tensor | None,
    v_feedback: torch.Tensor | None,
    k_tilt_means: torch.Tensor | None,
    k_tilt_maps: torch.Tensor | None,
    k_metric: torch.Tensor | None,
    k_rotation: torch.Tensor | None,
    v_rotation: torch.Tensor | None,
    k_mean_rotated: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    launch: list[int],
) -> torch.Tensor:
    segments = (sink_keys, sink_values, recent_keys, recent_values, body_key_codes, body_key_scale, body_key_offset,
                body_value_codes, body_value_scale, body_value_offset)
    rotated = _append_segments(keys, values, lengths, segments, (undo_keys, undo_values), demote_block, max_tokens,
                               k_clip_ratio, v_clip_ratio, k_feedback, v_feedback, k_tilt_means, k_tilt_maps, k_metric,
                               k_rotation, v_rotation, k_mean_rotated, query=query if query.is_cuda else None)
    if rotated is not None and _kernels_on():
        from .kernels.decode_attention import DecodeOptions
        from .kernels.decode_attention import decode_attention as kernel

        with torch.cuda.device(query.device):
            return kernel(query, segments, lengths, k_rotation, v_rotation, attention_mask, scaling,
                          DecodeOptions.from_ints(launch), rotated_query=rotated)
    return _decode_attention_impl(query, *segments, lengths, k_rotation, v_rotation, attention_mask, scaling, launch)


_append_decode_attention_op = torch.library.custom_op(
    "oscar_hf::append_decode_attention",
    mutates_args=("lengths",) + SEGMENT_NAMES + ("undo_keys", "undo_values"))(_append_decode_attention_impl)


@_append_decode_attention_op.register_fake
def _(query, *args, **kwargs):
    b, h, q, d = query.shape
    return query.new_empty(b, q, h, d).transpose(1, 2)


def append_decode_attention(query: torch.Tensor, layer, keys: torch.Tensor, values: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None, options=None) -> torch.Tensor:
    """`append(layer, keys, values)` then `decode_attention(query, layer, ...)` as one op,
    `oscar_hf::append_decode_attention`: on CUDA the window write also rotates the query, so the decode launches no
    rotation of its own (one launch fewer a layer). The same result as the two ops."""
    launch = _launch(options)
    return _eager_or_op(_append_decode_attention_impl, torch.ops.oscar_hf.append_decode_attention)(
        query, keys, values, *_layer_append_args(layer), attention_mask, scaling, launch,
    )


def decode_attention_reference(query, segments, lengths, k_rotation, v_rotation, attention_mask, scaling):
    """The reference behind `oscar_hf::decode_attention`, in the op's output layout."""

    keys, values = dequantize_segments(segments, *lengths[:3].tolist(), query.dtype)
    out = attend_rotated(query, keys, values, k_rotation, v_rotation, attention_mask, scaling)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def decode_attention(query: torch.Tensor, layer, attention_mask: torch.Tensor | None,
                     scaling: float | None, options=None) -> torch.Tensor:
    """`oscar_hf::decode_attention` over `layer`'s buffers; `options` a `DecodeOptions` (None: defaults)."""
    launch = _launch(options)
    return _eager_or_op(_decode_attention_impl, torch.ops.oscar_hf.decode_attention)(
        query, *layer.segment_tensors(), layer.lengths, layer.k_rotation, layer.v_rotation, attention_mask, scaling,
        launch,
    )


# DecodeOptions() as ints, spelled out so that importing this module does not import Triton.
_DEFAULT_LAUNCH = [-1, -1, 4, 64, 4, 2, -1, -1, -1, -1, 0, -1, 1, -1, -1, 0]


# ---------------------------------------------------------------------------------------------------------- helpers
def _launch(options) -> list[int]:
    """A decode op's launch ints: `options`, else `DECODE_OPTIONS`, else the defaults."""
    options = options if options is not None else DECODE_OPTIONS
    return _DEFAULT_LAUNCH if options is None else options.to_ints()


def _kernels_on() -> bool:
    from .kernel_dispatch import enabled

    return enabled()


def _can_write(keys: torch.Tensor, tilt, feedback) -> bool:
    from .kernels.quantize import can_quantize

    return can_quantize(keys, tilt) and (tilt is None or feedback is not None)


def _refuse_if_capturing(t: torch.Tensor, what: str) -> None:
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"A CUDA graph is being captured but {what} would read the segment lengths on the host. Enable the "
            "kernels (OSCAR_HF_KERNELS=1, Triton installed) or decode without compilation (disable_compile=True)."
        )
