"""What the cache needs to know of a model's shape: its decoder stack, KV heads, head_dim and the type of each layer.

Layer types are read the way transformers reads them for its own caches (`cache_utils.get_layer_types_and_kwargs`,
which follows per-layer configs, KV sharing and legacy type names) where the installed transformers has that helper,
and inferred from `layer_types` / `sliding_window` as older releases do otherwise.
"""

from __future__ import annotations

from typing import NamedTuple

from transformers import PretrainedConfig


class ModelGeometry(NamedTuple):
    """The decoder geometry of a model (`text_config` is the decoder's own config)."""

    text_config: PretrainedConfig
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layer_types: list[str]
    sliding_windows: list[int | None]


def _layer_types_and_windows(config: PretrainedConfig, num_layers: int) -> tuple[list[str], list[int | None]]:
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # transformers < 5.2x: no per-layer configs
        get_layer_types_and_kwargs = None
    if get_layer_types_and_kwargs is not None and hasattr(config, "per_layer_config"):
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
        if isinstance(layer_kwargs, dict):  # transformers 5.17: one set of keywords, the sliding layers' window
            window = layer_kwargs.get("sliding_window")
            return list(layer_types), [window if t == "sliding_attention" else None for t in layer_types]
        return list(layer_types), [kwargs.get("sliding_window") for kwargs in layer_kwargs]
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is None:
        sliding = window is not None and getattr(config, "use_sliding_window", True)
        layer_types = ["sliding_attention" if sliding else "full_attention"] * num_layers
    layer_types = list(layer_types)
    return layer_types, [window if t == "sliding_attention" else None for t in layer_types]


def model_geometry(config: PretrainedConfig) -> ModelGeometry:
    """The geometry of a decoder config; a `ValueError` for models whose cache is not per-head keys and values of one
    decoder stack (encoder-decoder models, multi-head latent attention, configs without heads)."""
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"OscarQuantizedCache is for decoder-only models; {config.model_type} is an encoder-decoder model, whose "
            "generate() needs an EncoderDecoderCache. Use transformers' caches for it."
        )
    config = config.get_text_config(decoder=True)
    if getattr(config, "kv_lora_rank", None) is not None:
        raise ValueError(
            f"{config.model_type} uses multi-head latent attention (MLA): its cache holds a compressed latent and "
            "keys and values of different head sizes, not the per-head keys and values OSCAR rotates. "
            "Use transformers' caches for it."
        )
    for name in ("num_hidden_layers", "num_attention_heads"):
        if getattr(config, name, None) is None:
            raise ValueError(
                f"{type(config).__name__} has no `{name}`: OscarQuantizedCache needs a decoder config with "
                "`num_hidden_layers`, `num_attention_heads` and optionally `num_key_value_heads` and `head_dim`."
            )
    num_layers = config.num_hidden_layers
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layer_types, windows = _layer_types_and_windows(config, num_layers)
    return ModelGeometry(config, num_layers, num_kv_heads, head_dim, layer_types, windows)


def model_name(text_config: PretrainedConfig) -> str:
    """How errors name a model: its path or Hub id, else its type."""
    return getattr(text_config, "_name_or_path", None) or text_config.model_type
