"""`FakeQuantCache`: the oracle that quantized runs are tested against.

A `DynamicCache` that keeps every token exact and, at each forward, hands attention the history as OSCAR's windows
say it must look: the tokens outside the sink and recent windows replaced by their quantized-then-dequantized rows
(the reference math of `oscar_hf.quantization`), the tokens of the current forward exact. It shares no code with
`OscarQuantizedLayer`: the window rule is restated here from its specification, a crop sets the windows the kept
tokens alone would have set (storage is exact, so nothing needs restoring), and batch reordering is `DynamicCache`'s
own.
"""

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from oscar_hf import OscarRotations
from oscar_hf.quantization import dequantize_rows, quantize_rows


class FakeQuantCache(DynamicCache):
    """Exact storage; attention sees the body tokens fake-quantized (see the module docstring)."""

    def __init__(self, config, rotations: OscarRotations, sink_tokens, recent_tokens, demote_block):
        super().__init__(config=config)
        self.rotations = rotations
        self.sink, self.recent, self.block = sink_tokens, recent_tokens, demote_block
        self.windows = {}  # layer -> [sink_len, body_len, recent_len]

    def _advance(self, layer_idx, n):
        """OSCAR's window rule: fill the sink, then the recent window; demote whole blocks once it overflows."""
        sink_len, body_len, recent_len = self.windows.get(layer_idx, [0, 0, 0])
        taken = min(n, self.sink - sink_len)
        sink_len, n = sink_len + taken, n - taken
        if n:
            recent_len += n
            if recent_len > self.recent + self.block - 1:
                demoted = (recent_len - self.recent) // self.block * self.block
                body_len, recent_len = body_len + demoted, recent_len - demoted
        self.windows[layer_idx] = [sink_len, body_len, recent_len]
        return sink_len, body_len

    def _fake_quantize(self, states, rotation, clip):
        dtype = states.dtype
        rows = states.float() if rotation is None else states.float() @ rotation[0].float()
        rows = dequantize_rows(quantize_rows(rows.to(dtype), clip), torch.float32)
        return (rows if rotation is None else rows @ rotation[0].float().T).to(dtype)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if isinstance(self.layers[layer_idx], DynamicSlidingWindowLayer):
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        first = self.layers[layer_idx].get_seq_length() == 0
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        sink_len, body_len = self._advance(layer_idx, key_states.shape[-2])
        if first:
            return keys, values
        # Tokens of this forward stay exact even when they were demoted within it.
        stop = min(sink_len + body_len, keys.shape[-2] - key_states.shape[-2])
        if stop <= sink_len:
            return keys, values
        k_rot, v_rot = self.rotations.layer_rotations(layer_idx)
        keys, values = keys.clone(), values.clone()
        at = slice(sink_len, stop)
        keys[:, :, at] = self._fake_quantize(keys[:, :, at], k_rot, float(self.rotations.k_clip_ratios[layer_idx]))
        values[:, :, at] = self._fake_quantize(values[:, :, at], v_rot, float(self.rotations.v_clip_ratios[layer_idx]))
        return keys, values

    def crop(self, max_length: int):
        super().crop(max_length)
        # As if the removed tokens had never arrived: the windows the kept tokens alone would give (transformers'
        # promise of `is_croppable`), whatever had been demoted before.
        for idx in self.windows:
            keep = self.layers[idx].get_seq_length()
            self.windows[idx] = [0, 0, 0]
            self._advance(idx, keep)

    def reset(self):
        super().reset()
        self.windows = {}
