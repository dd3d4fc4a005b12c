"""The `"oscar"` attention implementation, registered with transformers' `AttentionInterface`.

Load a model with `attn_implementation="oscar"` (after `import oscar_hf`) and every forward that has an
`OscarQuantizedCache` attends over the cache's mixed storage directly: the query is rotated by R_K, attention runs
over sink + 2-bit body + recent window, and the output is un-rotated by R_V^T. With any other cache, or on the
first (prefill) forward, it is PyTorch SDPA (scores written out when the model soft-caps them, as Gemma 2).

`segment_attention_reference` (over `attend_rotated`) is the PyTorch reference: it dequantizes the body into a
temporary and calls SDPA. On CUDA, the Triton kernels in `oscar_hf.kernels` replace it on the decode hot path (up to 8
new tokens, boolean or no mask) and are tested against it. A static cache's decode step goes through the
`oscar_hf::decode_attention` op (`oscar_hf.ops`), which compiles; elsewhere whatever the kernels decline runs the
reference.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .attention_checks import check_attention_call
from .layer import OscarSegments
from .reference_attention import attend_rotated, causal_mask, explicit_attention
from .storage import recall_demoted

OSCAR_ATTENTION = "oscar"

# The kernel path tried before the reference on CUDA: a callable that takes (query, segments, mask, scaling) and
# returns the attention output `[batch, heads, q_len, head_dim]` un-rotated, or None to decline. By default it is
# `oscar_hf.kernel_dispatch.decode_attention_fast_path`, imported on first use so that Triton stays optional.
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
            from .kernel_dispatch import decode_attention_fast_path as fn
        except ImportError:  # pragma: no cover - the kernels are part of the distribution
            fn = None
        _FAST_PATH = fn
    return _FAST_PATH


def segment_attention_reference(
    query: torch.Tensor,
    segments: OscarSegments,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of `query` `[B, Hq, q, D]` (not rotated) over the layer's mixed storage; `[B, Hq, q, D]` out.

    Equals SDPA over the dequantized cache: the rotation is orthogonal, so `(qR)(kR)^T = qk^T`, and
    `softmax(.) (V R) R^T = softmax(.) V`. Soft-capping acts on the scores, which the rotation leaves unchanged.
    """
    layer = segments.layer
    if segments.demoted is None:
        keys, values = segments.rotated_keys_values(query.dtype)
        return attend_rotated(query, keys, values, layer.k_rotation, layer.v_rotation, attention_mask, scaling, softcap)
    # A short forward that demoted tokens: each query sees the body it would see decoding token by token. The storage
    # as it is (the demoted rows 2-bit, even new tokens of this forward), with the rows a query must still see exact
    # taken back from the undo ring; one pass per distinct body length.
    keys, values = layer.dequantized_rotated(query.dtype)
    q_len, kv_len = query.shape[-2], keys.shape[-2]
    if attention_mask is None:
        attention_mask = causal_mask(q_len, kv_len, query.device)[None, None]
    sink, stop = layer.sink_len, segments.demoted[1]
    bodies = segments.query_body_lengths()
    out = torch.empty_like(query)
    for body in sorted(set(bodies)):
        rows = [i for i, b in enumerate(bodies) if b == body]
        k, v = keys, values
        if body < stop:
            exact_k, exact_v = recall_demoted(layer.undo_keys, layer.undo_values, body, stop)
            k, v = keys.clone(), values.clone()
            k[..., sink + body : sink + stop, :] = exact_k.to(k.dtype)
            v[..., sink + body : sink + stop, :] = exact_v.to(v.dtype)
        mask = attention_mask[..., rows[0] : rows[-1] + 1, :]
        out[..., rows[0] : rows[-1] + 1, :] = attend_rotated(
            query[..., rows[0] : rows[-1] + 1, :], k, v, layer.k_rotation, layer.v_rotation, mask, scaling, softcap
        )
    return out


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
    """transformers attention signature; returns `([batch, q_len, heads, head_dim], None)`.

    Segments appended through `oscar_hf::append` (a static layer's decode step) are read by `oscar_hf::decode_attention`
    (the Triton kernel on CUDA, the reference on the CPU), eagerly and compiled alike; other segments (a long chunk,
    a dynamic layer) by the kernel where it can serve them, else the reference.
    """
    check_attention_call(module, key, dropout, kwargs)
    softcap = kwargs.pop("softcap", None)
    if isinstance(key, OscarSegments) and key.pending is not None and softcap is not None:
        key.flush()  # soft-capped scores take the reference below; only the decode op writes pending states itself
    if not isinstance(key, OscarSegments):
        if attention_mask is not None:
            # Column p is cache position p: a static cache's mask spans max_cache_len columns, a prefill's keys fewer.
            attention_mask = attention_mask[..., : key.shape[-2]]
        if softcap is None:
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        out = explicit_attention(query, key, value, attention_mask, scaling, softcap)
        return out.transpose(1, 2).contiguous(), None
    layer = key.layer
    if key.demoted is not None:
        # Rare (a short forward that crossed a demotion, about one in `demote_block` tokens): the reference's per-query
        # view (see `segment_attention_reference`), which the kernels do not implement.
        out = segment_attention_reference(query, key, attention_mask, scaling, softcap)
        return out.transpose(1, 2).contiguous(), None
    if key.device_lengths and softcap is None:
        from . import ops

        if query.is_cuda:
            from .kernel_dispatch import enabled, warn_declined

            reason = "the Triton kernels are off (OSCAR_HF_KERNELS=0 or no Triton)" if not enabled() else None
            if reason is None:
                from .kernels.decode_attention import unsupported_reason

                reason = unsupported_reason(query, layer, attention_mask, key.num_new, device_lengths=True)
            if reason is not None:
                if torch.compiler.is_compiling():
                    raise RuntimeError(
                        "Compiled OSCAR decoding needs the Triton decode kernel, which cannot serve this call: "
                        f"{reason}."
                        " Pass disable_compile=True to generate(), or build the cache without max_cache_len."
                    )
                warn_declined(reason)
                key.flush()
                out = segment_attention_reference(query, key, attention_mask, scaling)
                return out.transpose(1, 2).contiguous(), None
        if key.pending is not None:
            out = ops.append_decode_attention(query, layer, *key.take_pending(), attention_mask, scaling)
        else:
            out = ops.decode_attention(query, layer, attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None
    out = None
    # The kernels compute plain softmax attention; soft-capped scores go through the reference.
    fast = _fast_path() if query.is_cuda and softcap is None else None
    if fast is not None:
        out = fast(query, key, attention_mask, scaling)
    if out is None:
        out = segment_attention_reference(query, key, attention_mask, scaling, softcap)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register `"oscar"` as an attention implementation, with SDPA's mask format."""
    AttentionInterface.register(OSCAR_ATTENTION, oscar_attention_forward)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(OSCAR_ATTENTION, sdpa_mask)
    except ImportError:  # pragma: no cover - older transformers build masks without the registry
        pass
