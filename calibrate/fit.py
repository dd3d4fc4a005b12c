"""From statistics to a bundle: eigendecomposition, `R = U . H . P_br`, and clip ratios fitted on held-back tokens.

Convention (the same as the public OSCAR code and its RotationZoo files): rotations act on row vectors, a key is
stored as `k @ R_K`, the query is rotated as `q @ R_K` and the attention output un-rotated as `o @ R_V^T`.
`torch.linalg.eigh` returns eigenvalues in ascending order with eigenvectors as the columns of U, so `k @ U` gives
the coordinates of k along the eigen-directions; `H` then spreads every eigen-direction over all channels with equal
weight (no channel of the rotated row inherits an outlier direction) and the bit-reversal permutation `P_br`
reorders the resulting channels. With one quantization group per row (group = head_dim, the reference setting),
`P_br` does not change the quantized values (min, max and quantiles of a row are permutation-invariant); it matters
for sub-row groups and is kept so that bundles equal the reference construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oscar_hf.quantization import (
    KeyTilt,
    bit_reversal_permutation,
    dequantize_rows,
    error_feedback_factor,
    hadamard_matrix,
    quantize_rows,
    rotate,
    unrotate,
)

DEFAULT_CLIP_CANDIDATES = (0.86, 0.90, 0.92, 0.94, 0.96, 0.98, 1.0)


def rotation_from_covariance(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`covariance` `[..., D, D]` (symmetric PSD) -> `(R [..., D, D] float32, eigenvalues [..., D] float32)`.

    `R = U . H . P_br`, U the eigenvectors (columns, eigenvalues ascending as `eigh` returns them).
    """
    cov = covariance.double()
    cov = 0.5 * (cov + cov.transpose(-1, -2))  # float64 sums are symmetric up to rounding; eigh wants exactly so
    evals, vecs = torch.linalg.eigh(cov)
    d = cov.shape[-1]
    h = hadamard_matrix(d, torch.float64).to(cov.device)
    rotation = (vecs @ h)[..., bit_reversal_permutation(d).to(cov.device)]
    return rotation.float(), evals.float()


