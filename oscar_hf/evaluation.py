"""Decode-mode quality measurement: how far a KV cache moves a model's next-token distributions from an exact cache.

Decode mode is how a cache is used in serving: the prompt is prefilled in one forward (exact attention), then tokens
are fed one at a time through the cache (teacher forcing), so every step attends over the quantized history.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from tqdm.auto import tqdm


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
    out = model(input_ids=ids[:, :prefix_tokens], past_key_values=cache, use_cache=True, logits_to_keep=1)
    rows = [torch.log_softmax(out.logits[0, -1].float(), -1).cpu()]
    steps = range(prefix_tokens, tokens.numel() - 1)
    for pos in tqdm(steps, desc=desc, disable=not progress, leave=False):
        out = model(input_ids=ids[:, pos : pos + 1], past_key_values=cache, use_cache=True)
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
    for name, factory in cache_factories.items():
        run = decode_mode_run(model, tokens, prefix_tokens, cache=factory(), progress=progress, desc=name)
        metrics = compare_runs(reference, run)
        bits = getattr(run.cache, "kv_bits_per_element", None)
        metrics["kv_bits_per_element"] = bits() if bits is not None else None
        results[name] = metrics
    return results
