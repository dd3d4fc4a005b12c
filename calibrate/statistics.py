"""Streaming capture of attention statistics while a model runs on calibration text.

No model code is touched: a custom attention function (`"oscar_calibrate"`, registered with transformers'
`AttentionInterface`) receives the post-RoPE query, key and value of every layer, hands them to the active
`StatisticsCollector`, then computes ordinary SDPA attention. Nothing is written to disk and no activation outlives
its forward; the collector keeps float64 sums of size `layers x query_heads x head_dim^2`.

Two statistics, per full-attention layer and KV head h (GQA: `Q_g` stacks the query heads that read KV head h):

- `C_h = sum_t Q_g[t]^T Q_g[t]` and the token count n, so `Sigma_K,h = C_h / n` (kept per query head, with each
  query head's sum, so that the key tilt (`quantization.KeyTilt`) gets every head's mean and covariance);
- with a query covariance `C_h / n` known beforehand, token weights `w_t = k_t^T (C_h / n) k_t` and
  `S_h = sum_t w_t v_t v_t^T`, `W_h = sum_t w_t`, so `Sigma_V,h = S_h / W_h` (weights normalised to mean 1).

The value weights need the query covariance before the values are seen (deferring them would need a fourth-order
moment), so calibration makes two passes. Pass `"query"` accumulates the query covariance used for the weights; pass
`"full"` runs over all fitting tokens and accumulates both the query covariance (the K statistic) and the weighted
value covariance. When pass 1 covers all fitting tokens this is the exact recipe; `calibrate(weight_tokens=...)` may
run pass 1 on a prefix only (the weights then come from a covariance of `weight_tokens` tokens, which for a
`head_dim^2` matrix estimated from `weight_tokens * heads` rows is already converged; the K covariance always uses
every token). A third phase, `"clip"`, runs on held-back tokens and scores candidate clip ratios by the
attention-output error they cause (see `fit.ClipSearch`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

CALIBRATION_ATTENTION = "oscar_calibrate"

_ACTIVE: StatisticsCollector | None = None


class StatisticsCollector:
    """Float64 sums of the query covariance and the score-weighted value covariance, per layer and KV head.

    Args:
        layer_ids: indices of the full-attention layers to observe (sliding-window layers are not quantized).
        num_kv_heads, head_dim: model geometry.
        device: where the sums live (the model's device: the per-chunk products run there).
    """

    def __init__(self, layer_ids: list[int], num_kv_heads: int, head_dim: int, device: torch.device | str = "cpu"):
        self.layer_ids = list(layer_ids)
        self.slot = {layer: i for i, layer in enumerate(self.layer_ids)}
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        n, h, d = len(self.layer_ids), num_kv_heads, head_dim
        kw = dict(dtype=torch.float64, device=device)
        self.query_sums = None  # [layers, query heads, D, D]: per query head, so the key tilt can use each one
        self.query_first = None  # [layers, query heads, D]
        self.query_tokens = torch.zeros(n, **kw)
        self.scaling = None  # the attention's softmax scale, as the model passes it
        self.key_sums = torch.zeros(n, h, d, **kw)  # for the mean key the cache subtracts (`OscarRotations.k_means`)
        self.value_sums = torch.zeros(n, h, d, d, **kw)
        self.value_weights = torch.zeros(n, h, **kw)
        self.phase = "query"
        self.clip_search = None  # set for the "clip" phase
        self._query_cov = None

    # ------------------------------------------------------------------ phases
    def start_value_pass(self) -> None:
        """Freeze the query covariance seen so far as the value-weight metric and restart the sums for pass 2."""
        if not (self.query_tokens > 0).all():
            raise RuntimeError("The query pass saw no tokens for some layers; run it before the value pass.")
        self._query_cov = self.query_covariance()
        self.query_sums.zero_()
        self.query_first.zero_()
        self.query_tokens.zero_()
        self.key_sums.zero_()
        self.phase = "full"

    def query_covariance(self) -> torch.Tensor:
        """`[layers, kv_heads, D, D]`: `Q_g^T Q_g / n` per KV head (the second moment summed over its query heads)."""
        n, hq, d = self.query_sums.shape[0], self.query_sums.shape[1], self.head_dim
        per_kv = self.query_sums.reshape(n, self.num_kv_heads, hq // self.num_kv_heads, d, d).sum(2)
        return per_kv / self.query_tokens.view(-1, 1, 1, 1)

    def query_head_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean [layers, query heads, D], covariance [layers, query heads, D, D])` of each query head."""
        n = self.query_tokens.view(-1, 1, 1)
        mean = self.query_first / n
        return mean, self.query_sums / n.unsqueeze(-1) - mean.unsqueeze(-1) * mean.unsqueeze(-2)

    def key_mean(self) -> torch.Tensor:
        """`[layers, kv_heads, D]`: the mean post-RoPE key per KV head."""
        return self.key_sums / self.query_tokens.view(-1, 1, 1)

    def value_covariance(self) -> torch.Tensor:
        """`[layers, kv_heads, D, D]`: `V^T diag(w) V / sum(w)` per KV head (weights normalised to mean 1)."""
        return self.value_sums / self.value_weights.clamp_min(torch.finfo(torch.float64).tiny).view(
            *self.value_weights.shape, 1, 1
        )

    # ------------------------------------------------------------------ observation
    @torch.no_grad()
    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling) -> None:
        """`query` `[B, Hq, S, D]`, `key`/`value` `[B, Hkv, S, D]`, all post-RoPE, for one layer's forward."""
        slot = self.slot.get(layer_idx)
        if slot is None:
            return
        device = self.query_tokens.device  # layers may sit on other devices (device_map="auto")
        query, key, value = query.to(device), key.to(device), value.to(device)
        b, hq, s, d = query.shape
        hkv = key.shape[1]
        if hkv != self.num_kv_heads or d != self.head_dim:
            raise ValueError(
                f"Layer {layer_idx} produced {hkv} KV heads of head_dim {d}; the collector was built for "
                f"{self.num_kv_heads} x {self.head_dim}."
            )
        if self.phase in ("query", "full"):
            if self.query_sums is None:
                kw = dict(dtype=torch.float64, device=device)
                self.query_sums = torch.zeros(len(self.layer_ids), hq, d, d, **kw)
                self.query_first = torch.zeros(len(self.layer_ids), hq, d, **kw)
            if self.scaling is None:
                self.scaling = float(scaling) if scaling is not None else d**-0.5
            q = query.transpose(0, 1).reshape(hq, -1, d).double()  # [Hq, B*S, D]
            self.query_sums[slot] += q.transpose(1, 2) @ q
            self.query_first[slot] += q.sum(1)
            self.query_tokens[slot] += b * s
            self.key_sums[slot] += key.double().sum(dim=(0, 2))
        if self.phase == "full":
            k = key.double()
            v = value.double()
            cov = self._query_cov[slot]  # [Hkv, D, D]
            w = ((k @ cov.unsqueeze(0)) * k).sum(-1)  # [B, Hkv, S]
            wv = (v * w.unsqueeze(-1)).transpose(0, 1).reshape(hkv, -1, d)
            self.value_sums[slot] += wv.transpose(1, 2) @ v.transpose(0, 1).reshape(hkv, -1, d)
            self.value_weights[slot] += w.sum(dim=(0, 2))
        elif self.phase == "clip":
            self.clip_search.observe(slot, query, key, value, scaling)


def calibration_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention signature: record statistics, then plain SDPA."""
    collector = _ACTIVE
    if collector is not None:
        collector.observe(module.layer_idx, query, key, value, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> None:
    AttentionInterface.register(CALIBRATION_ATTENTION, calibration_attention_forward)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(CALIBRATION_ATTENTION, sdpa_mask)
    except ImportError:  # pragma: no cover
        pass


def _set_attention(model, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (AttributeError, ValueError):
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:  # some versions keep the config untouched on no-op paths
        model.config._attn_implementation = name


@contextmanager
def capturing(model, collector: StatisticsCollector):
    """Route `model`'s attention through the calibration function while the block runs; restore it afterwards."""
    global _ACTIVE
    register()
    previous = model.config._attn_implementation
    _set_attention(model, CALIBRATION_ATTENTION)
    _ACTIVE = collector
    try:
        yield collector
    finally:
        _ACTIVE = None
        _set_attention(model, previous)
