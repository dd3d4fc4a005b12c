"""Checks and accounting of `OscarQuantizedCache` kept out of the cache and layer classes.

- Key centering (a bundle's `k_means`) is exact under softmax only: a model that soft-caps its scores
  (`attn_logit_softcapping`, Gemma 2) passes them through `tanh`, which is not shift-invariant, so it is refused.
- A cache whose every layer slides quantizes nothing: it says so once.
- Memory figures count every layer that holds tokens, the exact sliding-window layers as well as the quantized ones.
- States of another dtype than the one a layer stores are refused instead of silently cast (a bf16 1e6 stored in an
  fp16 layer is inf).
"""

from __future__ import annotations

import functools

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


def softcap_of(config) -> float | None:
    """The score soft-capping of a (text) config, or None."""
    return getattr(config, "attn_logit_softcapping", None) or None


def refuse_key_centering_under_softcap(config, has_key_means: bool, model_name: str, where: str = "The bundle") -> None:
    softcap = softcap_of(config)
    if has_key_means and softcap is not None:
        raise ValueError(
            f"{where} centers keys (stores each key minus a mean key, `k_means`), which is exact only under plain "
            f"softmax; {model_name} soft-caps its attention scores with tanh (attn_logit_softcapping={softcap}), "
            "which is not shift-invariant, so centering would change its logits. Calibrate without --center-keys "
            "for this model."
        )


def warn_if_nothing_quantized(layer_types, model_name: str) -> None:
    if "full_attention" not in layer_types:
        logger.warning_once(
            f"Every attention layer of {model_name} is a sliding-window layer: OscarQuantizedCache keeps them exact "
            "(transformers' sliding-window layer) and quantizes nothing."
        )


def _exact_tensors(layer) -> list[torch.Tensor]:
    return [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor)]


def layer_held_bytes(layer) -> int:
    """Bytes of K/V a cache layer holds for its tokens: the quantized layer's own count, or an exact layer's tensors."""
    if hasattr(layer, "held_bytes"):
        return layer.held_bytes()
    if not getattr(layer, "is_initialized", False):
        return 0
    return sum(t.numel() * t.element_size() for t in _exact_tensors(layer))


def layer_allocated_bytes(layer) -> int:
    """Bytes of every buffer a cache layer owns: the quantized layer's own count, or an exact layer's tensors."""
    return layer.allocated_bytes() if hasattr(layer, "allocated_bytes") else layer_held_bytes(layer)


def layer_held_elements(layer) -> int:
    """K/V elements a cache layer stands for: tokens held x batch x heads x head_dim, keys and values."""
    if not getattr(layer, "is_initialized", False):
        return 0
    if hasattr(layer, "held_bytes"):
        return 2 * layer.batch_size * layer.num_heads * layer.head_dim * layer.get_seq_length()
    return sum(t.numel() for t in _exact_tensors(layer))


def refuse_dtype_change(layer, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
    """Raise when states arrive in another dtype than the layer stores (casting could overflow to inf or round)."""
    for name, states in (("keys", key_states), ("values", value_states)):
        if states.dtype != layer.dtype:
            raise ValueError(
                f"Layer {layer.layer_idx} stores its states in {layer.dtype} but got {name} in {states.dtype}; "
                "casting would silently round or overflow (1e6 in float16 is inf). Run the model in one dtype, or "
                "call `cache.reset()` before changing it."
            )


@functools.cache
def _positive_crop_is_a_length() -> bool:
    """Whether this transformers' `DynamicLayer.crop(n > 0)` keeps `n` tokens (5.17, deprecated) or raises (later)."""
    from transformers.cache_utils import DynamicLayer

    layer = DynamicLayer()
    states = torch.zeros(1, 1, 2, 1)
    layer.update(states, states)
    try:
        layer.crop(1)
    except ValueError:
        return False
    return True


def check_positive_crop(tokens_to_remove: int) -> None:
    """`crop(n > 0)` as transformers' own layers take it: the length to keep where they allow it, an error where not."""
    if tokens_to_remove > 0 and not _positive_crop_is_a_length():
        raise ValueError(
            f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported by this transformers "
            "release. Use a negative integer to remove that number of tokens from the cache instead."
        )
