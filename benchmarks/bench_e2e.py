"""End-to-end benchmark (issue 7): decode, prefill, memory and batch throughput of a Qwen3-8B-shaped model.

Every row runs in one process, so the ratios (against eager DynamicCache, the best BF16 cache, the bandwidth floors
from the copy bandwidth measured at the start) come from the same run. The model has random bf16 weights of the real
shape: speed does not depend on weight values.

Sections (`--sections`, all by default):
- `generate`: what users run. `model.generate()` at `--generate-contexts` (8K, 32K, 128K), timed per token from a
  streamer's timestamps (median gap between tokens after `--warmup` tokens), for DynamicCache (eager), StaticCache
  and OscarQuantizedCache(max_cache_len=...) each compiled by generate() itself (its default `compile_config`:
  `torch.compile(mode="reduce-overhead")`, CUDA graphs), and OSCAR with `disable_compile=True`. The context is
  written through the cache's write path first (below); generate() then feeds one prompt token and decodes.
- `decode`: batch-1 decode step at `--contexts` (32K, 128K) for DynamicCache (eager), StaticCache (eager, and
  compiled: the model's forward under `torch.compile(mode="reduce-overhead")`, as generate() compiles it),
  OscarQuantizedCache (eager and compiled, `attn_implementation="oscar"`, `max_cache_len`) and transformers'
  `QuantizedCache` (quanto int2, eager, at `--quanto-contexts`) when optimum-quanto imports.
- `largest`: the largest context DynamicCache reaches (increasing contexts until `OutOfMemoryError`) and OSCAR at
  `--oscar-largest` (1,000,000) tokens, eager and compiled.
- `batch`: at `--batch-context` (32K), the largest batch each cache fits in `--kv-budget-gib` (40 GiB) of KV storage,
  compiled decode step and aggregate tokens/s.
- `generate_batch`: the same budget and context through `model.generate()`: OSCAR and StaticCache, each at its
  largest batch and compiled by generate() itself; aggregate tokens/s (issue 19's batch bar). Not in the default set
  (two compilations at large batches); ask for it with `--sections generate_batch`.
- `prefill`: chunked prefill through the model (`model(input_ids=chunk, cache=cache, ...)` chunk by chunk)
  at `--prefill-context` for every cache, and the last `--prefill-long-chunks` chunks of a `--prefill-long-context`
  (128K) prompt whose head was written through the cache's write path.

Decode contexts are built through each cache's own write path, not through the model: `fill_context` writes random
bf16 keys and values (N(0, 2^2)) chunk by chunk with the cache's `update` (for OSCAR the layer's
`update(..., return_segments=True)`: rotate, clip, quantize and store exactly as a prefill does, without building the
attention input). A real prefill of 128K-1M tokens through 36 layers does not fit in one 10-minute device command;
the `prefill` section measures the model path separately.

    # on the GPU machine, from the repository root (see benchmarks/RESULTS.md for the package copy)
    python benchmarks/bench_e2e.py --json e2e.json --plot e2e.png [--sections generate,decode,largest,batch,prefill]
    # CPU dry run of every code path at toy scale (compiled rows use the "eager" dynamo backend there)
    python benchmarks/bench_e2e.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import os
import statistics
import subprocess
import sys
import time

_T0 = time.perf_counter()  # the device's command limit counts from here (imports included)

import torch  # noqa: E402
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM, StaticCache  # noqa: E402

import oscar_hf  # noqa: E402, F401  (registers attn_implementation="oscar")
from oscar_hf import OscarQuantizedCache, OscarQuantizedLayer, cache_keyword  # noqa: E402
from oscar_hf.quantization import CODES_PER_BYTE, PARAM_DTYPE  # noqa: E402

GiB = 2**30
KV_SCALE = 2.0  # random keys/values ~ N(0, KV_SCALE^2): the order of post-RoPE Qwen3 keys
BF16_ROWS = ("dynamic", "static")
NAMES = {
    ("dynamic", "eager"): "DynamicCache eager",
    ("static", "eager"): "StaticCache eager",
    ("static", "compile"): "StaticCache compiled",
    ("oscar", "eager"): "OSCAR eager",
    ("oscar", "compile"): "OSCAR compiled",
    ("quanto", "eager"): "QuantizedCache quanto int2",
}

# Scale presets; every value can be overridden by its flag.
FULL = dict(
    contexts="32768,131072", quanto_contexts="32768", generate_contexts="8192,32768,131072", generate_tokens=64,
    dynamic_largest="131072,262144,327680,393216,425984,458752,524288",
    oscar_largest=1_000_000, batch_context=32768, kv_budget_gib=40.0, prefill_context=32768, prefill_chunk=4096,
    prefill_long_context=131072, prefill_long_chunks=2, chunk=8192, steps=32, graph_steps=64, warmup=3,
)
TINY = dict(
    contexts="512,1024", quanto_contexts="512", generate_contexts="448", generate_tokens=4,
    dynamic_largest="1024,2048", oscar_largest=4096, batch_context=1024,
    kv_budget_gib=0.005, prefill_context=1024, prefill_chunk=256, prefill_long_context=2048, prefill_long_chunks=2,
    chunk=256, steps=3, graph_steps=4, warmup=1,
)


# ----------------------------------------------------------------------------------------------------------- set-up
def make_config(tiny: bool, layers: int | None) -> Qwen3Config:
    if tiny:
        shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, vocab_size=1024)
    else:  # Qwen3-8B
        shape = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936)
    if layers:
        shape["num_hidden_layers"] = layers
    return Qwen3Config(**shape, max_position_embeddings=1_100_000, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def build_model(config: Qwen3Config, device: str, dtype: torch.dtype) -> Qwen3ForCausalLM:
    """The model built on `device` in `dtype` directly: an 8B model assembled on the CPU and copied would take
    minutes; on the GPU the default normal_(std=0.02) initialisation takes about a second."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def set_attention(model, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (AttributeError, ValueError):
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:
        model.config._attn_implementation = name


