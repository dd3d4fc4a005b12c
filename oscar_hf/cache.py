"""`OscarQuantizedCache`: a transformers `Cache` of `OscarQuantizedLayer`s, built from an `OscarRotations` bundle."""

from __future__ import annotations

import inspect

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer
from transformers.utils import logging

from .attention import OSCAR_ATTENTION
from .cache_checks import (
    layer_allocated_bytes,
    layer_held_bytes,
    layer_held_elements,
    refuse_key_centering_under_softcap,
    warn_if_nothing_quantized,
)
from .geometry import model_geometry
from .geometry import model_name as name_of
from .layer import OscarQuantizedLayer
from .quantization import CODES_PER_BYTE
from .rotations import OscarRotations
from .tensor_parallel import configured_tp_size, heads_mismatch, infer_shard

logger = logging.get_logger(__name__)

# With the "oscar" attention function, a static layer's decode step is written by that function, in the launch that
# also rotates the query (`oscar_hf::append_decode_attention`): one launch fewer a layer. False writes it in `update`
# (two ops, the same tokens); research scripts flip it to time both.
DEFER_WINDOW_WRITE = True

# The exact windows of a bundle that records none, and of the calibration-free baselines.
DEFAULT_SINK_TOKENS = 64
DEFAULT_RECENT_TOKENS = 256


