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

`crop` puts the layer back exactly as if the removed tokens had never arrived (transformers' `is_croppable` promise,
on which assisted decoding relies): where the window had already demoted tokens that must be exact again, it takes
them back from an *undo ring*, exact copies of the newest `undo_capacity` demoted rows (as many rows as the recent
window holds: about 1% of a 128K-token layer).

The segment lengths live in one int32 tensor, `lengths` = (sink_len, body_len, recent_len, reserved): the only record of
how many tokens each segment holds. A static layer's also holds, after these `LENGTH_SLOTS`, one arrival count per
(batch, KV head) row for a decode that merges its splits in one launch (`DecodeOptions.merge_in_stage1`; zero between
calls). A *static* layer (`max_cache_len` given) allocates every buffer once, keeps `lengths` on its device and appends
short chunks (decode steps) through the `oscar_hf::append` op, which demotes behind a device-side predicate: such a step
reads nothing back to the host, so `generate()` compiles it once and replays it (CUDA graphs) across demotions. A
*dynamic* layer keeps `lengths` on the CPU and grows its body geometrically; it runs eagerly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin
from transformers.utils import logging

from .attention_checks import segments_misused
from .cache_checks import check_positive_crop, refuse_dtype_change
from .quantization import (
    CODES_PER_BYTE,
    PARAM_DTYPE,
    KeyTilt,
    QuantizedRows,
    metric_from_factor,
    read_token_pairs,
    rotate,
    rotate_new_states,
    unrotate,
)
from .storage import dequantize_segments, quantize_into_body, recall_demoted, remember_demoted

LENGTH_SLOTS = 4  # (sink_len, body_len, recent_len, reserved) at the head of `lengths`

logger = logging.get_logger(__name__)

