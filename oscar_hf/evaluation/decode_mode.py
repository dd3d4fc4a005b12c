"""Decode-mode quality measurement: how far a KV cache moves a model's next-token distributions from an exact cache.

Decode mode is how a cache is used in serving: the prompt is prefilled in one forward (exact attention), then tokens
are fed one at a time through the cache (teacher forcing), so every step attends over the quantized history.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..cache import cache_keyword

# Attributes under which transformers' cache layers keep their tensors: `keys`/`values` for the exact layers and the
# residual window of `QuantizedLayer`, `_quantized_keys`/`_quantized_values` for its quantized history.
_LAYER_TENSORS = ("keys", "values", "_quantized_keys", "_quantized_values")


@dataclass
class DecodeRun:
    """Per-step log-probabilities of one decode-mode run: `logprobs` `[steps, vocab]` float32 on CPU."""

    logprobs: torch.Tensor
    targets: torch.Tensor
    cache: object = None


@torch.no_grad()
def decode_mode_run(
    model,
    tokens: torch.Tensor,
    prefix_tokens: int,
    cache=None,
    progress: bool = False,
    desc: str = "decode",
) -> DecodeRun:
    """Prefill `tokens[:prefix_tokens]`, then feed the rest one token per forward through `cache`.

    Returns the log-probabilities predicted for tokens `prefix_tokens .. len(tokens)-1` (one per step: the prefill's
    last position predicts the first, each fed token predicts the next).
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if prefix_tokens < 1 or prefix_tokens >= tokens.numel():
        raise ValueError(f"prefix_tokens must be in [1, {tokens.numel() - 1}], got {prefix_tokens}.")
    device = model.device
    ids = tokens.to(device).unsqueeze(0)
    cache = cache if cache is not None else DynamicCache(config=model.config)
    keyword = cache_keyword(model)
    out = model(input_ids=ids[:, :prefix_tokens], **{keyword: cache}, use_cache=True, logits_to_keep=1)
    rows = [torch.log_softmax(out.logits[0, -1].float(), -1).cpu()]
    steps = range(prefix_tokens, tokens.numel() - 1)
    for pos in tqdm(steps, desc=desc, disable=not progress, leave=False):
        out = model(input_ids=ids[:, pos : pos + 1], **{keyword: cache}, use_cache=True)
        rows.append(torch.log_softmax(out.logits[0, -1].float(), -1).cpu())
    return DecodeRun(torch.stack(rows), tokens[prefix_tokens:].clone(), cache)


def compare_runs(reference: DecodeRun, candidate: DecodeRun) -> dict[str, float]:
    """KL(reference || candidate) mean and 99th percentile, top-1 agreement, and the candidate's perplexity."""
    p_log, q_log = reference.logprobs, candidate.logprobs
    kl = (p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0)
    nll = -candidate.logprobs.gather(-1, candidate.targets.unsqueeze(-1)).squeeze(-1)
    return {
        "kl_mean": kl.mean().item(),
        "kl_p99": torch.quantile(kl, 0.99).item(),
        "top1_agreement": (p_log.argmax(-1) == q_log.argmax(-1)).float().mean().item(),
        "perplexity": nll.mean().exp().item(),
        "kl_per_step": kl,
    }


def evaluate_caches(
    model,
    tokens: torch.Tensor,
    prefix_tokens: int,
    cache_factories: dict[str, Callable[[], object]],
    progress: bool = False,
) -> dict[str, dict]:
    """Run decode mode for an exact `DynamicCache` and each named cache; compare every cache to the exact one."""
    reference = decode_mode_run(model, tokens, prefix_tokens, progress=progress, desc="exact")
    results = {"exact": compare_runs(reference, reference)}
    results["exact"].update(kv_bits_per_element=cache_kv_bits_per_element(reference.cache),
                            kv_bytes=cache_kv_bytes(reference.cache))
    for name, factory in cache_factories.items():
        run = decode_mode_run(model, tokens, prefix_tokens, cache=factory(), progress=progress, desc=name)
        metrics = compare_runs(reference, run)
        metrics["kv_bits_per_element"] = cache_kv_bits_per_element(run.cache)
        metrics["kv_bytes"] = cache_kv_bytes(run.cache)
        results[name] = metrics
    return results


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's data; quantized tensor subclasses (optimum-quanto's `QTensor`) are opened up into the
    plain tensors they hold (packed codes, scales, shifts), because their own `numel` counts logical values."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) is not torch.Tensor:
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def cache_kv_bytes(cache) -> int:
    """Bytes of K/V data a cache holds for its valid tokens (spare capacity not counted).

    `OscarQuantizedCache` answers itself (`held_bytes`); for transformers' caches (`DynamicCache`, `QuantizedCache`)
    the tensors of every layer are summed, quantized ones counted by what they really store.
    """
    held = getattr(cache, "held_bytes", None)
    if held is not None:
        return int(held())
    total = 0
    for layer in cache.layers:
        for name in _LAYER_TENSORS:
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += _tensor_bytes(tensor)
    return total


def _layer_row_elements(layer) -> int:
    """`batch * kv_heads * head_dim` of a transformers cache layer, read from whichever 4-D tensor it holds."""
    for name in _LAYER_TENSORS:
        tensor = getattr(layer, name, None)
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 4:
            batch, heads, _, head_dim = tensor.shape
            return batch * heads * head_dim
    return 0


def cache_kv_bits_per_element(cache) -> float:
    """Bits per cached K/V element, from the bytes actually held (`cache_kv_bytes`) over the logical K/V elements."""
    bits = getattr(cache, "kv_bits_per_element", None)
    if bits is not None:
        return float(bits())
    elements = sum(2 * _layer_row_elements(layer) * layer.get_seq_length() for layer in cache.layers)
    if elements == 0:
        raise ValueError("The cache holds no tokens yet: run a forward pass first.")
    return 8 * cache_kv_bytes(cache) / elements


def smooth(values: torch.Tensor, window: int) -> torch.Tensor:
    """Trailing moving average over `window` steps (shorter at the start), for plotting noisy per-step KL."""
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if window <= 1 or values.numel() == 0:
        return values
    csum = torch.cat([values.new_zeros(1), values.cumsum(0)])
    idx = torch.arange(1, values.numel() + 1)
    lo = (idx - window).clamp_min(0)
    return (csum[idx] - csum[lo]) / (idx - lo)
