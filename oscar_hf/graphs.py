"""`GraphDecoder`: one decode step captured in a CUDA graph and replayed for every new token.

An eager decode step of a large model is launch-bound: hundreds of small kernels, each a few microseconds of Python
and driver work, for a step whose memory traffic takes a few milliseconds. Capturing the step once and replaying it
removes that overhead, as `torch.compile(mode="reduce-overhead")` does for transformers' `StaticCache`. A graph
freezes every buffer address and every kernel argument, so the cache must keep static shapes and read its lengths
from device memory:

- `StaticCache` does so already (a device-side write index);
- `OscarQuantizedCache` built with `max_cache_len` does so in *graph mode* (`OscarQuantizedLayer.enter_graph_mode`):
  the new token is written at a device-side index of the recent window, and the decode kernel reads the segment
  lengths from the device. Demotion to the 2-bit body happens between replays, eagerly, once every `demote_block`
  steps (`make_room`), so the captured step only appends.

Without CUDA (CPU, tests) the same calls run the step eagerly through the same code path.
"""

from __future__ import annotations

import inspect

import torch

from .cache import OscarQuantizedCache, cache_keyword
from .layer import OscarQuantizedLayer


class GraphDecoder:
    """Single-token decode steps for `model` over `cache`, captured in a CUDA graph on the first `step`.

    Args:
        model: a causal LM; with an `OscarQuantizedCache` it must use `attn_implementation="oscar"`.
        cache: a `StaticCache`, or an `OscarQuantizedCache` built with `max_cache_len` whose every layer is an OSCAR
            layer (sliding-window layers grow dynamically and cannot be captured).
        warmup_steps: eager steps run (and undone) before capture, which compile the Triton kernels.

    Use `prefill(input_ids)` (or fill the cache yourself and call `start(next_position)`), then `step(ids)` once per
    new token, or `generate(input_ids, max_new_tokens)` for greedy decoding. The batch must be unpadded: the
    captured step reads no attention mask.
    """

    def __init__(self, model, cache, warmup_steps: int = 2):
        self.model, self.cache = model, cache
        self.warmup_steps = warmup_steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.position: int | None = None
        self._oscar_layers: list[OscarQuantizedLayer] = []
        if isinstance(cache, OscarQuantizedCache):
            if getattr(model.config, "_attn_implementation", None) != "oscar":
                raise ValueError('Graph decoding with OscarQuantizedCache needs attn_implementation="oscar".')
            others = [type(layer).__name__ for layer in cache.layers if not isinstance(layer, OscarQuantizedLayer)]
            if others:
                raise ValueError(
                    f"Graph decoding needs every cache layer to be an OSCAR layer; this model also has {others[0]} "
                    "layers (sliding-window attention), which grow dynamically."
                )
            self._oscar_layers = list(cache.layers)
        # transformers 5.17 models take a `cache_position` (or derive it with a host sync); newer ones do not.
        self._takes_cache_position = "cache_position" in inspect.signature(model.model.forward).parameters
        self._cache_keyword = cache_keyword(model)

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def prefill(self, input_ids: torch.LongTensor, chunk_size: int | None = None) -> torch.Tensor:
        """Run the prompt eagerly (in chunks of `chunk_size` tokens if given: each chunk attends over the stored
        history plus itself, which bounds prefill memory) and return the last position's logits `[B, vocab]`."""
        length = input_ids.shape[1]
        chunk_size = chunk_size or length
        logits = None
        for start in range(0, length, chunk_size):
            ids = input_ids[:, start : start + chunk_size]
            logits = self._forward(ids, start).logits[:, -1]
        self.start(length)
        return logits

    def start(self, next_position: int) -> None:
        """Begin decoding at `next_position` (the number of tokens the cache holds)."""
        self.position = int(next_position)
        for layer in self._oscar_layers:
            if not layer.graph_mode:
                layer.enter_graph_mode()

    # ------------------------------------------------------------------ steps
    @torch.no_grad()
    def step(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Feed one token per sequence (`[B, 1]`); returns the next-token logits `[B, vocab]`. On CUDA the result is
        a static buffer overwritten by the next step: copy it if you keep it."""
        if self.position is None:
            raise RuntimeError("Call prefill(...) or start(next_position) before step().")
        for layer in self._oscar_layers:
            layer.make_room(1)
        if not input_ids.is_cuda:
            logits = self._forward(input_ids, self.position).logits[:, -1]
            self.position += 1
            return logits
        if self.graph is None:
            self._capture(input_ids)
        self._ids.copy_(input_ids)
        self._positions.fill_(self.position)
        self.graph.replay()
        for layer in self._oscar_layers:
            layer.advance(1)
        self.position += 1
        return self._logits

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, max_new_tokens: int, chunk_size: int | None = None):
        """Greedy decoding: `[B, prompt + max_new_tokens]` token ids."""
        logits = self.prefill(input_ids, chunk_size)
        tokens = [input_ids]
        for _ in range(max_new_tokens):
            next_ids = logits.argmax(-1, keepdim=True)
            tokens.append(next_ids)
            if len(tokens) - 1 == max_new_tokens:
                break
            logits = self.step(next_ids)
        return torch.cat(tokens, dim=1)

    # ------------------------------------------------------------------ internals
    def _forward(self, input_ids: torch.LongTensor, position, positions: torch.Tensor | None = None):
        batch, length = input_ids.shape
        if positions is None:
            positions = torch.arange(position, position + length, device=input_ids.device).expand(batch, length)
        kwargs = {"position_ids": positions, self._cache_keyword: self.cache, "use_cache": True, "logits_to_keep": 1}
        if self._takes_cache_position:
            kwargs["cache_position"] = positions[0]
        return self.model(input_ids=input_ids, **kwargs)

    def _capture(self, input_ids: torch.LongTensor) -> None:
        self._ids = input_ids.clone()
        self._positions = torch.full_like(input_ids, self.position)
        # Warm-up runs the step for real (compiling kernels, creating library handles); its writes are undone by
        # restoring the lengths, and the next real step overwrites the slots it wrote.
        saved = [(layer.sink_len, layer.body_len, layer.recent_len) for layer in self._oscar_layers]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup_steps):
                self._forward(self._ids, self.position, self._positions)
                self._restore(saved)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._logits = self._forward(self._ids, self.position, self._positions).logits[:, -1]
        self._restore(saved)

    def _restore(self, saved) -> None:
        for layer, (sink, body, recent) in zip(self._oscar_layers, saved):
            layer.sink_len, layer.body_len, layer.recent_len = sink, body, recent
            layer.sync_lengths()
        if not self._oscar_layers:
            # StaticCache (transformers >= 5.2x) counts its writes on the device; rewind it as well.
            for layer in getattr(self.cache, "layers", []):
                counter = getattr(layer, "cumulative_length", None)
                if isinstance(counter, torch.Tensor):
                    counter.fill_(self.position)