# Body growth: a page granularity so that small contexts do not reallocate every demotion, and a growth factor that
# keeps the amortised copy cost constant per token while wasting at most a third of the capacity.
_BODY_PAGE = 1024
_BODY_GROWTH = 1.5
# A crop of up to max(recent_tokens, this) tokens is exact. Assisted decoding crops the rejected candidates of one
# verification forward (`num_assistant_tokens`, 20 by default), so tiny windows still get a useful undo ring.
_EXACT_CROP_MIN_TOKENS = 64
@dataclass
class OscarSegments:
    """What an `OscarQuantizedLayer.update` hands the `"oscar"` attention function instead of key/value tensors.

    `num_new` tokens were just appended; `new_keys`/`new_values` are their rotated rows in the model dtype. The layer
    may already have demoted some of them to 2 bits (a long chunk), but the tokens of the current forward attend to
    each other exactly, so attention reads them from here rather than from the body. They are None after a static
    layer's `oscar_hf::append`, which rotated the rows itself: that append never demotes a token of its own chunk
    (at most `max_append` tokens arrive and only a block already in the window leaves), so the new tokens are exact
    in the sink or the window.
    """

    layer: OscarQuantizedLayer
    num_new: int
    new_keys: torch.Tensor | None
    new_values: torch.Tensor | None
    # Appended through `oscar_hf::append`: the new tokens sit in the exact windows and attention reads the lengths on
    # the device (the `"oscar"` attention function then calls `oscar_hf::decode_attention`, compiled or not).
    device_lengths: bool = False
    # Body positions `(first, stop)` that this forward demoted from the window, for a short multi-token forward (a
    # verification forward of assisted decoding): its earlier queries must see some of them exact, as they would
    # when decoding token by token (`query_body_lengths`). None when it demoted nothing, or for long chunks.
    demoted: tuple[int, int] | None = None
    # The step's `(key_states, value_states)` when the cache left their write to the "oscar" attention function
    # (`update(..., defer_write=True)`): `oscar_hf::append_decode_attention` writes them and rotates the query in one
    # launch. Anything else that reads the layer calls `flush()` first.
    pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def flush(self) -> None:
        """Write the pending states now (`oscar_hf::append`), if any."""
        if self.pending is not None:
            from .ops import append

            keys, values = self.take_pending()
            append(self.layer, keys, values)

    def take_pending(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pending states, which the caller now writes."""
        pending, self.pending = self.pending, None
        if pending is None:
            raise RuntimeError("These segments hold no pending states: they were written already.")
        return pending

    @property
    def shape(self) -> torch.Size:
        """`[batch, kv_heads, kv_length, head_dim]`, as the key tensor it stands for."""
        layer = self.layer
        length = layer.get_seq_length() + (self.num_new if self.pending is not None else 0)
        return torch.Size((layer.batch_size, layer.num_heads, length, layer.head_dim))

    def rotated_keys_values(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All `kv_length` rotated keys and values, the 2-bit body dequantized and the new tokens exact."""
        if dtype is None:
            dtype = self.layer.dtype if self.new_keys is None else self.new_keys.dtype
        keys, values = self.layer.dequantized_rotated(dtype)
        if self.num_new and self.new_keys is not None:
            keys[..., -self.num_new :, :] = self.new_keys.to(keys.dtype)
            values[..., -self.num_new :, :] = self.new_values.to(values.dtype)
        return keys, values

    def query_body_lengths(self) -> list[int]:
        """For each new token, in order, the body length it sees when decoding token by token: the body as it was
        once that token had been appended (the window demotes before attention), never less than the body already
        there before this forward, nor less than what the undo ring can give back exact."""
        layer, (first, stop) = self.layer, self.demoted
        sink, _, _ = layer._host_lengths()
        length = layer.get_seq_length()
        floor = max(first, stop - layer.undo_capacity)
        return [
            min(stop, max(floor, layer._body_length_for(length - self.num_new + i + 1 - sink)))
            for i in range(self.num_new)
        ]

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
        max_cache_len: if given, the layer is static: every buffer is allocated once for this many tokens, the lengths
            live on the device, and short appends go through `oscar_hf::append` (compileable, see the module
            docstring).
        check_finite: raise on NaN/Inf keys or values (costs a host sync per update; off by default).
        key_grid_refit: refit each demoted key row's scale and offset in its coding metric
            (`quantization.refit_grid`) after error-feedback coding; without a key feedback factor it does nothing.
    """

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
        # (sink_len, body_len, recent_len, reserved): on the CPU until a static layer moves it to its device.
        self.lengths = torch.zeros(LENGTH_SLOTS, dtype=torch.int32)
        # A compiled decode step appends through `oscar_hf::append`, which needs buffers that never move, no host
        # check, and the plain or error-feedback coder (the grid refit runs in PyTorch after the write).
        self.is_compileable = (
            max_cache_len is not None and not check_finite and not key_grid_refit and self.max_append >= 1
        )

    @property
    def static(self) -> bool:
        """Buffers allocated once for `max_cache_len` tokens, lengths on the device (see the module docstring)."""
        return self.max_cache_len is not None

    @property
    def max_append(self) -> int:
        """The longest chunk a static layer appends through `oscar_hf::append` (longer ones take the eager path): at
        most one block is demoted, and only tokens that were already in the window."""
        return min(self.demote_block, self.recent_tokens)

    def _host_lengths(self) -> list[int]:
        """`[sink_len, body_len, recent_len]` on the host (a device sync for a static layer on CUDA)."""
        return self.lengths[:3].tolist()

    def _set_lengths(self, sink: int, body: int, recent: int) -> None:
        self.lengths[:3].copy_(torch.tensor([sink, body, recent], dtype=torch.int32), non_blocking=False)

    @property
    def sink_len(self) -> int:
        return int(self.lengths[0])

    @sink_len.setter
    def sink_len(self, value: int) -> None:
        self.lengths[0] = value

    @property
    def body_len(self) -> int:
        return int(self.lengths[1])

    @body_len.setter
    def body_len(self, value: int) -> None:
        self.lengths[1] = value

    @property
    def recent_len(self) -> int:
        return int(self.lengths[2])

    @recent_len.setter
    def recent_len(self, value: int) -> None:
        self.lengths[2] = value

    def __repr__(self):
        return (
            f"OscarQuantizedLayer(sink={self.sink_len}/{self.sink_tokens}, body={self.body_len}, "
            f"recent={self.recent_len}/{self.recent_tokens})"
        )

    # ------------------------------------------------------------------ storage
    @property
    def recent_capacity(self) -> int:
        return self.recent_tokens + self.demote_block - 1

    @property
    def exact_crop_tokens(self) -> int:
        """The longest crop that puts the layer back exactly: `max(recent_tokens, 64)` tokens."""
        return max(self.recent_tokens, _EXACT_CROP_MIN_TOKENS)

    @property
    def undo_capacity(self) -> int:
        """Rows of the undo ring: an exact crop may bring back as many demoted tokens as it removes plus a partly
        filled block."""
        return self.exact_crop_tokens + self.demote_block

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
        self.k_rotation = (
            None if self.k_rotation_init is None else self.k_rotation_init.to(self.device, torch.float32).contiguous()
        )
        self.v_rotation = (
            None if self.v_rotation_init is None else self.v_rotation_init.to(self.device, torch.float32).contiguous()
        )
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
        self.undo_keys, self.undo_values = exact(self.undo_capacity), exact(self.undo_capacity)
        initial = 0
        if self.max_cache_len is not None:
            initial = max(0, self.max_cache_len - self.sink_tokens - self.recent_tokens)
        self._allocate_body(initial)
        # A static layer's lengths also hold the decode's per-(batch, KV head) arrival counts (module docstring): the
        # layer owns them, so they are allocated here, never inside a captured step.
        self.lengths = torch.zeros(LENGTH_SLOTS + (batch * heads if self.static else 0), dtype=torch.int32,
                                   device=self.device if self.static else "cpu")
        if self.static and not torch.compiler.is_compiling():
            # Fixed addresses: a compiled step neither guards on them nor copies them into a CUDA graph's pool.
            constants = [self.k_rotation, self.v_rotation, self.k_feedback, self.v_feedback, self.k_mean_rotated]
            if self.k_tilt is not None:
                constants += [self.k_tilt.means, self.k_tilt.maps]
            for t in [getattr(self, name) for name in self._all_tensors()] + constants + [self.lengths]:
                if t is not None:
                    torch._dynamo.mark_static_address(t)
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

    def _reserve_body(self, needed: int, body_len: int) -> None:
        if needed <= self.body_capacity:
            return
        capacity = max(needed, int(self.body_capacity * _BODY_GROWTH))
        capacity = -(-capacity // _BODY_PAGE) * _BODY_PAGE
        old = self._body_tensors()
        self._allocate_body(capacity)
        kept = body_len + body_len % 2  # whole token pairs of the value codes
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
            "undo_keys",
            "undo_values",
        ]

    def segment_tensors(self) -> tuple[torch.Tensor, ...]:
        """The ten buffers in the order the ops and kernels take them: sink K/V, recent K/V, body key codes, scale,
        offset, body value codes, scale, offset."""
        return (
            self.sink_keys, self.sink_values, self.recent_keys, self.recent_values, *self._body_tensors(),
        )

    # ------------------------------------------------------------------ writes
    def rotate_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values in the layer's rotated space, in the model dtype."""
        return rotate_new_states(key_states, value_states, self.k_rotation, self.v_rotation, self.k_mean_rotated,
                                 self.dtype)

    def centered_keys(self, key_states: torch.Tensor) -> torch.Tensor:
        """New key states as the layer stores them, un-rotated: minus the mean key when the bundle has one (the same
        shift for every key, so scores move by a per-query constant that softmax ignores)."""
        if self.k_mean is None:
            return key_states
        return (key_states.float() - self.k_mean).to(key_states.dtype)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, return_segments: bool = False,
        defer_write: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[OscarSegments, OscarSegments]:
        """Append new states and return what attention needs for this forward.

        A static layer appends a chunk of up to `max_append` tokens through the `oscar_hf::append` op, which rotates
        them too (no host read: this is what a compiled decode step runs), and hands back `OscarSegments`. Otherwise
        the append is driven from the host, and the first forward (empty layer) gets its own key and value states back
        untouched: prefill attention is exact. Later forwards get either `OscarSegments` (when the `"oscar"` attention
        function will read the mixed storage) or the whole history dequantized and un-rotated, followed by the new
        states (any other attention function; a static layer pads it with zeros to `max_cache_len`, the width of its
        mask).

        With `defer_write` (and `return_segments`), a static layer's decode step is not written here: the segments
        carry the states (`OscarSegments.pending`) to the `"oscar"` attention function, which writes them in the
        launch that rotates the query (`oscar_hf::append_decode_attention`). Only the cache passes it, for the
        attention function it knows will run; a caller that reads the layer otherwise leaves it False.
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
        num_new = key_states.shape[-2]
        # A short multi-token forward (at most an exact crop long) remembers what it demotes (`OscarSegments.demoted`);
        # a compiled step cannot read the lengths back, and a decode step (one token) or a long chunk has no need to.
        track = return_segments and 1 < num_new <= self.exact_crop_tokens and not torch.compiler.is_compiling()
        body_before = self.body_len if track else None
        if self.static and 1 <= num_new <= self.max_append:
            from .ops import append

            if return_segments and defer_write and body_before is None:
                segments = OscarSegments(self, num_new, None, None, device_lengths=True,
                                         pending=(key_states, value_states))
                return segments, segments

            # The op rotates the states (on CUDA inside its window-write kernel, so a compiled step launches no
            # rotation kernels of its own).
            append(self, key_states, value_states)
            if return_segments:
                segments = OscarSegments(self, num_new, None, None, device_lengths=True,
                                         demoted=self._demoted_since(body_before))
                return segments, segments
            return self._dense_history(key_states, value_states, num_new)
        rot_keys, rot_values = self.rotate_states(key_states, value_states)
        had_history = self.get_seq_length() > 0
        self._append(rot_keys, rot_values)
        if not had_history and (return_segments or not self.static):
            return key_states, value_states
        if return_segments:
            segments = OscarSegments(self, num_new, rot_keys, rot_values, demoted=self._demoted_since(body_before))
            return segments, segments
        return self._dense_history(key_states, value_states, num_new)

    def _demoted_since(self, body_before: int | None) -> tuple[int, int] | None:
        if body_before is None:
            return None
        body = self.body_len
        return (body_before, body) if body > body_before else None

    def _dense_history(self, key_states, value_states, num_new):
        """Every held token dequantized and un-rotated, the newest `num_new` replaced by the exact states given."""
        keys, values = self.dequantized_rotated(key_states.dtype)
        keys, values = keys[..., : keys.shape[-2] - num_new, :], values[..., : values.shape[-2] - num_new, :]
        if self.k_rotation is not None:
            keys = unrotate(keys, self.k_rotation).to(key_states.dtype)
        if self.v_rotation is not None:
            values = unrotate(values, self.v_rotation).to(value_states.dtype)
        keys = torch.cat([keys, self.centered_keys(key_states)], dim=-2)
        values = torch.cat([values, value_states], dim=-2)
        if self.static and keys.shape[-2] < self.max_cache_len:
            # The mask of a static cache spans max_cache_len columns; the padding is masked (causal).
            pad = self.max_cache_len - keys.shape[-2]
            keys = torch.nn.functional.pad(keys, (0, 0, 0, pad))
            values = torch.nn.functional.pad(values, (0, 0, 0, pad))
        return keys, values

    def _raise_if_not_finite(self, states: torch.Tensor, name: str) -> None:
        bad = ~torch.isfinite(states)
        if bad.any():
            rows = int(bad.any(dim=-1).sum())
            raise ValueError(
                f"Layer {self.layer_idx} received {rows} (token, head) {name} rows holding NaN or Inf. The model "
                "produced non-finite activations; quantizing them would poison every later attention step."
            )

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append driven from the host (any chunk length; the lengths are read and written back once)."""
        sink_len, body_len, recent_len = self._host_lengths()
        n = keys.shape[-2]
        if self.static and sink_len + body_len + recent_len + n > self.max_cache_len:
            raise ValueError(
                f"The cache is full: max_cache_len={self.max_cache_len} leaves no room for {n} more tokens after "
                f"{sink_len + body_len + recent_len} in layer {self.layer_idx}. Build it with a larger max_cache_len."
            )
        taken = min(n, self.sink_tokens - sink_len)
        if taken > 0:
            self.sink_keys[:, :, sink_len : sink_len + taken] = keys[:, :, :taken]
            self.sink_values[:, :, sink_len : sink_len + taken] = values[:, :, :taken]
            sink_len += taken
        keys, values = keys[:, :, max(taken, 0):], values[:, :, max(taken, 0):]
        m = keys.shape[-2]
        if m and recent_len + m <= self.recent_capacity:
            self.recent_keys[:, :, recent_len : recent_len + m] = keys
            self.recent_values[:, :, recent_len : recent_len + m] = values
            recent_len += m
        elif m:
            pending_keys = torch.cat([self.recent_keys[:, :, :recent_len], keys], dim=-2)
            pending_values = torch.cat([self.recent_values[:, :, :recent_len], values], dim=-2)
            total = pending_keys.shape[-2]
            demoted = self._tokens_to_demote(recent_len, m)
            self._demote(pending_keys[:, :, :demoted], pending_values[:, :, :demoted], body_len)
            body_len += demoted
            kept = total - demoted
            self.recent_keys[:, :, :kept] = pending_keys[:, :, demoted:]
            self.recent_values[:, :, :kept] = pending_values[:, :, demoted:]
            recent_len = kept
        self._set_lengths(sink_len, body_len, recent_len)

    def _tokens_to_demote(self, recent_len: int, incoming: int) -> int:
        """How many of the oldest window tokens leave for the 2-bit body when `incoming` tokens arrive in a full
        window: whole `demote_block`s, leaving `recent_tokens` to `recent_tokens + demote_block - 1` exact."""
        return (recent_len + incoming - self.recent_tokens) // self.demote_block * self.demote_block

    def _demote(self, keys: torch.Tensor, values: torch.Tensor, at: int) -> None:
        """Quantize rotated rows and write them to the 2-bit body from token `at` (growing a dynamic body)."""
        n = keys.shape[-2]
        if self.static and at + n > self.body_capacity:
            raise ValueError(
                f"The cache is full: max_cache_len={self.max_cache_len} leaves no room for more tokens in layer "
                f"{self.layer_idx}. Build the cache with a larger max_cache_len."
            )
        self._reserve_body(at + n, at)
        quantize_into_body(
            keys, values, at, self._body_tensors(), self.k_clip_ratio, self.v_clip_ratio, self.k_feedback,
            self.v_feedback, self.k_tilt, self.k_metric,
        )
        remember_demoted(self.undo_keys, self.undo_values, keys, values, at)

    # ------------------------------------------------------------------ reads
    def body_rows(self) -> tuple[QuantizedRows, QuantizedRows]:
        """The valid part of the 2-bit body, keys then values, as token rows (the value codes de-interleaved:
        a copy)."""
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
        return dequantize_segments(self.segment_tensors(), *self._host_lengths(), dtype)

    def get_seq_length(self) -> int:
        """Tokens held: a host read of `lengths`, except while compiling, where it is a 0-dim device tensor (as
        `StaticLayer`'s count; transformers' mask code asks for it inside the compiled step)."""
        if not self.is_initialized:
            return 0
        if torch.compiler.is_compiling():
            return self.device_seq_length()
        return sum(self._host_lengths())

    def device_seq_length(self) -> torch.Tensor:
        """Tokens held, as a 0-dim tensor on the lengths' device: read without waiting for the device."""
        return self.lengths[:3].sum()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.static:
            return self.max_cache_len, 0  # constant: mask column p is cache position p
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.max_cache_len if self.static else -1

    def held_bytes(self) -> int:
        """Bytes of the valid (token-holding) part of every segment, scales and offsets included."""
        if not self.is_initialized:
            return 0
        exact_row = self.head_dim * self.sink_keys.element_size()
        quant_row = self.head_dim // CODES_PER_BYTE + 2 * torch.tensor([], dtype=PARAM_DTYPE).element_size()
        rows = self.batch_size * self.num_heads
        sink_len, body_len, recent_len = self._host_lengths()
        return 2 * rows * ((sink_len + recent_len) * exact_row + body_len * quant_row)

    def allocated_bytes(self) -> int:
        """Bytes of every buffer the layer owns, spare capacity included."""
        if not self.is_initialized:
            return 0
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in self._all_tensors())

    # ------------------------------------------------------------------ generate() plumbing
    def _map_batch(self, fn) -> None:
        # New buffers (beam search, batch expansion): eager only; a static layer re-marks them as static.
        for name in self._all_tensors():
            setattr(self, name, fn(getattr(self, name)))
            if self.static and not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(getattr(self, name))
        self.batch_size = self.sink_keys.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        idx = beam_idx.to(self.device)
        if self.static:
            # In place: the buffers keep the addresses a compiled step was captured with.
            for name in self._all_tensors():
                t = getattr(self, name)
                t.copy_(t.index_select(0, idx))
            return
        self._map_batch(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t[indices.to(self.device) if isinstance(indices, torch.Tensor) else indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens: `crop(-n)` removes `n`; a positive value is the length to keep (legacy).

        What stays is put back as if the removed tokens had never arrived: the windows take the lengths that appending
        the kept tokens would have given, and tokens the window had demoted but must now hold exact come back from the
        undo ring. A crop deeper than the ring (more than `max(recent_tokens, 64)` tokens) leaves the oldest of those
        tokens 2-bit, with a warning."""
        check_positive_crop(tokens_to_remove)  # refused where transformers' own layers refuse it
        if tokens_to_remove == 0:  # generate()'s deferred stop check calls crop(0) every step: no host read of lengths
            return
        length = self.get_seq_length()
        keep = tokens_to_remove if tokens_to_remove > 0 else length + tokens_to_remove
        keep = max(0, min(keep, length))
        if keep == length:
            return
        sink_len, body_len, _ = self._host_lengths()
        sink = min(sink_len, keep)
        rest = keep - sink  # tokens kept past the sink (the sink fills first, so it is full when rest > 0)
        body = min(body_len, self._body_length_for(rest))
        ring_from = max(0, body_len - self.undo_capacity)  # the oldest body position the ring still holds
        if ring_from > body:
            logger.warning_once(
                f"crop({tokens_to_remove}) removed more tokens than the undo ring of layer {self.layer_idx} can "
                f"restore ({self.undo_capacity}): {min(ring_from, rest) - body} demoted tokens stay 2-bit."
            )
            body = min(ring_from, rest)
        restored = min(body_len, rest) - body
        kept_recent = max(0, rest - body_len)
        if restored > 0:
            back_k, back_v = recall_demoted(self.undo_keys, self.undo_values, body, body + restored)
            self.recent_keys[:, :, restored : restored + kept_recent] = self.recent_keys[:, :, :kept_recent].clone()
            self.recent_values[:, :, restored : restored + kept_recent] = self.recent_values[:, :, :kept_recent].clone()
            self.recent_keys[:, :, :restored] = back_k
            self.recent_values[:, :, :restored] = back_v
        self._set_lengths(sink, body, restored + kept_recent)

    def _body_length_for(self, tokens: int) -> int:
        """How many of `tokens` tokens past the sink the body holds when they were appended in any chunks: whole
        blocks, leaving `recent_tokens` to `recent_tokens + demote_block - 1` in the window (the rule of `_append`
        and of `oscar_hf::append`, which does not depend on how the tokens were chunked)."""
        return max(0, (tokens - self.recent_tokens) // self.demote_block) * self.demote_block

    def reset(self) -> None:
        """Empty the layer. A static layer zeroes its lengths and buffers in place (the addresses a compiled step
        captured stay valid); a dynamic one drops its buffers (the next update may bring another batch or device)."""
        if self.static and self.is_initialized:
            for name in self._all_tensors():
                getattr(self, name).zero_()
            self.lengths.zero_()
            return
        self.lengths = torch.zeros(LENGTH_SLOTS, dtype=torch.int32)
        self.is_initialized = False
        for name in self._all_tensors():
            if hasattr(self, name):
                delattr(self, name)

    def offload(self):
        raise NotImplementedError("OscarQuantizedCache does not support CPU offloading; its 2-bit body is 7x smaller.")

    def prefetch(self):
        raise NotImplementedError("OscarQuantizedCache does not support CPU offloading.")