class ClipSearch:
    """Scores clip ratios by the attention-output error of 2-bit keys (or values) on held-back tokens.

    For each held-back sequence and layer, the last `num_queries` positions act as decode queries over the whole
    causal prefix. Keys (then values, separately) in `[sink_tokens, S - num_queries)` are rotated, clipped at each
    candidate ratio, quantized with `oscar_hf.quantization` and dequantized, while the attention sink and the window
    holding the queries stay exact, as in the cache. The score is `sum ||O_c - O||^2`, O the exact output.

    `variants` maps a name to `(R_K, R_V, F_K, F_V, key_mean, key_tilt)`: per-slot rotation stacks
    `[slots, groups, D, D]`, the error-feedback factors the cache would code with (same shape, or None for plain
    rounding), the mean keys `[slots, kv_heads, D]` it would subtract (or None) and the key tilt `(means, maps)`
    (`[slots, kv_heads, G, D]`, `[slots, kv_heads, G, D, D]`, or None); all are scored on the same tokens.
    `k_candidates` / `v_candidates` are the clip ratios tried for keys / values.
    """

    def __init__(
        self,
        variants: dict[str, tuple],
        k_candidates=DEFAULT_CLIP_CANDIDATES,
        v_candidates=DEFAULT_CLIP_CANDIDATES,
        sink_tokens: int = 64,
        num_queries: int = 128,
    ):
        self.variants = variants
        self.candidates = {"k": tuple(float(c) for c in k_candidates), "v": tuple(float(c) for c in v_candidates)}
        self.sink_tokens, self.num_queries = sink_tokens, num_queries
        slots = next(iter(variants.values()))[0].shape[0]
        self.error = {
            kind: {name: torch.zeros(slots, len(c), dtype=torch.float64) for name in variants}
            for kind, c in self.candidates.items()
        }
        self.energy = torch.zeros(slots, dtype=torch.float64)

    @torch.no_grad()
    def observe(self, slot: int, query, key, value, scaling) -> None:
        s = key.shape[-2]
        nq = min(self.num_queries, s // 2)
        lo, hi = min(self.sink_tokens, s - nq), s - nq
        if hi <= lo:
            return
        q = query[:, :, s - nq :].float()
        k, v = key.float(), value.float()
        positions = torch.arange(s, device=k.device)
        mask = positions.unsqueeze(0) <= (positions[s - nq :]).unsqueeze(1)  # [nq, S]
        gqa = q.shape[1] != k.shape[1]

        def attend(keys, values):
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa)

        exact = attend(k, v)
        self.energy[slot] += exact.double().pow(2).sum().cpu()
        for name, (k_rot, v_rot, k_fb, v_fb, k_mean, k_tilt) in self.variants.items():
            rk, rv = k_rot[slot].to(k.device), v_rot[slot].to(k.device)
            k_fb, v_fb = (None if f is None else f[slot] for f in (k_fb, v_fb))
            tilt = None if k_tilt is None else KeyTilt(k_tilt[0][slot], k_tilt[1][slot])
            # A mean key subtracted before quantization and added back is what the cache's shift of all keys does.
            mean = 0.0 if k_mean is None else k_mean[slot].to(k.device, torch.float32)[None, :, None, :]
            k_mid, v_mid = rotate(k[:, :, lo:hi] - mean, rk), rotate(v[:, :, lo:hi], rv)
            for j, c in enumerate(self.candidates["k"]):
                kq = k.clone()
                kq[:, :, lo:hi] = unrotate(dequantize_rows(quantize_rows(k_mid, c, k_fb, tilt)), rk) + mean
                self.error["k"][name][slot, j] += (attend(kq, v) - exact).double().pow(2).sum().cpu()
            for j, c in enumerate(self.candidates["v"]):
                vq = v.clone()
                vq[:, :, lo:hi] = unrotate(dequantize_rows(quantize_rows(v_mid, c, v_fb)), rv)
                self.error["v"][name][slot, j] += (attend(k, vq) - exact).double().pow(2).sum().cpu()

    def best(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-slot `(k_clip, v_clip)` minimising the held-back error of variant `name`."""
        return tuple(
            torch.tensor(self.candidates[kind], dtype=torch.float32)[self.error[kind][name].argmin(-1)]
            for kind in ("k", "v")
        )

    def relative_error(self, name: str, kind: str, clip: torch.Tensor | float) -> torch.Tensor:
        """Per-slot `||O_c - O||^2 / ||O||^2` at the given clip ratio(s) (which must be candidates)."""
        table = self.error[kind][name]
        clip = torch.as_tensor(clip, dtype=torch.float32).expand(table.shape[0])
        cols = [self.candidates[kind].index(round(float(c), 6)) for c in clip]
        err = table[torch.arange(table.shape[0]), torch.tensor(cols)]
        return (err / self.energy.clamp_min(1e-30)).float()


def output_projection_gram(model, layer_idx: int, num_kv_heads: int, head_dim: int) -> torch.Tensor | None:
    """`[kv_heads, D, D]`: for each KV head, `sum_j W_j^T W_j` over the `o_proj` column blocks of the query heads that
    read it -- the metric in which a value error reaches the residual stream. None when the layer has no `o_proj`."""
    try:
        weight = model.get_decoder().layers[layer_idx].self_attn.o_proj.weight
    except AttributeError:
        return None
    w = weight.detach().double().cpu()
    heads = w.shape[1] // head_dim
    if heads * head_dim != w.shape[1] or heads % num_kv_heads:
        return None
    blocks = w.reshape(w.shape[0], heads, head_dim).transpose(0, 1)  # [heads, hidden, D]
    grams = blocks.transpose(1, 2) @ blocks  # [heads, D, D]
    return grams.reshape(num_kv_heads, heads // num_kv_heads, head_dim, head_dim).sum(1)


def feedback_factors(rotation: torch.Tensor, metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the rotated channels by decreasing metric weight (error feedback codes the heaviest first, GPTQ's
    "act order"; a permutation of R's columns changes nothing else) and return `(R', factor)` for
    `quantize_rows(..., feedback=factor)`. `rotation` `[groups, D, D]`, `metric` `[groups or 1, D, D]`
    (original space)."""
    r = rotation.double()
    rotated = r.transpose(-1, -2) @ metric.double() @ r
    order = rotated.diagonal(dim1=-2, dim2=-1).mean(0).argsort(descending=True)
    r = r[..., order]
    rotated = rotated[..., order, :][..., :, order]
    return r.float(), error_feedback_factor(rotated)


def key_tilt_tensors(
    rotation: torch.Tensor,
    query_mean: torch.Tensor,
    query_cov: torch.Tensor,
    strength: float,
    key_mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The key coding's attention tilt for one layer (`quantization.KeyTilt`), in the rotated, reordered space.

    `rotation` `[kv_heads, D, D]` (after `feedback_factors`), `query_mean` `[query heads, D]`, `query_cov`
    `[query heads, D, D]` (original space), `strength` = t * the attention scale. Returns `(factor of S, means,
    maps)`: `[kv_heads, D, D]`, `[kv_heads, G, D]`, `[kv_heads, G, D, D]`. With centred keys (`key_mean`
    `[kv_heads, D]` subtracted before coding) the means absorb the mean key's share, `mean + k_mean @ map`, so that
    the tilt still follows the true key.
    """
    heads, d = rotation.shape[0], rotation.shape[-1]
    group = query_mean.shape[0] // heads
    r = rotation.double().unsqueeze(1)  # [kv_heads, 1, D, D]
    mean = query_mean.double().reshape(heads, group, 1, d) @ r  # [kv_heads, G, 1, D]
    cov = r.transpose(-1, -2) @ query_cov.double().reshape(heads, group, d, d) @ r
    maps = strength * cov
    if key_mean is not None:
        mean = mean + (key_mean.double().reshape(heads, 1, 1, d) @ r) @ maps
    return error_feedback_factor(cov.sum(1)), mean.squeeze(2).float(), maps.float()