def cache_windows(
    rotations: OscarRotations | None, sink_tokens: int | None = None, recent_tokens: int | None = None
) -> dict[str, int]:
    """The exact windows a cache uses: each value passed, else the one the bundle records (`OscarRotations.windows`),
    else `DEFAULT_SINK_TOKENS` / `DEFAULT_RECENT_TOKENS`."""
    recorded = (rotations.windows if rotations is not None else None) or {
        "sink_tokens": DEFAULT_SINK_TOKENS, "recent_tokens": DEFAULT_RECENT_TOKENS,
    }
    return {
        "sink_tokens": recorded["sink_tokens"] if sink_tokens is None else sink_tokens,
        "recent_tokens": recorded["recent_tokens"] if recent_tokens is None else recent_tokens,
    }


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword under which `model` (its `forward`, and so `generate`) takes a cache.

    transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40 for `forward`, 6.0 for
    `generate`); earlier releases know only `past_key_values`. Call as `model(ids, **{cache_keyword(model): cache})`.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class OscarQuantizedCache(Cache):
    """A 2-bit KV cache with BF16 attention-sink and recent windows, for `model.generate(cache=...)`
    (`past_key_values=` before
    transformers 5.24).

    Args:
        config: the model's config (`model.config`).
        rotations: an `OscarRotations` bundle, or `None` with `method="hadamard"`/`"naive"`.
        method: `"oscar"`, `"hadamard"` or `"naive"`; defaults to the bundle's method.
        sink_tokens: leading tokens kept exact. Default: the windows the bundle records (`OscarRotations.windows`, the
            ones it was calibrated and evaluated with), else 64. A value passed wins; one that differs from the
            bundle's is logged once (at info level).
        recent_tokens: newest tokens kept exact. Default: the bundle's recorded windows, else 256.
        k_clip_ratio, v_clip_ratio: override the bundle's clip quantiles (defaults 0.96 / 0.92; naive: 1.0).
        demote_block: recent tokens quantized together when the window overflows (default 64).
        max_cache_len: allocate every buffer once for this many tokens (prompt + new tokens). The cache is then static:
            its decode step reads nothing back to the host, and `generate()` compiles it (on CUDA by default, with
            `compile_config` elsewhere) and replays it across demotions. Without it the body grows and decoding is
            eager.
        check_finite: raise a `ValueError` on NaN/Inf keys or values (one host sync per layer and step).
        key_grid_refit: after the key codes of an error-feedback bundle are chosen, refit each key row's scale and
            offset by least squares in its coding metric (`quantization.refit_grid`; same format). Experimental, off by
            default: it runs in PyTorch after the write kernel and has been measured on the CPU only (lower KL on
            validation segments, level on the evaluation segments; benchmarks/RESULTS.md).
        tp_rank, tp_size: under tensor parallelism, this process's rank in its tensor-parallel group and the group's
            size: the cache keeps that rank's KV heads of every per-head bundle tensor
            (`OscarRotations.tensor_parallel_shard`). Leave both unset under transformers' `tp_plan="auto"`: when a
            layer's first states carry `H / N` of the model's `H` KV heads, the cache takes `N` from the two counts
            and the rank from torch.distributed (`get_rank() % N`, the `tp` coordinate of transformers' device mesh)
            and cuts the shard then (`oscar_hf.tensor_parallel`). Pass them for a device mesh of another layout
            (`tp_rank=mesh["tp"].get_local_rank(), tp_size=mesh["tp"].size()`). Either way `cache.rotations` is then
            the rank's shard, `cache.tp_rank` / `cache.tp_size` say which (`0` / `1` without tensor parallelism; unset
            until the first update when left to the cache), and the memory figures count the rank's heads.

    Full-attention layers are quantized; sliding-window layers (Gemma 2/3, Mistral) keep transformers' exact
    sliding-window layer, which is already bounded in size. Use `attn_implementation="oscar"` when loading the model
    so that decode reads the 2-bit storage directly; with another attention implementation the cache still works but
    hands attention a dequantized copy of the history at every step.

    On CUDA, `generate()` reads its stop decision one step late with this cache (`defer_stop_check`, on by default;
    `oscar_hf.deferred_stop`): the host queues the next step while the GPU runs this one, and a step decoded past the
    end is undone with `crop`. The tokens and the cache generate() returns are those of the per-step check.
    """

    # generate() defers its stop check with this cache on CUDA (oscar_hf.deferred_stop); False: it checks every step.
    defer_stop_check = True

    def __init__(
        self,
        config: PretrainedConfig,
        rotations: OscarRotations | None = None,
        method: str | None = None,
        *,
        sink_tokens: int | None = None,
        recent_tokens: int | None = None,
        k_clip_ratio: float | None = None,
        v_clip_ratio: float | None = None,
        demote_block: int = 64,
        max_cache_len: int | None = None,
        check_finite: bool = False,
        key_grid_refit: bool = False,
        tp_rank: int | None = None,
        tp_size: int | None = None,
    ):
        for name, value, low in (
            ("sink_tokens", sink_tokens, 0),
            ("recent_tokens", recent_tokens, 0),
            ("demote_block", demote_block, 1),
        ):
            if value is None and name != "demote_block":
                continue  # the bundle's recorded window, below
            if not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
        if (tp_rank is None) != (tp_size is None):
            raise ValueError(
                f"Pass `tp_rank` and `tp_size` together (got tp_rank={tp_rank!r}, tp_size={tp_size!r}), or neither to "
                "let the cache find them when the first states arrive."
            )
        if max_cache_len is not None and (not isinstance(max_cache_len, int) or max_cache_len < 1):
            raise ValueError(f"`max_cache_len` must be a positive integer or None, got {max_cache_len!r}.")
        for name, value in (("k_clip_ratio", k_clip_ratio), ("v_clip_ratio", v_clip_ratio)):
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"`{name}` is a quantile and must lie in (0, 1], got {value!r}.")

        text_config, num_layers, num_kv_heads, head_dim, layer_types, windows = model_geometry(config)
        method = method or (rotations.method if rotations is not None else None)
        if method is None:
            raise ValueError(
                "Pass `rotations=` (an OscarRotations bundle, see `OscarQuantizedCache.from_pretrained`) or a "
                "calibration-free baseline `method='hadamard'` or `method='naive'`."
            )
        if rotations is None:
            rotations = OscarRotations.data_free(method, num_layers, num_kv_heads, head_dim, k_clip_ratio, v_clip_ratio)
        elif method != rotations.method:
            raise ValueError(f"method={method!r} does not match the bundle's method {rotations.method!r}.")
        if rotations.tensor_parallel is not None:
            shard = rotations.tensor_parallel
            raise ValueError(
                f"`rotations` is the tensor-parallel shard of rank {shard['rank']} of {shard['size']}: pass the whole "
                "bundle. The cache cuts each rank's shard itself (pass `tp_rank=` and `tp_size=` to choose the rank)."
            )
        model_name = name_of(text_config)
        rotations.check_compatible(num_layers, num_kv_heads, head_dim, model_name=model_name)
        unsupported = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unsupported:
            raise ValueError(
                f"OscarQuantizedCache supports full and sliding-window attention layers; {model_name} has layer types "
                f"{unsupported}."
            )

        if "full_attention" in layer_types and head_dim % CODES_PER_BYTE:
            raise ValueError(
                f"{model_name} has head_dim {head_dim}, but 2-bit codes are packed {CODES_PER_BYTE} to a byte along "
                f"head_dim, which must be a multiple of {CODES_PER_BYTE}. Use transformers' caches for this model."
            )

        refuse_key_centering_under_softcap(text_config, rotations.k_means is not None, model_name)
        warn_if_nothing_quantized(layer_types, model_name)
        chosen = cache_windows(rotations, sink_tokens, recent_tokens)
        recorded = rotations.windows
        if recorded is not None and chosen != recorded:
            logger.info_once(
                f"OscarQuantizedCache: windows sink_tokens={chosen['sink_tokens']}, "
                f"recent_tokens={chosen['recent_tokens']} as passed; the bundle records "
                f"sink_tokens={recorded['sink_tokens']}, recent_tokens={recorded['recent_tokens']}."
            )
        self.sink_tokens, self.recent_tokens = chosen["sink_tokens"], chosen["recent_tokens"]
        self._layer_options = dict(
            sink_tokens=self.sink_tokens,
            recent_tokens=self.recent_tokens,
            demote_block=demote_block,
            max_cache_len=max_cache_len,
            check_finite=check_finite,
            key_grid_refit=bool(key_grid_refit),
        )
        self._clip_overrides = (k_clip_ratio, v_clip_ratio)
        self._model_kv_heads, self._model_name = num_kv_heads, model_name
        self._tp_size_in_config = configured_tp_size(config) or configured_tp_size(text_config)
        self._explicit_tp = tp_size is not None
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.rotations = rotations if tp_size is None else rotations.tensor_parallel_shard(tp_rank, tp_size)
        layers = [
            DynamicSlidingWindowLayer(sliding_window=windows[idx])
            if layer_type == "sliding_attention" else self._quantized_layer(idx)
            for idx, layer_type in enumerate(layer_types)
        ]
        super().__init__(layers=layers)
        self.config = text_config
        self.method = method

    def _quantized_layer(self, idx: int) -> OscarQuantizedLayer:
        """Layer `idx` as `self.rotations` (the whole bundle or this rank's shard) and the keyword options make it."""
        rotations = self.rotations
        k_rot, v_rot = rotations.layer_rotations(idx)
        k_feedback, v_feedback = rotations.layer_feedback(idx)
        k_clip, v_clip = self._clip_overrides
        return OscarQuantizedLayer(
            k_rot,
            v_rot,
            k_clip if k_clip is not None else float(rotations.k_clip_ratios[idx]),
            v_clip if v_clip is not None else float(rotations.v_clip_ratios[idx]),
            layer_idx=idx,
            k_feedback=k_feedback,
            v_feedback=v_feedback,
            k_mean=rotations.layer_key_mean(idx),
            k_tilt=rotations.layer_key_tilt(idx),
            **self._layer_options,
        )

    def _match_kv_heads(self, layer_idx: int, heads: int) -> None:
        """Before a quantized layer takes its first states: serve the KV heads they carry. The whole model's heads
        settle the cache as untouched by tensor parallelism; `H / N` of them (the cache not yet settled) make it cut
        the rank's shard of the bundle and rebuild its quantized layers, none of which holds states yet (see
        `oscar_hf.tensor_parallel`). Anything else raises, naming the heads expected."""
        if heads == self.rotations.num_kv_heads:
            if self.tp_size is None:
                self.tp_rank, self.tp_size = 0, 1
            return
        if self.tp_size is not None:
            raise heads_mismatch(
                layer_idx, heads, self.rotations.num_kv_heads, self.tp_rank, self.tp_size, self._model_kv_heads,
                self._model_name, self._explicit_tp,
            )
        rank, size = infer_shard(layer_idx, heads, self._model_kv_heads, self._tp_size_in_config, self._model_name)
        self.rotations = self.rotations.tensor_parallel_shard(rank, size)
        self.tp_rank, self.tp_size = rank, size
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, OscarQuantizedLayer):
                self.layers[idx] = self._quantized_layer(idx)
        logger.info_once(
            f"OscarQuantizedCache: tensor-parallel rank {rank} of {size}, serving KV heads "
            f"[{rank * heads}, {(rank + 1) * heads}) of {self._model_kv_heads}."
        )

    def early_initialization(self, batch_size, num_heads, head_dim, dtype, device):
        """transformers' eager allocation (`Cache.early_initialization`), after the head count is matched as for a
        first update (`_match_kv_heads`)."""
        counts = [num_heads] * len(self.layers) if isinstance(num_heads, int) else list(num_heads)
        for idx, (layer, heads) in enumerate(zip(self.layers, counts)):
            if isinstance(layer, OscarQuantizedLayer) and not layer.is_initialized:
                self._match_kv_heads(idx, heads)
        return super().early_initialization(batch_size, num_heads, head_dim, dtype, device)

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: str,
        config: PretrainedConfig,
        revision: str | None = None,
        *,
        cache_dir=None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        endpoint: str | None = None,
        **cache_kwargs,
    ) -> OscarQuantizedCache:
        """Build the cache from a rotation bundle on the Hub or in a directory.

        `cache_kwargs` are the keyword arguments of `__init__` (`sink_tokens`, `recent_tokens`, `k_clip_ratio`,
        `tp_rank`, `tp_size`, ...); the windows default to those the bundle records. The bundle is checked against
        `config`: rotations made for another model raise a `ValueError`. Under `tp_plan="auto"` pass `model.config` as
        on one process: each rank's cache cuts its shard of the bundle when the first states arrive.
        """
        rotations = OscarRotations.from_pretrained(
            repo_id_or_dir,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            endpoint=endpoint,
            config=config,
        )
        return cls(config, rotations=rotations, **cache_kwargs)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"This cache was built for {len(self.layers)} decoder layers but got states for layer {layer_idx}: it "
                "is being used with another model. Build one cache per model from that model's config."
            )
        layer = self.layers[layer_idx]
        if isinstance(layer, OscarQuantizedLayer):
            if not layer.is_initialized:
                self._match_kv_heads(layer_idx, key_states.shape[1])
                layer = self.layers[layer_idx]  # rebuilt when the cache has just cut its tensor-parallel shard
            reads_segments = getattr(self.config, "_attn_implementation", None) == OSCAR_ATTENTION
            return layer.update(key_states, value_states, return_segments=reads_segments,
                                defer_write=reads_segments and DEFER_WINDOW_WRITE)
        return layer.update(key_states, value_states, *args, **kwargs)

    def get_query_offset(self, layer_idx: int = 0):
        """Where the next queries start. For a static layer it is a 0-dim device tensor, as transformers'
        `StaticLayer` gives: generate() builds each step's mask from it before the step, and a host int would wait
        for the device to finish the previous step (the stall `defer_stop_check` removes)."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if isinstance(layer, OscarQuantizedLayer) and layer.static and layer.is_initialized:
            return layer.device_seq_length()
        return super().get_query_offset(layer_idx)

    @property
    def is_compileable(self) -> bool:
        """Whether `generate()` may compile the decode step: every layer static (`max_cache_len`), none checking
        finiteness or refitting grids, no sliding-window layer (they grow), and the `"oscar"` attention function (any
        other gets a dequantized copy of the history, read on the host)."""
        layers = self.quantized_layers()
        if not layers or len(layers) != len(self.layers):
            return False
        if any(layer.max_cache_len is None for layer in layers):
            logger.warning_once(
                "OscarQuantizedCache: compiled decoding (generate() on CUDA, or a compile_config) needs a static "
                "cache; "
                "build it with max_cache_len=<prompt + new tokens>. This cache decodes eagerly."
            )
            return False
        return all(layer.is_compileable for layer in layers) and (
            getattr(self.config, "_attn_implementation", None) == OSCAR_ATTENTION
        )

    def quantized_layers(self) -> list[OscarQuantizedLayer]:
        return [layer for layer in self.layers if isinstance(layer, OscarQuantizedLayer)]

    def kv_bits_per_element(self) -> float:
        """Bits per cached K/V element, from the bytes every layer actually holds (sink, body with scales and offsets,
        recent window; exact sliding-window layers too); spare capacity is not counted (see `allocated_bytes`)."""
        elements = sum(layer_held_elements(layer) for layer in self.layers)
        if elements == 0:
            raise ValueError("The cache holds no tokens yet: run a forward pass first.")
        return 8 * self.held_bytes() / elements

    def held_bytes(self) -> int:
        """Bytes of K/V data held by every layer (valid tokens only), exact sliding-window layers included."""
        return sum(layer_held_bytes(layer) for layer in self.layers)

    def allocated_bytes(self) -> int:
        """Bytes of every buffer of the quantized layers, spare capacity included, and of the exact layers' states."""
        return sum(layer_allocated_bytes(layer) for layer in self.layers)
