"""Which path a hot-path call takes: the Triton kernels of `oscar_hf.kernels` (the repository's `kernels/` folder) or
the PyTorch reference.

- `oscar_hf.kernels.quantize`: the write path (per-row quantile clip + asymmetric INT2 + planar pack, straight into the
  layer's body buffers; codes by plain rounding, error feedback, or error feedback in each key's tilted metric), used
  when recent tokens are demoted and when a prompt is stored.
- `oscar_hf.kernels.decode_attention`: split-K decode attention over the BF16 sink, the packed INT2 body and the BF16
  recent window, with the query rotated by R_K and the output un-rotated by R_V^T inside the kernels.

Both are checked against the PyTorch reference in `oscar_hf` (`quantization.quantize_rows`,
`attention.segment_attention_reference`), which also stays the CPU path. Triton is imported only when a CUDA tensor
first reaches these entry points, so `import oscar_hf` works without it. Set `OSCAR_HF_KERNELS=0`, or call
`set_enabled(False)`, to run the PyTorch reference on CUDA too.
"""

from __future__ import annotations

import os

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)
_ENABLED = os.environ.get("OSCAR_HF_KERNELS", "1") != "0"
_TRITON_OK: bool | None = None


def set_enabled(enabled: bool) -> None:
    """Turn the Triton paths on or off (process-wide); off means the PyTorch reference everywhere."""
    global _ENABLED
    _ENABLED = bool(enabled)


def triton_available() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401

            _TRITON_OK = True
        except ImportError:
            _TRITON_OK = False
    return _TRITON_OK


def enabled() -> bool:
    return _ENABLED and triton_available()


def warn_declined(reason: str) -> None:
    """Say once per reason that a CUDA call runs the PyTorch reference instead of the decode kernel."""
    logger.warning_once(
        f"The OSCAR decode kernel declined a call ({reason}); the PyTorch reference attends instead, over a "
        "dequantized copy of the history (slower)."
    )


def decode_attention_fast_path(query, segments, attention_mask, scaling):
    """The `"oscar"` attention function's CUDA path: the kernel output, or None to fall back to the reference."""
    if not (_ENABLED and query.is_cuda):
        return None
    if not triton_available():
        warn_declined("Triton is not installed")
        return None
    from .kernels.decode_attention import oscar_decode_attention, unsupported_reason

    reason = unsupported_reason(query, segments.layer, attention_mask, segments.num_new)
    if reason is not None:
        warn_declined(reason)
        return None
    # Triton launches on the current CUDA device; with a model split over GPUs (device_map) a layer's tensors may sit
    # on another one.
    with torch.cuda.device(query.device):
        return oscar_decode_attention(query, segments.layer, attention_mask, scaling, segments.num_new, _checked=True)


def quantize_into_fast_path(rows, clip_ratio, codes, scale, offset, feedback=None, tilt=None,
                            token_pairs_from=None) -> bool:
    """Quantize `rows` into the given buffers with the Triton kernel; False (nothing written) when it cannot: the
    reference then codes them (a key tilt of more than 8 query heads per KV head, or one without `feedback`, which the
    reference rejects with the reason). `token_pairs_from`: see `quantize_rows_into`."""
    if not (_ENABLED and rows.is_cuda and triton_available()) or (tilt is not None and feedback is None):
        return False
    from .kernels.quantize import can_quantize, quantize_rows_into

    if not can_quantize(rows, tilt):
        return False
    with torch.cuda.device(rows.device):  # see decode_attention_fast_path
        quantize_rows_into(rows, clip_ratio, codes, scale, offset, feedback, tilt, token_pairs_from=token_pairs_from)
    return True


__all__ = [
    "decode_attention_fast_path", "enabled", "quantize_into_fast_path", "set_enabled", "triton_available",
    "warn_declined",
]
