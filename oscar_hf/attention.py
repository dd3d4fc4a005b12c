"""The `"oscar"` attention implementation, registered with transformers' `AttentionInterface`.

Load a model with `attn_implementation="oscar"` (after `import oscar_hf`) and every forward that has an
`OscarQuantizedCache` attends over the cache's mixed storage directly: the query is rotated by R_K, attention runs
over sink + 2-bit body + recent window, and the output is un-rotated by R_V^T. With any other cache, or on the
first (prefill) forward, it is PyTorch SDPA.

`segment_attention_reference` is the PyTorch reference: it dequantizes the body into a temporary and calls SDPA. On
CUDA, the Triton kernels in `oscar_hf.kernels` replace it on the decode hot path (up to 8 new tokens, boolean or no
mask) and are tested against it; whatever they decline runs the reference.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .layer import OscarSegments
from .quantization import rotate, unrotate

OSCAR_ATTENTION = "oscar"

# The kernel path tried before the reference on CUDA: a callable that takes (query, segments, mask, scaling) and
# returns the attention output `[batch, heads, q_len, head_dim]` un-rotated, or None to decline. By default it is
# `oscar_hf.kernels.decode_attention_fast_path`, imported on first use so that Triton stays optional.
_AUTO = object()
_FAST_PATH = _AUTO


def set_fast_path(fn) -> None:
    """Install (or remove, with `None`) the kernel path tried before the reference."""
    global _FAST_PATH
    _FAST_PATH = fn


def _fast_path():
    global _FAST_PATH
    if _FAST_PATH is _AUTO:
        try:
            from .kernels import decode_attention_fast_path as fn
        except ImportError:  # pragma: no cover - the kernels package is part of the distribution
            fn = None
        _FAST_PATH = fn
    return _FAST_PATH


def expand_rotation(rotation: torch.Tensor, num_query_heads: int) -> torch.Tensor:
    """A `[groups, D, D]` rotation expanded to one per query head (GQA: query head h reads KV head h // n_rep)."""
    groups = rotation.shape[0]
    if groups == 1:
        return rotation
    return rotation.repeat_interleave(num_query_heads // groups, dim=0)


def segment_attention_reference(
    query: torch.Tensor,
    segments: OscarSegments,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """Attention of `query` `[B, Hq, q, D]` (not rotated) over the layer's mixed storage; `[B, Hq, q, D]` out.

    Equals SDPA over the dequantized cache: the rotation is orthogonal, so `(qR)(kR)^T = qk^T`, and
    `softmax(.) (V R) R^T = softmax(.) V`.
    """
    layer = segments.layer
    q_len, num_heads = query.shape[-2], query.shape[1]
    keys, values = segments.rotated_keys_values(query.dtype)
    q = query if layer.k_rotation is None else rotate(query, expand_rotation(layer.k_rotation, num_heads))
    q = q.to(keys.dtype)
    kv_len = keys.shape[-2]
    if attention_mask is None and q_len > 1:
        # The queries are the last q_len positions: each sees the whole history and the new tokens up to itself.
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
    elif attention_mask is not None:
        attention_mask = attention_mask[..., -kv_len:]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=attention_mask, scale=scaling, enable_gqa=num_heads != keys.shape[1]
    )
    if layer.v_rotation is not None:
        out = unrotate(out, expand_rotation(layer.v_rotation, num_heads))
    return out.to(query.dtype)


def oscar_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | OscarSegments,
    value: torch.Tensor | OscarSegments,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention signature; returns `([batch, q_len, heads, head_dim], None)`."""
    if not isinstance(key, OscarSegments):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = None
    fast = _fast_path() if query.is_cuda else None
    if fast is not None:
        out = fast(query, key, attention_mask, scaling)
    if out is None:
        out = segment_attention_reference(query, key, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register `"oscar"` as an attention implementation, with SDPA's mask format."""
    AttentionInterface.register(OSCAR_ATTENTION, oscar_attention_forward)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(OSCAR_ATTENTION, sdpa_mask)
    except ImportError:  # pragma: no cover - older transformers build masks without the registry
        pass
