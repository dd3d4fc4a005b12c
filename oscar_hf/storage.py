"""The segment buffers' math, shared by the layer and the torch ops: quantize rotated rows into the 2-bit body (the
Triton write kernel on CUDA, the reference `quantization.quantize_rows` otherwise) and read every segment back
dequantized. Functions of buffers, not of the layer object, so that the ops can call them."""

from __future__ import annotations

import torch

from .quantization import (
    KeyTilt,
    QuantizedRows,
    dequantize_rows,
    quantize_rows,
    read_token_pairs,
    refit_grid,
    write_token_pairs,
)

# Quantizing a long prompt in slices bounds the float32 temporaries of the reference quantizer.
_QUANTIZE_SLICE_ROWS = 1 << 20
_TILT_SLICE_TOKENS = 2048


def quantize_into_body(
    keys: torch.Tensor,
    values: torch.Tensor,
    at: int,
    body: list[torch.Tensor],
    k_clip_ratio: float,
    v_clip_ratio: float,
    k_feedback: torch.Tensor | None = None,
    v_feedback: torch.Tensor | None = None,
    k_tilt: KeyTilt | None = None,
    k_metric: torch.Tensor | None = None,
) -> None:
    """Quantize rotated rows `[B, H, n, D]` and write them into the six body buffers (`body`: key codes, scale,
    offset, value codes, scale, offset) from token `at`: the Triton write kernel on CUDA, the reference
    `quantize_rows` otherwise (and wherever the kernel declines). With `k_metric` each key row's grid is then refitted
    in its coding metric (`refit_grid`)."""
    n = keys.shape[-2]
    kernel = None
    if keys.is_cuda:
        from .kernel_dispatch import quantize_into_fast_path as kernel
    at_slice = slice(at, at + n)
    for rows, ratio, feedback, tilt, codes, scale, offset, pairs in (
        (keys, k_clip_ratio, k_feedback, k_tilt, body[0], body[1], body[2], False),
        (values, v_clip_ratio, v_feedback, None, body[3], body[4], body[5], True),
    ):
        # Value codes go to their token-pair interleaved places (`quantization.write_token_pairs`).
        out_codes = codes if pairs else codes[:, :, at_slice]
        # The tilted coder keeps two [D, G] matrices per row: slice long prompts to bound its memory.
        step = _QUANTIZE_SLICE_ROWS if tilt is None else _TILT_SLICE_TOKENS
        if kernel is None or not kernel(
            rows, ratio, out_codes, scale[:, :, at_slice], offset[:, :, at_slice], feedback, tilt=tilt,
            token_pairs_from=at if pairs else None,
        ):
            for start in range(0, n, step):
                stop = min(n, start + step)
                q = quantize_rows(rows[:, :, start:stop], ratio, feedback, tilt)
                dst = slice(at + start, at + stop)
                scale[:, :, dst], offset[:, :, dst] = q.scale, q.offset
                if pairs:
                    write_token_pairs(codes, q.codes, at + start)
                else:
                    codes[:, :, dst] = q.codes
        if k_metric is not None and not pairs:
            # After either coder: the codes stay, each key row's grid is refitted in its metric (`refit_grid`).
            for start in range(0, n, _TILT_SLICE_TOKENS):
                dst = slice(at + start, at + min(n, start + _TILT_SLICE_TOKENS))
                q = refit_grid(rows[:, :, start : start + _TILT_SLICE_TOKENS],
                               QuantizedRows(codes[:, :, dst], scale[:, :, dst], offset[:, :, dst]),
                               k_metric, tilt)
                scale[:, :, dst], offset[:, :, dst] = q.scale, q.offset


def dequantize_segments(
    segments: tuple[torch.Tensor, ...], sink_len: int, body_len: int, recent_len: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """All held tokens in order (sink, body, recent), rotated, the body dequantized; `segments` are the ten buffers
    of `OscarQuantizedLayer.segment_tensors`. A new tensor each call."""
    sink_k, sink_v, rec_k, rec_v, kc, ks, ko, vc, vs, vo = segments
    n = body_len
    body_keys = QuantizedRows(kc[:, :, :n], ks[:, :, :n], ko[:, :, :n])
    body_values = QuantizedRows(read_token_pairs(vc, n), vs[:, :, :n], vo[:, :, :n])
    keys = torch.cat(
        [sink_k[:, :, :sink_len].to(dtype), dequantize_rows(body_keys, dtype), rec_k[:, :, :recent_len].to(dtype)],
        dim=-2,
    )
    values = torch.cat(
        [sink_v[:, :, :sink_len].to(dtype), dequantize_rows(body_values, dtype), rec_v[:, :, :recent_len].to(dtype)],
        dim=-2,
    )
    return keys, values


def remember_demoted(undo_keys: torch.Tensor, undo_values: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     at: int) -> None:
    """Keep exact copies of the rotated rows just demoted to body positions `[at, at + n)`, so that a crop can bring
    them back (`OscarQuantizedLayer.crop`). The undo buffers are a ring: body position p lives in slot
    `p % capacity`, so the ring always holds the newest `capacity` body positions, with no shifting."""
    capacity, n = undo_keys.shape[2], keys.shape[2]
    if not capacity or not n:
        return
    first = max(0, n - capacity)
    slots = torch.arange(at + first, at + n, device=undo_keys.device) % capacity
    undo_keys.index_copy_(2, slots, keys[:, :, first:].to(undo_keys.dtype))
    undo_values.index_copy_(2, slots, values[:, :, first:].to(undo_values.dtype))


def recall_demoted(undo_keys: torch.Tensor, undo_values: torch.Tensor, start: int,
                   stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact rows of body positions `[start, stop)` from the undo ring (the caller checks that the ring still
    holds them: `stop - capacity <= start`)."""
    slots = torch.arange(start, stop, device=undo_keys.device) % undo_keys.shape[2]
    return undo_keys.index_select(2, slots), undo_values.index_select(2, slots)