class Env:
    """What every row needs: the model, its geometry, the device and the clock."""

    def __init__(self, args, model, config, start: float):
        self.args, self.model, self.config = args, model, config
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = model.dtype
        self.layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.vocab = config.vocab_size
        self.start = start
        # Compiled rows: inductor + CUDA graphs on the GPU, as generate() compiles; dynamo alone on the CPU dry run.
        self.compile_kwargs = dict(mode="reduce-overhead") if self.cuda else dict(backend="eager")
        self.compile_note = ('torch.compile(mode="reduce-overhead")' if self.cuda
                             else 'torch.compile(backend="eager") (CPU dry run: traced, no CUDA graph)')

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.args.time_limit > 0 and self.elapsed() > self.args.time_limit

    # bytes
    def bf16_kv_bytes_per_token(self) -> int:
        return self.layers * self.kv_heads * self.head_dim * 2 * torch.finfo(self.dtype).bits // 8

    def int2_kv_bytes_per_token(self) -> int:
        """2-bit codes + fp16 scale and offset per (token, head) row, K and V: what an all-INT2 cache reads."""
        param = torch.finfo(PARAM_DTYPE).bits // 8
        return self.layers * self.kv_heads * 2 * (self.head_dim // CODES_PER_BYTE + 2 * param)

    def oscar_allocated_bytes(self, batch: int, max_cache_len: int) -> int:
        """What `OscarQuantizedCache(max_cache_len=...)` allocates for `batch` sequences (see
        `OscarQuantizedLayer.lazy_initialization`): BF16 sink, recent and undo-ring buffers plus the INT2 body, sized
        once."""
        sink, recent, block = 64, 256, 64
        undo = max(recent, 64) + block
        exact = (sink + recent + block - 1 + undo) * self.head_dim * 2 * 2  # K and V, bf16
        body = max(0, max_cache_len - sink - recent) * 2 * (self.head_dim // CODES_PER_BYTE + 4)
        return batch * self.layers * self.kv_heads * (exact + body)

    def weight_read_bytes(self, batch: int) -> int:
        """Weights a decode step reads: every parameter except the input embedding table, of which it reads
        `batch` rows (the output projection is not tied, so it is read whole)."""
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        emb = self.model.get_input_embeddings().weight
        return total - emb.numel() * emb.element_size() + batch * emb.shape[1] * emb.element_size()


def sync(env) -> None:
    if env.cuda:
        torch.cuda.synchronize(env.device)


def free(env) -> None:
    gc.collect()
    if env.cuda:
        torch.cuda.empty_cache()


def memory_allocated(env) -> int:
    return torch.cuda.memory_allocated(env.device) if env.cuda else 0


def reset_peak(env) -> None:
    if env.cuda:
        torch.cuda.reset_peak_memory_stats(env.device)


def peak_gib(env) -> float | None:
    return torch.cuda.max_memory_allocated(env.device) / GiB if env.cuda else None


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def copy_bandwidth(env) -> float | None:
    """Bytes/s of a 1 GiB device-to-device copy (read + written counted), median of 20 timed with CUDA events."""
    if not env.cuda:
        return None
    src = torch.randn(GiB // 4, device=env.device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    del src, dst
    free(env)
    return 2 * GiB / statistics.median(times)


# ----------------------------------------------------------------------------------------------------------- caches
def make_cache(env, kind: str, max_cache_len: int):
    config = env.model.config
    if kind == "dynamic":
        return DynamicCache(config=config)
    if kind == "static":
        return StaticCache(config=config, max_cache_len=max_cache_len)
    if kind == "oscar":
        # Data-free Hadamard rotations: one dense D x D rotation per layer, as a fitted bundle has, so the speed is
        # the same as with fitted rotations.
        return OscarQuantizedCache(config, method="hadamard", max_cache_len=max_cache_len)
    if kind == "quanto":
        from transformers import QuantizedCache

        return QuantizedCache(backend="quanto", config=config, nbits=2)
    raise ValueError(kind)


def torch_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's `unpack` (the `bits`-bit codes of each byte, lowest first, stacked along dim 0) in PyTorch ops."""
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (bits * i)) & mask for i in range(8 // bits)]).to(torch.uint8)


class _TorchUnpackLib:
    unpack = staticmethod(torch_unpack)


_QUANTO: dict[str, str | None] = {}


def quanto_unavailable(unpack: str) -> str | None:
    """None when the quanto rows can run (after choosing how quanto unpacks its codes), else why not.

    optimum-quanto compiles a C++/CUDA extension (CUDA: its unpack, AWQ and Marlin kernels, with nvcc) the first time
    it dequantizes; that takes minutes on a fresh machine, longer than a device command can spare. `unpack="torch"`
    hands quanto the same unpack in PyTorch ops instead (a few more elementwise launches per layer and step)."""
    if unpack in _QUANTO:
        return _QUANTO[unpack]
    why = None
    try:
        import optimum.quanto  # noqa: F401
        from optimum.quanto.library.extensions import get_extension, is_extension_available

        if unpack == "torch":
            for name in ("quanto_cuda", "quanto_cpp"):
                if is_extension_available(name):
                    get_extension(name)._lib = _TorchUnpackLib()
    except Exception as e:  # noqa: BLE001 - any import failure means no row
        why = f"optimum-quanto does not import ({type(e).__name__}: {e}); carry its wheel (.whl, see RESULTS.md)"
    _QUANTO[unpack] = why
    return why


def fill_context(env, cache, kind: str, batch: int, tokens: int, start: int = 0) -> None:
    """Write `tokens` random key/value positions per layer through the cache's own write path, chunk by chunk and
    layer by layer, as a chunked prefill would (positions `start` ... `start + tokens - 1`)."""
    if kind == "quanto":
        # QuantizedLayer re-quantizes its whole history whenever its residual overflows: one write per layer is the
        # cheapest equivalent of a prefill (and what its first forward does).
        chunk = tokens
    elif kind == "dynamic":
        # DynamicLayer concatenates on every write; large chunks keep the copies few without holding a whole
        # context of random states beside the cache.
        chunk = max(env.args.chunk, 65536)
    else:
        chunk = max(64, env.args.chunk // batch // 64 * 64)
    shape = (batch, env.kv_heads, 0, env.head_dim)
    for s in range(start, start + tokens, chunk):
        n = min(chunk, start + tokens - s)
        position = torch.arange(s, s + n, device=env.device)
        for i, layer in enumerate(cache.layers):
            k = torch.randn(shape[0], shape[1], n, shape[3], device=env.device, dtype=env.dtype).mul_(KV_SCALE)
            v = torch.randn(shape[0], shape[1], n, shape[3], device=env.device, dtype=env.dtype).mul_(KV_SCALE)
            if isinstance(layer, OscarQuantizedLayer):
                layer.update(k, v, return_segments=True)  # segments, not a dequantized history
            else:
                cache.update(k, v, i, {"cache_position": position})
            del k, v


def cache_kv_bytes(cache, kind: str) -> dict:
    if kind == "oscar":
        return dict(kv_held_bytes=cache.held_bytes(), kv_allocated_bytes=cache.allocated_bytes())
    if kind in BF16_ROWS:
        n = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        return dict(kv_allocated_bytes=n)
    return {}


# ----------------------------------------------------------------------------------------------------------- decoders
_TAKES_CACHE_POSITION: dict[type, bool] = {}


def forward_kwargs(model, ids: torch.Tensor, cache, position: int) -> dict:
    """Keyword arguments of one forward over `ids` at positions `position...`, keeping only the last logits.

    transformers releases before 5.2x take `cache_position` (StaticCache writes there); later ones derive it."""
    kind = type(model)
    if kind not in _TAKES_CACHE_POSITION:
        inner = getattr(model, "model", model)
        _TAKES_CACHE_POSITION[kind] = any(
            "cache_position" in inspect.signature(f).parameters for f in (model.forward, inner.forward)
        )
    positions = torch.arange(position, position + ids.shape[1], device=ids.device)
    kw = {"input_ids": ids, cache_keyword(model): cache, "position_ids": positions[None], "use_cache": True,
          "logits_to_keep": 1}
    if _TAKES_CACHE_POSITION[kind]:
        kw["cache_position"] = positions
    return kw


class EagerDecoder:
    """Single-token greedy steps of the model's forward over a filled cache."""

    def __init__(self, model, cache):
        self.model, self.cache, self.position = model, cache, None

    def start(self, next_position: int) -> None:
        self.position = int(next_position)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.position = 0
        return self.step(input_ids)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(**forward_kwargs(self.model, ids, self.cache, self.position))
        self.position += ids.shape[1]
        return out.logits[:, -1]


class CompiledDecoder(EagerDecoder):
    """`torch.compile(mode="reduce-overhead")` of the model's forward (inductor kernels replayed as a CUDA graph), the
    way transformers' generate() compiles decoding with a compileable cache (StaticCache, a static OSCAR cache)."""

    def __init__(self, model, cache, **compile_kwargs):
        super().__init__(model, cache)
        self.forward = torch.compile(model.forward, fullgraph=False, **compile_kwargs)
        self.cuda = model.device.type == "cuda"

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            # A new step: the cudagraph trees may reuse the previous step's output buffers (already consumed).
            torch.compiler.cudagraph_mark_step_begin()
        out = self.forward(**forward_kwargs(self.model, ids, self.cache, self.position))
        self.position += ids.shape[1]
        return out.logits[:, -1]


def make_decoder(env, mode: str, cache):
    if mode == "eager":
        return EagerDecoder(env.model, cache)
    if mode == "compile":
        return CompiledDecoder(env.model, cache, **env.compile_kwargs)
    raise ValueError(mode)


def time_steps(env, decoder, batch: int, warmup: int, steps: int) -> dict:
    """Greedy steps (argmax fed back, no host sync inside the timed loop); ms per step from CUDA events."""
    tok = torch.randint(0, env.vocab, (batch, 1), device=env.device)
    t0 = time.perf_counter()
    first_ms = None
    for i in range(warmup):
        tok = decoder.step(tok).argmax(-1, keepdim=True)
        if i == 0:
            sync(env)
            first_ms = (time.perf_counter() - t0) * 1e3  # includes capture / compilation
    sync(env)
    if env.cuda:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
    t1 = time.perf_counter()
    logits = None
    for _ in range(steps):
        logits = decoder.step(tok)
        tok = logits.argmax(-1, keepdim=True)
    if env.cuda:
        b.record()
        b.synchronize()
        ms = a.elapsed_time(b) / steps
    else:
        ms = (time.perf_counter() - t1) * 1e3 / steps
    finite = bool(torch.isfinite(logits).all()) if logits is not None else None
    return dict(ms=ms, tokens_per_s=batch * 1e3 / ms, first_step_ms=first_ms, warmup=warmup, steps=steps,
                logits_finite=finite)


def modes_for(env, kind: str) -> list[str]:
    """Decode modes timed on one cache, in this order."""
    if kind in ("dynamic", "quanto"):
        return ["eager"]
    return ["eager", "compile"]


def decode_rows(env, section: str, kind: str, modes: list[str], context: int, batch: int = 1,
                steps: int | None = None, graph_steps: int | None = None) -> list[dict]:
    """Build one cache of `context` tokens through the write path, then time each decode mode on it in turn.

    One row per mode; a failure (out of memory above all) ends the remaining modes with that error. `peak_gib` is the
    peak of the build and that mode's steps together (weights included); `resident_gib` what the cache holds."""
    args = env.args
    steps = steps or args.steps
    graph_steps = graph_steps or args.graph_steps
    base = dict(section=section, kind=kind, context=context, batch=batch)
    if kind == "quanto":
        base["note"] = f"unpack: {args.quanto_unpack}"
    rows = [dict(base, mode=m, name=NAMES[kind, m]) for m in modes]
    if env.over_budget():
        for r in rows:
            r["error"] = f"skipped: past --time-limit {args.time_limit:.0f} s"
        return rows
    if kind == "quanto" and (why := quanto_unavailable(args.quanto_unpack)):
        for r in rows:
            r["error"] = why
        return rows
    set_attention(env.model, "oscar" if kind == "oscar" else "sdpa")
    # Room for every mode's steps and warm-up steps.
    max_len = context + sum(args.warmup + max(steps, graph_steps) + 16 for _ in modes) + 256
    cache = decoder = None
    done = 0
    try:
        free(env)
        reset_peak(env)
        before = memory_allocated(env)
        t0 = time.perf_counter()
        cache = make_cache(env, kind, max_len)
        fill_context(env, cache, kind, batch, context)
        sync(env)
        build = dict(build_s=time.perf_counter() - t0, resident_gib=(memory_allocated(env) - before) / GiB,
                     build_peak_gib=peak_gib(env), max_cache_len=max_len, **cache_kv_bytes(cache, kind))
        for r, mode in zip(rows, modes):
            r.update(build)
            reset_peak(env)
            decoder = make_decoder(env, mode, cache)
            decoder.start(next_position=int(cache.get_seq_length()))
            n = graph_steps if mode == "compile" else steps
            warm = max(args.warmup, 3) if mode == "compile" else args.warmup
            r.update(time_steps(env, decoder, batch, warm, n))
            r["peak_gib"] = None if not env.cuda else max(build["build_peak_gib"], peak_gib(env))
            if mode == "compile":
                r["compile_impl"] = env.compile_note
            decoder = None
            if mode == "compile":
                reset_compiled()
            free(env)
            done += 1
            print(json.dumps(_printable(r)), flush=True)
    except Exception as e:  # noqa: BLE001 - an OOM or a failing path is a result, not the end of the run
        what = "out of memory" if is_oom(e) else f"{type(e).__name__}: {str(e)[:300]}"
        for r in rows[done:]:
            r["error"] = what
            print(json.dumps(_printable(r)), flush=True)
    finally:
        decoder = cache = None
        free(env)
    return rows


def reset_compiled() -> None:
    """Drop dynamo's compiled code and the cudagraph trees' memory pool before the next cache."""
    try:
        torch._dynamo.reset()
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
    except Exception:  # noqa: BLE001 - best effort; the next row's peak would show a leak
        pass


def _printable(row: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}


# ----------------------------------------------------------------------------------------------------------- sections
def floors(env, bw: float | None, context: int, batch: int = 1) -> dict:
    w = env.weight_read_bytes(batch)
    bf16 = w + batch * context * env.bf16_kv_bytes_per_token()
    int2 = w + batch * context * env.int2_kv_bytes_per_token()
    out = dict(weight_bytes=w, bf16_bytes=bf16, int2_bytes=int2)
    if bw:
        out.update(bf16_floor_ms=bf16 / bw * 1e3, int2_floor_ms=int2 / bw * 1e3)
    return out


def annotate(rows: list[dict], floor: dict, bw: float | None) -> None:
    """Ratios within one context (and batch): vs eager DynamicCache, vs the best BF16 row, vs the floors."""
    ok = [r for r in rows if r.get("ms")]
    dyn = next((r["ms"] for r in ok if r["kind"] == "dynamic" and r["mode"] == "eager"), None)
    bf16 = [r["ms"] for r in ok if r["kind"] in BF16_ROWS]
    best = min(bf16) if bf16 else None
    for r in ok:
        r["speedup_vs_dynamic_eager"] = dyn / r["ms"] if dyn else None
        r["speedup_vs_best_bf16"] = best / r["ms"] if best else None
        if bw:
            r["x_int2_floor"] = r["ms"] / floor["int2_floor_ms"]
            r["x_bf16_floor"] = r["ms"] / floor["bf16_floor_ms"]
            if r.get("kv_held_bytes"):
                own = floor["weight_bytes"] + r["kv_held_bytes"]
                r["own_floor_ms"] = own / bw * 1e3  # with OSCAR's BF16 windows counted


class StepClock:
    """A generate() streamer that timestamps every token it is handed (the prompt first). A token reaches the host only
    once the device has computed it, so a gap is one whole decode step. It does not synchronise with the device
    itself: with an OSCAR cache on CUDA, generate() hands each token over one step late while the next step already
    runs (`oscar_hf.deferred_stop`), and a sync here would take that overlap away."""

    def __init__(self):
        self.stamps = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def timings(self, warmup: int) -> dict:
        """ms per token (median gap between new tokens after `warmup` of them), the first gaps in s (what is paid
        once: the compiled step's compile and graph capture, as the first new token is the eager forward of the
        prompt's last token) and the slowest steady gap (a recompile or a stall)."""
        gaps = [b - a for a, b in zip(self.stamps[1:], self.stamps[2:])]  # stamps[0]: the prompt
        steady = gaps[min(warmup, len(gaps) - 1):]
        return dict(ms=statistics.median(steady) * 1e3, first_gaps_s=[round(g, 3) for g in gaps[:3]],
                    max_steady_ms=max(steady) * 1e3)


GENERATE_ROWS = (  # in order of importance: a run cut short by --time-limit keeps the first rows
    ("dynamic", "eager", "DynamicCache generate()"),
    ("oscar", "compile", "OSCAR generate() compiled"),
    ("static", "compile", "StaticCache generate() compiled"),
    ("oscar", "eager", "OSCAR generate() eager"),
)
# Asked for by name only: the compiled OSCAR step launched as before the launch cuts of 2026-12-07 (the window write
# in `update()` and the decode rotating its own query, `oscar_hf.cache.DEFER_WINDOW_WRITE = False`; keys and values
# demoted in two launches, `oscar_hf.ops.PAIRED_DEMOTION = False`), beside the default row, to time what they save.
GENERATE_EXTRA_ROWS = (
    ("oscar", "compile-unfused", "OSCAR generate() compiled, two launches more a layer"),
    ("oscar", "compile-merge", "OSCAR generate() compiled, stage 2 merged into stage 1"),
    ("oscar", "compile-occupancy", "OSCAR generate() compiled, Gluon body 2 stages, 168 registers, 12 an SM"),
)


def decode_options(mode: str):
    """The decode launch options of a generate() row (`oscar_hf.ops.DECODE_OPTIONS`; None: the defaults).
    `compile-merge`: `merge_in_stage1` (the static layers count arrivals in their own `lengths`).
    `compile-occupancy`: the Gluon body (asked for, so an error where it cannot serve) with 2 pipeline stages and 168
    registers, 12 programs an SM (the sixteenth session's offline compile: no spill, 18 KiB of shared memory)."""
    from oscar_hf.kernels import decode_attention as dk

    if mode == "compile-merge":
        return dk.DecodeOptions(merge_in_stage1=True)
    if mode == "compile-occupancy":
        return dk.DecodeOptions(hopper_body=True, body_stages=2, body_max_registers=168, programs_per_sm=12)
    return None


def generate_row(env, kind: str, mode: str, name: str, context: int, batch: int = 1) -> dict:
    """One `model.generate()` call over a cache holding `context` tokens (written through its write path), feeding one
    more prompt token and decoding `--generate-tokens` greedily; ms per token from the streamer's timestamps."""
    args = env.args
    new = args.generate_tokens
    row = dict(section="generate", kind=kind, mode=mode, name=name, context=context, new_tokens=new, batch=batch)
    if env.over_budget():
        row["error"] = f"skipped: past --time-limit {args.time_limit:.0f} s"
        return row
    set_attention(env.model, "oscar" if kind == "oscar" else "sdpa")
    cache = None
    compiled = mode.startswith("compile")
    from oscar_hf import cache as cache_module
    from oscar_hf import ops

    cache_module.DEFER_WINDOW_WRITE = ops.PAIRED_DEMOTION = mode != "compile-unfused"
    try:
        ops.DECODE_OPTIONS = decode_options(mode) if kind == "oscar" and env.cuda else None
        free(env)
        reset_peak(env)
        cache = make_cache(env, kind, context + new + 64)
        fill_context(env, cache, kind, batch, context)
        ids = torch.randint(0, env.vocab, (batch, context + 1), device=env.device)
        clock = StepClock()
        kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock,
                      attention_mask=torch.ones_like(ids), pad_token_id=0)
        if mode == "eager":
            kwargs["disable_compile"] = True
        elif not env.cuda:
            from transformers import CompileConfig

            kwargs["compile_config"] = config = CompileConfig(backend="eager", mode=None)
            config._compile_all_devices = True  # (a class attribute: transformers compiles on CPU only when asked)
        if compiled and not cache.is_compileable:
            raise RuntimeError(f"{type(cache).__name__} is not compileable: generate() would run eagerly")
        t0 = time.perf_counter()
        env.model.generate(ids, **{cache_keyword(env.model): cache}, **kwargs)
        total = time.perf_counter() - t0
        timed = clock.timings(args.warmup)
        ms = timed["ms"]
        # The step generate() compiles and captures is the second new token's. With an OSCAR cache on CUDA the
        # streamer gets each token one step late (oscar_hf.deferred_stop), so the stall shows in the first token's
        # arrival instead of the first gap: the time to the second token covers it either way.
        row.update(**timed, tokens_per_s=batch * 1e3 / ms, first_token_s=clock.stamps[1] - t0,
                   second_token_s=clock.stamps[2] - t0 if len(clock.stamps) > 2 else None, total_s=total,
                   peak_gib=peak_gib(env), compile_impl=env.compile_note if compiled else None)
    except Exception as e:  # noqa: BLE001 - an OOM or a failing path is a result, not the end of the run
        row["error"] = "out of memory" if is_oom(e) else f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        cache = None
        cache_module.DEFER_WINDOW_WRITE = ops.PAIRED_DEMOTION = True
        ops.DECODE_OPTIONS = None
        if compiled:
            reset_compiled()
        free(env)
    print(json.dumps(_printable(row)), flush=True)
    return row


def section_generate(env, bw, out) -> None:
    rows = []
    wanted = [tuple(r.split(":")) for r in env.args.generate_rows.split(",") if r]
    names = {(k, m): n for k, m, n in GENERATE_ROWS + GENERATE_EXTRA_ROWS}
    for context in (int(c) for c in env.args.generate_contexts.split(",") if c):
        block = [generate_row(env, kind, mode, names[kind, mode], context) for kind, mode in wanted]
        dyn = next((r for r in block if r["kind"] == "dynamic" and r.get("ms")), None)
        static = next((r for r in block if r["kind"] == "static" and r.get("ms")), None)
        floor = floors(env, bw, context)
        for r in block:
            if dyn and r.get("ms"):
                r["speedup_vs_dynamic"] = dyn["ms"] / r["ms"]
            if static and r.get("ms"):
                r["speedup_vs_static_compiled"] = static["ms"] / r["ms"]
            if bw and r.get("ms"):
                r["x_int2_floor"] = r["ms"] / floor["int2_floor_ms"]
                r["x_bf16_floor"] = r["ms"] / floor["bf16_floor_ms"]
        rows += block
        out["generate"] = rows
        write_json(env, out)


def section_decode(env, bw, out) -> None:
    args = env.args
    kinds = [k for k in args.kinds.split(",") if k]
    quanto_contexts = {int(c) for c in args.quanto_contexts.split(",") if c}
    result = []
    for context in (int(c) for c in args.contexts.split(",")):
        rows = []
        for kind in kinds:
            if kind == "quanto" and context not in quanto_contexts:
                continue
            rows += decode_rows(env, "decode", kind, modes_for(env, kind), context)
        floor = floors(env, bw, context)
        annotate(rows, floor, bw)
        result.append(dict(context=context, floors=floor, rows=rows))
        out["decode"] = result
        write_json(env, out)


def section_largest(env, bw, out) -> None:
    args = env.args
    dyn = []
    for context in (int(c) for c in args.dynamic_largest.split(",")):
        rows = decode_rows(env, "largest", "dynamic", ["eager"], context, steps=2)
        dyn += rows
        if rows[0].get("error"):
            break
    fits = [r["context"] for r in dyn if r.get("ms")]
    oscar = decode_rows(env, "largest", "oscar", ["eager", "compile"], args.oscar_largest,
                        steps=min(args.steps, 8), graph_steps=min(args.graph_steps, 16))
    floor = floors(env, bw, args.oscar_largest)
    annotate(oscar, floor, bw)
    out["largest"] = dict(dynamic=dyn, dynamic_largest_fit=max(fits) if fits else None,
                          dynamic_first_failure=next((r["context"] for r in dyn if r.get("error")), None),
                          oscar=oscar, oscar_floors=floor)
    write_json(env, out)


def largest_batch_rows(env, bw, context: int, per_seq: dict, run_row) -> tuple[list[dict], float | None]:
    """For each cache kind in `per_seq` (bytes per sequence), `run_row(kind, batch)` at the largest batch the KV budget
    holds (on OOM: said in the row, then 3/4 of the batch, twice at most). Rows carry the plan and their floor ratios;
    also returns OSCAR / StaticCache aggregate tokens/s."""
    rows = []
    for kind, bytes_per_seq in per_seq.items():
        planned = int(env.args.kv_budget_gib * GiB // bytes_per_seq)
        batch = planned
        for _ in range(3):
            if batch < 1:
                break
            row = run_row(kind, batch)
            row.update(planned_batch=planned, kv_bytes_per_sequence=bytes_per_seq, kv_budget_gib=env.args.kv_budget_gib)
            rows.append(row)
            if not (row.get("error") and "out of memory" in row["error"]):
                break
            batch = int(batch * 0.75)
    ok = {r["kind"]: r for r in rows if r.get("ms")}
    for r in ok.values():
        r["aggregate_tokens_per_s"] = r["tokens_per_s"]
        if bw:
            f = floors(env, bw, context, r["batch"])
            r["x_int2_floor"] = r["ms"] / f["int2_floor_ms"]
            r["x_bf16_floor"] = r["ms"] / f["bf16_floor_ms"]
    ratio = ok["oscar"]["tokens_per_s"] / ok["static"]["tokens_per_s"] if {"oscar", "static"} <= ok.keys() else None
    return rows, ratio


def section_batch(env, bw, out) -> None:
    """Largest batch within the KV budget for each cache (from its bytes per sequence), then a compiled decode step."""
    args = env.args
    context = args.batch_context
    margin = 2 * (args.warmup + args.graph_steps + 16) + 256
    per_seq = dict(static=(context + margin) * env.bf16_kv_bytes_per_token(),
                   oscar=env.oscar_allocated_bytes(1, context + margin))
    rows, ratio = largest_batch_rows(
        env, bw, context, per_seq, lambda kind, batch: decode_rows(env, "batch", kind, ["compile"], context, batch)[0])
    out["batch"] = dict(context=context, kv_budget_gib=args.kv_budget_gib, rows=rows, oscar_over_bf16=ratio)
    write_json(env, out)


def section_generate_batch(env, bw, out) -> None:
    """`model.generate()` at the largest batch each cache fits in the KV budget (`--kv-budget-gib`, from its bytes per
    sequence), each compiled by generate() itself; aggregate tokens/s. The contexts are written through each cache's
    write path and generate() continues from the filled cache (as the `generate` section does)."""
    args = env.args
    context = args.batch_context
    span = context + args.generate_tokens + 64  # the caches' max_cache_len (generate_row)
    per_seq = dict(oscar=env.oscar_allocated_bytes(1, span), static=span * env.bf16_kv_bytes_per_token())
    names = {(k, m): n for k, m, n in GENERATE_ROWS + GENERATE_EXTRA_ROWS}
    rows, ratio = largest_batch_rows(
        env, bw, context, per_seq,
        lambda kind, batch: generate_row(env, kind, "compile", names[kind, "compile"], context, batch=batch))
    out["generate_batch"] = dict(context=context, kv_budget_gib=args.kv_budget_gib, rows=rows, oscar_over_static=ratio)
    write_json(env, out)


def prefill_row(env, kind: str, context: int, chunk: int, model_tokens: int | None = None) -> dict:
    """Chunked prefill through the model; with `model_tokens`, only the last `model_tokens` go through the model and
    the head of the prompt is written through the cache's write path first (a long prompt's last chunks)."""
    args = env.args
    model_tokens = context if model_tokens is None else min(model_tokens, context)
    prefix = context - model_tokens
    row = dict(section="prefill", kind=kind, name=NAMES.get((kind, "eager"), kind).replace(" eager", ""),
               context=context, written_through_cache=prefix, model_tokens=model_tokens, chunk=chunk)
    if env.over_budget():
        row["error"] = f"skipped: past --time-limit {args.time_limit:.0f} s"
        return row
    if kind == "quanto" and (why := quanto_unavailable(args.quanto_unpack)):
        row["error"] = why
        return row
    set_attention(env.model, "oscar" if kind == "oscar" else "sdpa")
    cache = out = None
    try:
        free(env)
        reset_peak(env)
        cache = make_cache(env, kind, context + 256)
        if prefix:
            fill_context(env, cache, kind, 1, prefix)
        sync(env)
        ids = torch.randint(0, env.vocab, (1, model_tokens), device=env.device)
        chunk_ms = []
        t0 = time.perf_counter()
        for s in range(0, model_tokens, chunk):
            t1 = time.perf_counter()
            out = env.model(**forward_kwargs(env.model, ids[:, s : s + chunk], cache, prefix + s))
            sync(env)  # per-chunk times show how a chunk's cost grows with the history
            chunk_ms.append((time.perf_counter() - t1) * 1e3)
        total = time.perf_counter() - t0
        row.update(seconds=total, tokens_per_s=model_tokens / total, chunk_ms=chunk_ms, peak_gib=peak_gib(env),
                   logits_finite=bool(torch.isfinite(out.logits).all()))
    except Exception as e:  # noqa: BLE001
        row["error"] = "out of memory" if is_oom(e) else f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        cache = out = None
        free(env)
    print(json.dumps(_printable(row)), flush=True)
    return row


def section_prefill(env, bw, out) -> None:
    args = env.args
    kinds = [k for k in args.kinds.split(",") if k]
    rows = [prefill_row(env, kind, args.prefill_context, args.prefill_chunk) for kind in kinds]
    long_tokens = args.prefill_long_chunks * args.prefill_chunk
    for kind in ("dynamic", "oscar"):
        if kind in kinds and args.prefill_long_chunks > 0:
            rows.append(prefill_row(env, kind, args.prefill_long_context, args.prefill_chunk, long_tokens))
    out["prefill"] = rows
    write_json(env, out)


# ----------------------------------------------------------------------------------------------------------- report
def write_json(env, out) -> None:
    out["elapsed_s"] = env.elapsed()
    if env.args.json:
        with open(env.args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


def fmt(v, spec=".1f", none="-") -> str:
    return none if v is None else format(v, spec)


def times(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def note(r: dict) -> str:
    return "; ".join(x for x in (r.get("error"), r.get("note")) if x)


def ctx(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def print_tables(env, out) -> None:
    print(f"\n{out['device']}; torch {out['torch']}; transformers {out['transformers']}; {out['date']}; "
          f"copy bandwidth {fmt(out['copy_bw_tbs'], '.3f')} TB/s; compiled rows: {env.compile_note}")
    if out.get("generate"):
        print("\ngenerate(), batch 1, ms per token (median gap between streamed tokens)")
        print("| context | row | ms/token | tok/s | vs DynamicCache | vs StaticCache compiled | x INT2 floor "
              "| x BF16 floor | first token s | second token s (compiled: with compilation) | note |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in out["generate"]:
            print(f"| {ctx(r['context'])} | {r['name']} | {fmt(r.get('ms'), '.2f')} | {fmt(r.get('tokens_per_s'))} | "
                  f"{times(r.get('speedup_vs_dynamic'))} | {times(r.get('speedup_vs_static_compiled'))} | "
                  f"{fmt(r.get('x_int2_floor'), '.2f')} | {fmt(r.get('x_bf16_floor'), '.2f')} | "
                  f"{fmt(r.get('first_token_s'), '.1f')} | {fmt(r.get('second_token_s'), '.1f')} | {note(r)} |")
    if out.get("generate_batch"):
        gb = out["generate_batch"]
        print(f"\ngenerate() at the largest batch in {gb['kv_budget_gib']} GiB of KV, context {ctx(gb['context'])}: "
              f"OSCAR / StaticCache aggregate tokens/s = {fmt(gb['oscar_over_static'], '.2f')}x")
        print("| row | batch (planned) | ms/step | aggregate tok/s | x INT2 floor | peak GiB | note |")
        print("|---|---|---|---|---|---|---|")
        for r in gb["rows"]:
            print(f"| {r['name']} | {r['batch']} ({r['planned_batch']}) | {fmt(r.get('ms'), '.2f')} | "
                  f"{fmt(r.get('tokens_per_s'))} | {fmt(r.get('x_int2_floor'), '.2f')} | {fmt(r.get('peak_gib'))} | "
                  f"{note(r)} |")
    for block in out.get("decode", []):
        f = block["floors"]
        print(f"\ndecode, batch 1, context {ctx(block['context'])}: "
              f"BF16 floor {fmt(f.get('bf16_floor_ms'), '.2f')} ms, "
              f"INT2 floor {fmt(f.get('int2_floor_ms'), '.2f')} ms (weights {f['weight_bytes'] / 1e9:.2f} GB read)")
        print("| row | ms/step | tok/s | vs Dynamic eager | vs best BF16 | x INT2 floor | x BF16 floor | peak GiB "
              "| note |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in block["rows"]:
            print(f"| {r['name']} | {fmt(r.get('ms'), '.2f')} | {fmt(r.get('tokens_per_s'))} | "
                  f"{times(r.get('speedup_vs_dynamic_eager'))} | {times(r.get('speedup_vs_best_bf16'))} | "
                  f"{fmt(r.get('x_int2_floor'), '.2f')} | {fmt(r.get('x_bf16_floor'), '.2f')} | "
                  f"{fmt(r.get('peak_gib'))} | {note(r)} |")
    if "largest" in out:
        lg = out["largest"]
        print(f"\nlargest context: DynamicCache fits {fmt(lg['dynamic_largest_fit'], 'd')} tokens, first failure at "
              f"{fmt(lg['dynamic_first_failure'], 'd')}")
        print("| row | context | ms/step | tok/s | resident KV GiB | peak GiB | note |")
        print("|---|---|---|---|---|---|---|")
        for r in lg["dynamic"] + lg["oscar"]:
            print(f"| {r['name']} | {r['context']} | {fmt(r.get('ms'), '.2f')} | {fmt(r.get('tokens_per_s'))} | "
                  f"{fmt(r.get('resident_gib'), '.2f')} | {fmt(r.get('peak_gib'))} | {note(r)} |")
    if "batch" in out:
        b = out["batch"]
        print(f"\nbatch throughput at {ctx(b['context'])}, KV budget {b['kv_budget_gib']} GiB: OSCAR / best BF16 "
              f"aggregate tokens/s = {fmt(b['oscar_over_bf16'], '.2f')}x")
        print("| row | batch (planned) | KV GiB allocated | ms/step | aggregate tok/s | x INT2 floor | peak GiB "
              "| note |")
        print("|---|---|---|---|---|---|---|---|")
        for r in b["rows"]:
            print(f"| {r['name']} | {r['batch']} ({r['planned_batch']}) | "
                  f"{fmt((r.get('kv_allocated_bytes') or 0) / GiB if r.get('kv_allocated_bytes') else None, '.2f')} | "
                  f"{fmt(r.get('ms'), '.2f')} | {fmt(r.get('tokens_per_s'))} | {fmt(r.get('x_int2_floor'), '.2f')} | "
                  f"{fmt(r.get('peak_gib'))} | {note(r)} |")
    if "prefill" in out:
        print("\nchunked prefill through the model (head of the prompt written through the cache where noted)")
        print("| cache | context | through model | chunk | s | tok/s | first / last chunk ms | peak GiB | note |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in out["prefill"]:
            cms = r.get("chunk_ms") or []
            print(f"| {r['name']} | {ctx(r['context'])} | {r['model_tokens']} | {r['chunk']} | "
                  f"{fmt(r.get('seconds'), '.2f')} | {fmt(r.get('tokens_per_s'), '.0f')} | "
                  f"{fmt(cms[0] if cms else None)} / {fmt(cms[-1] if cms else None)} | {fmt(r.get('peak_gib'))} | "
                  f"{note(r)} |")
    bars = issue_bars(out)
    if bars:
        print("\nissue bars (same run):")
        for line in bars:
            print("  " + line)
    print(f"\ntotal {env.elapsed():.0f} s")


def _find(rows, kind, mode):
    return next((r for r in rows if r["kind"] == kind and r["mode"] == mode and r.get("ms")), None)


def peak_ratio(what: str, oscar: float, dynamic: float, weights: float) -> str:
    return (f"{what} peak OSCAR / DynamicCache {oscar:.1f} / {dynamic:.1f} GiB = {oscar / dynamic:.2f} "
            f"(above the {weights:.1f} GiB of weights: {(oscar - weights) / max(dynamic - weights, 1e-9):.2f}; "
            "bar <= 0.5 at 128K)")


def issue_bars(out) -> list[str]:
    lines = []
    for c in sorted({r["context"] for r in out.get("generate", [])}):
        og = _find([r for r in out["generate"] if r["context"] == c], "oscar", "compile")
        if og:
            lines.append(f"{ctx(c)} generate(): OSCAR compiled {fmt(og.get('x_int2_floor'), '.2f')}x the INT2 floor "
                         f"(issue 19 bar <= 1.5x), {fmt(og.get('x_bf16_floor'), '.2f')}x the BF16 floor (bar < 1), "
                         f"{times(og.get('speedup_vs_dynamic'))} DynamicCache (bar 4x at 128K), "
                         f"{times(og.get('speedup_vs_static_compiled'))} StaticCache compiled (bar 3x at 128K)")
    if out.get("generate_batch", {}).get("oscar_over_static") is not None:
        lines.append(f"{ctx(out['generate_batch']['context'])} generate() at the largest batch: OSCAR / StaticCache "
                     f"aggregate tokens/s {out['generate_batch']['oscar_over_static']:.2f}x (issue 19 bar 6x)")
    weights = out["model"]["weights_gib"]
    for block in out.get("decode", []):
        rows, c = block["rows"], ctx(block["context"])
        og, dyn = _find(rows, "oscar", "compile"), _find(rows, "dynamic", "eager")
        static_best = min((r["ms"] for r in rows if r["kind"] == "static" and r["mode"] == "compile"
                           and r.get("ms")), default=None)
        qu = _find(rows, "quanto", "eager")
        if og and dyn:
            lines.append(f"{c}: OSCAR compiled vs eager DynamicCache {dyn['ms'] / og['ms']:.2f}x (bar 4x at 128K)")
        if og and static_best:
            lines.append(f"{c}: OSCAR compiled vs compiled StaticCache {static_best / og['ms']:.2f}x "
                         "(bar 1.6x at 128K)")
        if og and og.get("x_int2_floor"):
            lines.append(f"{c}: OSCAR compiled at {og['x_int2_floor']:.2f}x the INT2 floor (stretch: 2x)")
        if og and qu:
            lines.append(
                f"{c}: OSCAR compiled vs QuantizedCache quanto int2 {qu['ms'] / og['ms']:.2f}x (bar 3x at 32K)"
            )
        oscar_peak = max((r["peak_gib"] for r in rows if r["kind"] == "oscar" and r.get("peak_gib")), default=None)
        if dyn and dyn.get("peak_gib") and oscar_peak:
            lines.append(f"{c}: {peak_ratio('context build + decode', oscar_peak, dyn['peak_gib'], weights)}")
    prefill = {(r["kind"], r["model_tokens"] < r["context"], r["context"]): r for r in out.get("prefill", [])}
    for (kind, partial, context), r in sorted(prefill.items()):
        d = prefill.get(("dynamic", partial, context))
        if kind == "oscar" and d and r.get("peak_gib") and d.get("peak_gib"):
            what = f"prefill of the last {r['model_tokens']} tokens" if partial else "chunked prefill"
            lines.append(f"{ctx(context)}: {peak_ratio(what, r['peak_gib'], d['peak_gib'], weights)}")
    if "largest" in out:
        lg = out["largest"]
        o = [r for r in lg["oscar"] if r.get("ms")]
        lines.append(f"largest: DynamicCache fits {lg['dynamic_largest_fit']} (fails at {lg['dynamic_first_failure']});"
                     f" OSCAR {lg['oscar'][0]['context']} tokens: "
                     + (", ".join(f"{r['mode']} {r['ms']:.1f} ms/step, peak {fmt(r.get('peak_gib'))} GiB" for r in o)
                        or lg["oscar"][0].get("error", "failed")))
    if out.get("batch", {}).get("oscar_over_bf16") is not None:
        lines.append(f"batch: OSCAR / best BF16 aggregate tokens/s {out['batch']['oscar_over_bf16']:.2f}x (bar 5x)")
    return lines


def plot(out, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot", flush=True)
        return
    series: dict[str, dict[int, tuple[float, float | None]]] = {}
    rows = [r for b in out.get("decode", []) for r in b["rows"]]
    if "largest" in out:
        rows += out["largest"]["dynamic"] + out["largest"]["oscar"]
    for r in rows:  # the decode section's row first: more steps than the largest-context probe at the same context
        if r.get("ms"):
            series.setdefault(r["name"], {}).setdefault(r["context"], (r["tokens_per_s"], r.get("peak_gib")))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, by_context in sorted(series.items()):
        pts = sorted((c, t, m) for c, (t, m) in by_context.items())
        a.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        mem = [(p[0], p[2]) for p in pts if p[2] is not None]
        if mem:
            b.plot([m[0] for m in mem], [m[1] for m in mem], "o-", label=name)
    for ax, ylabel in ((a, "decode tokens/s (batch 1)"), (b, "peak GPU memory, GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    a.set_yscale("log")
    if torch.cuda.is_available():
        b.axhline(torch.cuda.get_device_properties(0).total_memory / GiB, color="k", ls="--", lw=0.8)
    a.legend(fontsize=7)
    fig.suptitle(f"Qwen3-8B shape, random weights, {out['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}", flush=True)


# ----------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="generate,decode,largest,batch,prefill")
    p.add_argument("--kinds", default="dynamic,static,oscar,quanto", help="caches in the decode and prefill sections")
    p.add_argument("--generate-rows", default=",".join(f"{k}:{m}" for k, m, _ in GENERATE_ROWS),
                   help="kind:mode rows of the generate section, in order")
    p.add_argument("--quanto-unpack", choices=("torch", "extension"), default="torch",
                   help="how quanto unpacks int2 codes: PyTorch ops, or its compiled extension (built on first use, "
                   "minutes)")
    p.add_argument("--tiny", action="store_true", help="toy 2-layer model and contexts (CPU dry run)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 36, or 2 with --tiny)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="model and KV dtype (float32 makes CPU dry runs faster)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG of tokens/s and peak memory against context")
    p.add_argument("--time-limit", type=float, default=520.0,
                   help="seconds after which the remaining rows are skipped (0: none); a device command stops at 600")
    for key, value in FULL.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None, help=f"default {value}")
    args = p.parse_args(argv)
    known = {f"{k}:{m}" for k, m, _ in GENERATE_ROWS + GENERATE_EXTRA_ROWS}
    if not set(r for r in args.generate_rows.split(",") if r) <= known:
        p.error(f"--generate-rows takes a comma list of {sorted(known)}")
    preset = TINY if args.tiny else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run with --tiny --device cpu for a dry run.")
    config = make_config(args.tiny, args.layers)
    t0 = time.perf_counter()
    model = build_model(config, args.device, getattr(torch, args.dtype))
    # From the command's start when run as a script; from this call when imported (tests).
    env = Env(args, model, config, _T0 if argv is None else t0)
    if env.cuda:
        torch.cuda.synchronize()
    out = dict(
        device=torch.cuda.get_device_name(env.device) if env.cuda else "cpu",
        torch=torch.__version__, transformers=__import__("transformers").__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(sys.argv), commit=_commit(), args=vars(args), compile_impl=env.compile_note,
        model=dict(layers=env.layers, kv_heads=env.kv_heads, head_dim=env.head_dim, vocab=env.vocab,
                   params=sum(p.numel() for p in model.parameters()), build_s=time.perf_counter() - t0,
                   weights_gib=memory_allocated(env) / GiB),
    )
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps({k: v for k, v in out.items() if k != "args"}), flush=True)
    bw = copy_bandwidth(env)
    out["copy_bw_tbs"] = bw / 1e12 if bw else None
    print(f"copy bandwidth (read + write): {fmt(out['copy_bw_tbs'], '.3f')} TB/s", flush=True)
    sections = {s for s in args.sections.split(",") if s}
    with torch.no_grad():
        for name, fn in (("generate", section_generate), ("decode", section_decode), ("largest", section_largest),
                         ("batch", section_batch), ("generate_batch", section_generate_batch),
                         ("prefill", section_prefill)):
            if name in sections:
                t = time.perf_counter()
                fn(env, bw, out)
                out.setdefault("section_s", {})[name] = time.perf_counter() - t
                print(f"# section {name}: {out['section_s'][name]:.0f} s (total {env.elapsed():.0f} s)", flush=True)
    write_json(env, out)
    if args.plot:
        plot(out, args.plot)
    print_tables(env, out)
    return out


def _commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - the device copy may have no .git
        return None


if __name__ == "__main__":
    main()
