"""`OscarQuantizedLayer`: one decoder layer's mixed-precision KV storage.

A layer keeps three segments, in token order:

- **sink**: the first `sink_tokens` tokens ever written, in the model dtype (attention sinks are read by every query
  and are few, so they stay exact);
- **body**: everything between, quantized to 2 bits per value (`quantization.quantize_rows`), appended to and never
  re-quantized;
- **recent**: the newest tokens, in the model dtype. It holds between `recent_tokens` and
  `recent_tokens + demote_block - 1` tokens: once it reaches `recent_tokens + demote_block`, its oldest
  `demote_block` (or a multiple) are quantized and moved to the body in one go.

Every segment is stored *rotated* (keys by R_K, values by R_V), so attention runs in the rotated space: the query is
rotated by R_K once and the output un-rotated by R_V^T once.

The body is preallocated and grows geometrically (or is sized once by `max_cache_len`), so a decode step never copies
the history; the recent window is a fixed buffer written in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from .attention_checks import segments_misused
from .cache_checks import check_positive_crop, refuse_dtype_change
from .quantization import (
    CODES_PER_BYTE,
    PARAM_DTYPE,
    KeyTilt,
    QuantizedRows,
    dequantize_rows,
    metric_from_factor,
    quantize_rows,
    read_token_pairs,
    refit_grid,
    rotate,
    unrotate,
    write_token_pairs,
)

# Body growth: a page granularity so that small contexts do not reallocate every demotion, and a growth factor that
# keeps the amortised copy cost constant per token while wasting at most a third of the capacity.
_BODY_PAGE = 1024
_BODY_GROWTH = 1.5
# Quantizing a long prompt in slices bounds the float32 temporaries of the reference quantizer.
_QUANTIZE_SLICE_ROWS = 1 << 20
_TILT_SLICE_TOKENS = 2048


@dataclass
class OscarSegments:
    """What an `OscarQuantizedLayer.update` hands the `"oscar"` attention function instead of key/value tensors.

    `num_new` tokens were just appended; `new_keys`/`new_values` are their rotated rows in the model dtype. The layer
    may already have demoted some of them to 2 bits (a long chunk), but the tokens of the current forward attend to
    each other exactly, so attention reads them from here rather than from the body.
    """

    layer: "OscarQuantizedLayer"
    num_new: int
    new_keys: torch.Tensor
    new_values: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """`[batch, kv_heads, kv_length, head_dim]`, as the key tensor it stands for."""
        layer = self.layer
        return torch.Size((layer.batch_size, layer.num_heads, layer.get_seq_length(), layer.head_dim))

    def rotated_keys_values(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All `kv_length` rotated keys and values, the 2-bit body dequantized and the new tokens exact."""
        keys, values = self.layer.dequantized_rotated(dtype or self.new_keys.dtype)
        if self.num_new:
            keys[..., -self.num_new :, :] = self.new_keys.to(keys.dtype)
            values[..., -self.num_new :, :] = self.new_values.to(values.dtype)
        return keys, values

    # Another attention function handed these by a cache built for "oscar" fails with the reason, not a bare TypeError.
    def __getattr__(self, name):
        raise AttributeError(name if name.startswith("__") else segments_misused(name))

    def __getitem__(self, index):
        raise TypeError(segments_misused("[...]"))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise TypeError(segments_misused(getattr(func, "__name__", str(func))))


