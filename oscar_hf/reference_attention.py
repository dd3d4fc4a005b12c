"""The PyTorch reference of attention in the rotated space: the oracle every decode kernel is tested against and the
path wherever no kernel runs. Functions of tensors only (no layer object), so that the torch ops can call them."""

from __future__ import annotations

import torch

from .quantization import rotate, unrotate


def expand_rotation(rotation: torch.Tensor, num_query_heads: int) -> torch.Tensor:
    """A `[groups, D, D]` rotation expanded to one per query head (GQA: query head h reads KV head h // n_rep)."""
    groups = rotation.shape[0]
    if groups == 1:
        return rotation
    return rotation.repeat_interleave(num_query_heads // groups, dim=0)


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """`[q_len, kv_len]` booleans for queries at the last `q_len` positions: each sees the history and the new
    tokens up to itself."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def explicit_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention with the scores written out, for what SDPA cannot do: Gemma 2's `tanh` soft-capping of the scores.

    `query` `[B, Hq, q, D]` over `keys`/`values` `[B, Hkv, L, D]` (GQA by repetition); a `None` mask means causal with
    the queries at the last `q` positions. Softmax in float32, as the eager attention of the models that softcap.
    """
    q_len, kv_len = query.shape[-2], keys.shape[-2]
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query @ keys.transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        attention_mask = causal_mask(q_len, kv_len, query.device)
    if attention_mask.dtype == torch.bool:
        # The dtype's finite minimum, as transformers' eager attention: a fully masked (pad) row must not be NaN.
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask
    return torch.softmax(scores, dim=-1).to(values.dtype) @ values


def attend_rotated(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    k_rotation: torch.Tensor | None,
    v_rotation: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of `query` (not rotated) over rotated `keys`/`values` `[B, Hkv, kv_len, D]` (every held token, in
    order); the mask's column p is cache position p (its first `kv_len` columns are read)."""
    q_len, num_heads = query.shape[-2], query.shape[1]
    q = query if k_rotation is None else rotate(query, expand_rotation(k_rotation, num_heads))
    q = q.to(keys.dtype)
    kv_len = keys.shape[-2]
    if attention_mask is not None:
        attention_mask = attention_mask[..., :kv_len]
    if softcap is not None:
        out = explicit_attention(q, keys, values, attention_mask, scaling, softcap)
    else:
        if attention_mask is None and q_len > 1:
            attention_mask = causal_mask(q_len, kv_len, q.device)
        gqa = num_heads != keys.shape[1]
        if gqa and attention_mask is not None:
            # SDPA's memory-efficient kernel takes a mask but not GQA, and its math fallback materialises float32
            # scores of every head (tens of GB for a long chunked prefill): expand K/V instead, as transformers does.
            keys = keys.repeat_interleave(num_heads // keys.shape[1], dim=1)
            values = values.repeat_interleave(num_heads // values.shape[1], dim=1)
            gqa = False
        out = torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=attention_mask, scale=scaling, enable_gqa=gqa
        )
    if v_rotation is not None:
        out = unrotate(out, expand_rotation(v_rotation, num_heads))
    return out.to(query.dtype)