class OscarQuantizedLayer(CacheLayerMixin):
    """Sink (model dtype) + 2-bit body + recent window (model dtype) for one full-attention layer.

    Args:
        k_rotation, v_rotation: `[groups, head_dim, head_dim]` (groups 1 or num_kv_heads), or `None` for no rotation.
        k_clip_ratio, v_clip_ratio: per-row clip quantiles in (0, 1] applied before quantization.
        sink_tokens, recent_tokens: sizes of the two exact windows.
        demote_block: how many recent tokens are quantized together once the window overflows.
        max_cache_len: if given, the body is allocated once for this many tokens (static shapes, no regrowth).
        check_finite: raise on NaN/Inf keys or values (costs a host sync per update; off by default).
        key_grid_refit: refit each demoted key row's scale and offset in its coding metric
            (`quantization.refit_grid`) after error-feedback coding; without a key feedback factor it does nothing.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(
        self,
        k_rotation: torch.Tensor | None,
        v_rotation: torch.Tensor | None,
        k_clip_ratio: float,
        v_clip_ratio: float,
        sink_tokens: int = 64,
        recent_tokens: int = 256,
        demote_block: int = 64,
        max_cache_len: int | None = None,
        check_finite: bool = False,
        layer_idx: int | None = None,
        k_feedback: torch.Tensor | None = None,
        v_feedback: torch.Tensor | None = None,
        k_mean: torch.Tensor | None = None,
        k_tilt: KeyTilt | None = None,
        key_grid_refit: bool = False,
    ):
        super().__init__()
        self.k_rotation_init = k_rotation
        self.v_rotation_init = v_rotation
        self.k_clip_ratio = float(k_clip_ratio)
        self.v_clip_ratio = float(v_clip_ratio)
        self.sink_tokens = sink_tokens
        self.recent_tokens = recent_tokens
        self.demote_block = demote_block
        self.max_cache_len = max_cache_len
        self.check_finite = check_finite
        self.layer_idx = layer_idx
        self.k_feedback_init, self.v_feedback_init = k_feedback, v_feedback
        self.k_mean_init = k_mean
        self.k_tilt_init = k_tilt
        self.key_grid_refit = bool(key_grid_refit)
        self.sink_len = self.body_len = self.recent_len = 0
        # CUDA-graph decoding (`oscar_hf.graphs`): single-token appends go to a device-side index and the kernels read
        # the segment lengths from `self.lengths`, so one captured step replays for every position.
        self.graph_mode = False

    def __repr__(self):
        return (
            f"OscarQuantizedLayer(sink={self.sink_len}/{self.sink_tokens}, body={self.body_len}, "
            f"recent={self.recent_len}/{self.recent_tokens})"
        )

    # ------------------------------------------------------------------ storage
    @property
    def recent_capacity(self) -> int:
        return self.recent_tokens + self.demote_block - 1

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        if head_dim % CODES_PER_BYTE:
            raise ValueError(f"head_dim must be a multiple of {CODES_PER_BYTE} for 2-bit packing, got {head_dim}.")
        for name, rot in (("K", self.k_rotation_init), ("V", self.v_rotation_init)):
            if rot is not None and (rot.shape[-1] != head_dim or rot.shape[0] not in (1, heads)):
                raise ValueError(
                    f"The {name} rotation of layer {self.layer_idx} has shape {tuple(rot.shape)}, but the model's "
                    f"states have {heads} KV heads of head_dim {head_dim}: the rotations were made for another model."
                )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads, self.head_dim = batch, heads, head_dim
        # Contiguous, so that the kernels read them in place instead of copying them every step.
        self.k_rotation = None if self.k_rotation_init is None else self.k_rotation_init.to(self.device, torch.float32).contiguous()
        self.v_rotation = None if self.v_rotation_init is None else self.v_rotation_init.to(self.device, torch.float32).contiguous()
        self.k_feedback = None if self.k_feedback_init is None else self.k_feedback_init.to(self.device, torch.float32)
        # The key feedback's metric, which the grid refit solves in (`key_grid_refit`; None: no refit).
        self.k_metric = (
            metric_from_factor(self.k_feedback) if self.key_grid_refit and self.k_feedback is not None else None
        )
        self.v_feedback = None if self.v_feedback_init is None else self.v_feedback_init.to(self.device, torch.float32)
        self.k_tilt = None
        if self.k_tilt_init is not None:
            t = self.k_tilt_init
            if t.means.shape[0] != heads or t.means.shape[-1] != head_dim:
                raise ValueError(
                    f"The key tilt of layer {self.layer_idx} has shape {tuple(t.means.shape)}, but the model's states "
                    f"have {heads} KV heads of head_dim {head_dim}: the bundle was made for another model."
                )
            self.k_tilt = KeyTilt(t.means.to(self.device, torch.float32), t.maps.to(self.device, torch.float32))
        # The mean key, as `[1, heads or 1, 1, D]` in the original space and in the rotated (stored) space.
        self.k_mean = self.k_mean_rotated = None
        if self.k_mean_init is not None:
            mean = self.k_mean_init.to(self.device, torch.float32).reshape(-1, head_dim)
            if mean.shape[0] not in (1, heads):
                raise ValueError(
                    f"The mean key of layer {self.layer_idx} has {mean.shape[0]} groups, but the model has {heads} KV "
                    "heads: the bundle was made for another model."
                )
            self.k_mean = mean[None, :, None, :]
            self.k_mean_rotated = self.k_mean if self.k_rotation is None else rotate(self.k_mean, self.k_rotation)

        def exact(n):
            return torch.zeros(batch, heads, n, head_dim, dtype=self.dtype, device=self.device)

        self.sink_keys, self.sink_values = exact(self.sink_tokens), exact(self.sink_tokens)
        self.recent_keys, self.recent_values = exact(self.recent_capacity), exact(self.recent_capacity)
        initial = 0
        if self.max_cache_len is not None:
            initial = max(0, self.max_cache_len - self.sink_tokens - self.recent_tokens)
        self._allocate_body(initial)
        self.sink_len = self.body_len = self.recent_len = 0
        self.is_initialized = True

    def _allocate_body(self, capacity: int) -> None:
        b, h, d = self.batch_size, self.num_heads, self.head_dim
        capacity += capacity % 2  # value codes are stored in token pairs (`quantization.write_token_pairs`)

        def codes():
            return torch.zeros(b, h, capacity, d // CODES_PER_BYTE, dtype=torch.uint8, device=self.device)

        def params():
            return torch.zeros(b, h, capacity, dtype=PARAM_DTYPE, device=self.device)

        self.body_key_codes, self.body_key_scale, self.body_key_offset = codes(), params(), params()
        self.body_value_codes, self.body_value_scale, self.body_value_offset = codes(), params(), params()

    @property
    def body_capacity(self) -> int:
        return self.body_key_codes.shape[2]

    def _reserve_body(self, needed: int) -> None:
        if needed <= self.body_capacity:
            return
        capacity = max(needed, int(self.body_capacity * _BODY_GROWTH))
        capacity = -(-capacity // _BODY_PAGE) * _BODY_PAGE
        old = self._body_tensors()
        self._allocate_body(capacity)
        kept = self.body_len + self.body_len % 2  # whole token pairs of the value codes
        for new, previous in zip(self._body_tensors(), old):
            new[:, :, :kept] = previous[:, :, :kept]

    def _body_tensors(self) -> list[torch.Tensor]:
        return [
            self.body_key_codes,
            self.body_key_scale,
            self.body_key_offset,
            self.body_value_codes,
            self.body_value_scale,
            self.body_value_offset,
        ]

    def _all_tensors(self) -> list[str]:
        return [
            "sink_keys",
            "sink_values",
            "recent_keys",
            "recent_values",
            "body_key_codes",
            "body_key_scale",
            "body_key_offset",
            "body_value_codes",
            "body_value_scale",
            "body_value_offset",
        ]

    # ------------------------------------------------------------------ writes
    def rotate_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values in the layer's rotated space, in the model dtype."""
        keys = key_states if self.k_rotation is None else rotate(key_states, self.k_rotation)
        if self.k_mean_rotated is not None:
            keys = keys.float() - self.k_mean_rotated
        values = value_states if self.v_rotation is None else rotate(value_states, self.v_rotation).to(self.dtype)
        return keys.to(self.dtype), values

    def centered_keys(self, key_states: torch.Tensor) -> torch.Tensor:
        """New key states as the layer stores them, un-rotated: minus the mean key when the bundle has one (the same
        shift for every key, so scores move by a per-query constant that softmax ignores)."""
        if self.k_mean is None:
            return key_states
        return (key_states.float() - self.k_mean).to(key_states.dtype)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, return_segments: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[OscarSegments, OscarSegments]:
        """Append new states and return what attention needs for this forward.

        The first forward (empty layer) gets its own key and value states back untouched: prefill attention is
        exact. Later forwards get either `OscarSegments` (when the `"oscar"` attention function will read the mixed
        storage) or the whole history dequantized and un-rotated, followed by the new states (any other attention
        function).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        expected = (self.batch_size, self.num_heads, self.head_dim)
        if (key_states.shape[0], key_states.shape[1], key_states.shape[-1]) != expected or (
            value_states.shape != key_states.shape
        ):
            raise ValueError(
                f"Layer {self.layer_idx} holds a batch of {self.batch_size} x {self.num_heads} KV heads of head_dim "
                f"{self.head_dim} but got keys of shape {tuple(key_states.shape)} and values of shape "
                f"{tuple(value_states.shape)}: is this cache being reused with another model or batch? "
                "Call `cache.reset()` first."
            )
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            refuse_dtype_change(self, key_states, value_states)
        if self.check_finite:
            self._raise_if_not_finite(key_states, "keys")
            self._raise_if_not_finite(value_states, "values")
        had_history = self.get_seq_length() > 0
        rot_keys, rot_values = self.rotate_states(key_states, value_states)
        if self.graph_mode:
            self._graph_append(rot_keys, rot_values)
            segments = OscarSegments(self, key_states.shape[-2], rot_keys, rot_values)
            return segments, segments
        self._append(rot_keys, rot_values)
        if not had_history:
            return key_states, value_states
        num_new = key_states.shape[-2]
        if return_segments:
            segments = OscarSegments(self, num_new, rot_keys, rot_values)
            return segments, segments
        keys, values = self.dequantized_rotated(key_states.dtype)
        keys, values = keys[..., : keys.shape[-2] - num_new, :], values[..., : values.shape[-2] - num_new, :]
        if self.k_rotation is not None:
            keys = unrotate(keys, self.k_rotation).to(key_states.dtype)
        if self.v_rotation is not None:
            values = unrotate(values, self.v_rotation).to(value_states.dtype)
        return torch.cat([keys, self.centered_keys(key_states)], dim=-2), torch.cat([values, value_states], dim=-2)

    # ------------------------------------------------------------------ CUDA-graph decoding
    def enter_graph_mode(self) -> None:
        """Switch single-token decode steps to device-indexed writes (see `oscar_hf.graphs.GraphDecoder`).

        Needs a full sink and a body allocated once (`max_cache_len`): a captured graph holds buffer addresses, so
        nothing may be reallocated while it replays.
        """
        if not self.is_initialized or self.sink_len < self.sink_tokens:
            raise ValueError(
                f"Graph decoding starts after a prompt of at least sink_tokens={self.sink_tokens} tokens; layer "
                f"{self.layer_idx} holds {self.get_seq_length()}."
            )
        if self.max_cache_len is None:
            raise ValueError(
                "Graph decoding needs buffers that never move: build the cache with max_cache_len=<prompt + new tokens>."
            )
        if self.check_finite:
            raise ValueError("check_finite synchronises with the host every step and cannot run inside a CUDA graph.")
        self.lengths = torch.zeros(3, dtype=torch.int32, device=self.device)
        self.sync_lengths()
        self.graph_mode = True

    def sync_lengths(self) -> None:
        """Copy the host-side segment lengths to `self.lengths` (after an eager demotion or a restore)."""
        host = torch.tensor([self.sink_len, self.body_len, self.recent_len], dtype=torch.int32)
        self.lengths.copy_(host)

    def make_room(self, num_tokens: int = 1) -> None:
        """Demote (eagerly, outside any graph) when the recent window cannot take `num_tokens` more tokens: the
        captured step only ever appends."""
        if self.recent_len + num_tokens <= self.recent_capacity:
            return
        keys, values = self.recent_keys[:, :, : self.recent_len], self.recent_values[:, :, : self.recent_len]
        # The tokens `_append` would demote when these tokens arrive (the window then keeps `recent_tokens`), taken
        # before they arrive: only ones already in the window.
        demoted = min(self._tokens_to_demote(num_tokens), self.recent_len)
        if self.body_len + demoted > self.body_capacity:
            raise ValueError(
                f"The cache is full: max_cache_len={self.max_cache_len} leaves no room for more tokens in layer "
                f"{self.layer_idx}."
            )
        self._demote(keys[:, :, :demoted], values[:, :, :demoted])
        kept = self.recent_len - demoted
        self.recent_keys[:, :, :kept] = keys[:, :, demoted:].clone()
        self.recent_values[:, :, :kept] = values[:, :, demoted:].clone()
        self.recent_len = kept
        self.sync_lengths()

    def _graph_append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write at the device-side recent length and advance it on the device."""
        n = keys.shape[-2]
        if self.recent_len + n > self.recent_capacity:
            raise RuntimeError("The recent window is full; call make_room() before the graph step.")
        index = self.lengths[2:3].long() + torch.arange(n, device=self.device)
        self.recent_keys.index_copy_(2, index, keys)
        self.recent_values.index_copy_(2, index, values)
        self.lengths[2:3] += n
        if not (keys.is_cuda and torch.cuda.is_current_stream_capturing()):
            self.recent_len += n  # run eagerly (CPU, warm-up): the host count moves now; a replay's moves in advance()

    def advance(self, num_tokens: int = 1) -> None:
        """Host-side bookkeeping of a replayed step's append."""
        self.recent_len += num_tokens

    def _raise_if_not_finite(self, states: torch.Tensor, name: str) -> None:
        bad = ~torch.isfinite(states)
        if bad.any():
            rows = int(bad.any(dim=-1).sum())
            raise ValueError(
                f"Layer {self.layer_idx} received {rows} (token, head) {name} rows holding NaN or Inf. The model "
                "produced non-finite activations; quantizing them would poison every later attention step."
            )

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = keys.shape[-2]
        taken = min(n, self.sink_tokens - self.sink_len)
        if taken > 0:
            self.sink_keys[:, :, self.sink_len : self.sink_len + taken] = keys[:, :, :taken]
            self.sink_values[:, :, self.sink_len : self.sink_len + taken] = values[:, :, :taken]
            self.sink_len += taken
        keys, values = keys[:, :, taken:], values[:, :, taken:]
        m = keys.shape[-2]
        if m == 0:
            return
        if self.recent_len + m <= self.recent_capacity:
            # The decode hot path: an in-place write, no demotion.
            self.recent_keys[:, :, self.recent_len : self.recent_len + m] = keys
            self.recent_values[:, :, self.recent_len : self.recent_len + m] = values
            self.recent_len += m
            return
        pending_keys = torch.cat([self.recent_keys[:, :, : self.recent_len], keys], dim=-2)
        pending_values = torch.cat([self.recent_values[:, :, : self.recent_len], values], dim=-2)
        total = pending_keys.shape[-2]
        demoted = self._tokens_to_demote(m)
        self._demote(pending_keys[:, :, :demoted], pending_values[:, :, :demoted])
        kept = total - demoted
        self.recent_keys[:, :, :kept] = pending_keys[:, :, demoted:]
        self.recent_values[:, :, :kept] = pending_values[:, :, demoted:]
        self.recent_len = kept

    def _tokens_to_demote(self, incoming: int) -> int:
        """How many of the oldest window tokens leave for the 2-bit body when `incoming` tokens arrive in a full
        window: whole `demote_block`s, leaving `recent_tokens` to `recent_tokens + demote_block - 1` exact."""
        return (self.recent_len + incoming - self.recent_tokens) // self.demote_block * self.demote_block

    def _demote(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize rotated rows and append them to the 2-bit body (the Triton write kernel on CUDA, straight into
        the body buffers; the reference `quantize_rows` otherwise)."""
        n = keys.shape[-2]
        self._reserve_body(self.body_len + n)
        kernel = None
        if keys.is_cuda:
            from .kernel_dispatch import quantize_into_fast_path as kernel
        at = slice(self.body_len, self.body_len + n)
        for rows, ratio, feedback, tilt, codes, scale, offset, pairs in (
            (
                keys, self.k_clip_ratio, self.k_feedback, self.k_tilt,
                self.body_key_codes, self.body_key_scale, self.body_key_offset, False,
            ),
            (
                values, self.v_clip_ratio, self.v_feedback, None,
                self.body_value_codes, self.body_value_scale, self.body_value_offset, True,
            ),
        ):
            # Value codes go to their token-pair interleaved places (`quantization.write_token_pairs`).
            out_codes = codes if pairs else codes[:, :, at]
            # The tilted coder keeps two [D, G] matrices per row: slice long prompts to bound its memory.
            step = _QUANTIZE_SLICE_ROWS if tilt is None else _TILT_SLICE_TOKENS
            if kernel is None or not kernel(
                rows, ratio, out_codes, scale[:, :, at], offset[:, :, at], feedback, tilt=tilt,
                token_pairs_from=self.body_len if pairs else None,
            ):
                for start in range(0, n, step):
                    stop = min(n, start + step)
                    q = quantize_rows(rows[:, :, start:stop], ratio, feedback, tilt)
                    dst = slice(self.body_len + start, self.body_len + stop)
                    scale[:, :, dst], offset[:, :, dst] = q.scale, q.offset
                    if pairs:
                        write_token_pairs(codes, q.codes, self.body_len + start)
                    else:
                        codes[:, :, dst] = q.codes
            if self.k_metric is not None and not pairs:
                # After either coder: the codes stay, each key row's grid is refitted in its metric (`refit_grid`).
                for start in range(0, n, _TILT_SLICE_TOKENS):
                    dst = slice(self.body_len + start, self.body_len + min(n, start + _TILT_SLICE_TOKENS))
                    q = refit_grid(rows[:, :, start : start + _TILT_SLICE_TOKENS],
                                   QuantizedRows(codes[:, :, dst], scale[:, :, dst], offset[:, :, dst]),
                                   self.k_metric, tilt)
                    scale[:, :, dst], offset[:, :, dst] = q.scale, q.offset
        self.body_len += n

    # ------------------------------------------------------------------ reads
    def body_rows(self) -> tuple[QuantizedRows, QuantizedRows]:
        """The valid part of the 2-bit body, keys then values, as token rows (the value codes de-interleaved: a copy)."""
        n = self.body_len
        return (
            QuantizedRows(self.body_key_codes[:, :, :n], self.body_key_scale[:, :, :n], self.body_key_offset[:, :, :n]),
            QuantizedRows(
                read_token_pairs(self.body_value_codes, n), self.body_value_scale[:, :, :n],
                self.body_value_offset[:, :, :n],
            ),
        )

    def dequantized_rotated(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """All held tokens in order (sink, body, recent), rotated, the body dequantized; a new tensor each call."""
        body_keys, body_values = self.body_rows()
        keys = torch.cat(
            [
                self.sink_keys[:, :, : self.sink_len].to(dtype),
                dequantize_rows(body_keys, dtype),
                self.recent_keys[:, :, : self.recent_len].to(dtype),
            ],
            dim=-2,
        )
        values = torch.cat(
            [
                self.sink_values[:, :, : self.sink_len].to(dtype),
                dequantize_rows(body_values, dtype),
                self.recent_values[:, :, : self.recent_len].to(dtype),
            ],
            dim=-2,
        )
        return keys, values

    def get_seq_length(self) -> int:
        return self.sink_len + self.body_len + self.recent_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def held_bytes(self) -> int:
        """Bytes of the valid (token-holding) part of every segment, scales and offsets included."""
        if not self.is_initialized:
            return 0
        exact_row = self.head_dim * self.sink_keys.element_size()
        quant_row = self.head_dim // CODES_PER_BYTE + 2 * torch.tensor([], dtype=PARAM_DTYPE).element_size()
        rows = self.batch_size * self.num_heads
        return 2 * rows * ((self.sink_len + self.recent_len) * exact_row + self.body_len * quant_row)

    def allocated_bytes(self) -> int:
        """Bytes of every buffer the layer owns, spare capacity included."""
        if not self.is_initialized:
            return 0
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in self._all_tensors())

    # ------------------------------------------------------------------ generate() plumbing
    def _map_batch(self, fn) -> None:
        for name in self._all_tensors():
            setattr(self, name, fn(getattr(self, name)))
        self.batch_size = self.sink_keys.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            idx = beam_idx.to(self.device)
            self._map_batch(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t[indices.to(self.device) if isinstance(indices, torch.Tensor) else indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens: `crop(-n)` removes `n`; a positive value is the length to keep (legacy)."""
        check_positive_crop(tokens_to_remove)  # refused where transformers' own layers refuse it
        length = self.get_seq_length()
        keep = tokens_to_remove if tokens_to_remove > 0 else length + tokens_to_remove
        keep = max(0, min(keep, length))
        if keep == length:
            return
        # The newest tokens leave first: recent, then body, then sink. What stays keeps its precision.
        self.recent_len = max(0, keep - self.sink_len - self.body_len)
        self.body_len = max(0, min(self.body_len, keep - self.sink_len))
        self.sink_len = min(self.sink_len, keep)

    def reset(self) -> None:
        # Buffers are dropped, not zeroed: the next update may bring another batch size or device.
        self.sink_len = self.body_len = self.recent_len = 0
        self.is_initialized = False
        self.graph_mode = False  # the device-side lengths go with the buffers
        for name in self._all_tensors():
            if hasattr(self, name):
                delattr(self, name)

    def offload(self):
        raise NotImplementedError("OscarQuantizedCache does not support CPU offloading; its 2-bit body is 7x smaller.")

    def prefetch(self):
        raise NotImplementedError("OscarQuantizedCache does not support CPU offloading.")
