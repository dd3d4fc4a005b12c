"""Where a compiled `generate()` step's time goes (issue 19): the captured graph on the device, the host work of the
compiled call (guards, input handling, graph launch), and generate()'s own loop between steps, during which the
device idles because generate() synchronises every step (stopping check, streamer).

Each cache (`--kinds`: a static OSCAR cache with Hadamard rotations, then transformers' StaticCache; Qwen3-8B shape by
default, random weights) is filled to `--context` tokens through its write path; then:

1. `model.generate()` compiled by transformers (its default `compile_config`), `--new` tokens, with the compiled
   call wrapped to take host timestamps and CUDA events around it; cProfile runs over the steady steps.
2. The very compiled callable generate() used, replayed back to back on the same inputs with no host sync (the
   device's own throughput: graph time plus launch gaps between replays), and with a sync after each call.

    python benchmarks/research/generate_step_split.py [--context 131072] [--layers 36] [--new 48] [--json f]
    python benchmarks/research/generate_step_split.py --tiny --context 600 --new 12 --replays 4   # CPU dry run

A short table is printed last; `--profile-out` keeps the cProfile listing.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_e2e as be  # noqa: E402

from oscar_hf import cache_keyword  # noqa: E402


class Stamp:
    """A point on the device's timeline (a CUDA event), or on the host's for a CPU dry run."""

    def __init__(self, cuda: bool):
        self.event = torch.cuda.Event(enable_timing=True) if cuda else None
        self.t = None

    def record(self) -> None:
        if self.event is not None:
            self.event.record()
        else:
            self.t = time.perf_counter()

    def synchronize(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def elapsed_time(self, later: Stamp) -> float:
        """ms from this stamp to `later`."""
        if self.event is not None:
            return self.event.elapsed_time(later.event)
        return (later.t - self.t) * 1e3


class Probe:
    """Wraps the compiled call generate() fetches, and is also generate()'s streamer."""

    def __init__(self, model, profile_from: int, profile_to: int):
        self.model, self.cuda = model, model.device.type == "cuda"
        self.calls = []  # (host start, host end, event before, event after)
        self.syncs = []  # host time after each token's sync
        self.last_kwargs = None
        self.compiled = None
        self.profile = cProfile.Profile()
        self.profile_from, self.profile_to = profile_from, profile_to
        real = model.get_compiled_call

        def get_compiled_call(config):
            self.compiled = real(config)
            return self.wrapped

        model.get_compiled_call = get_compiled_call

    def wrapped(self, **kwargs):
        a, b = Stamp(self.cuda), Stamp(self.cuda)
        t0 = time.perf_counter()
        a.record()
        out = self.compiled(**kwargs)
        b.record()
        t1 = time.perf_counter()
        self.calls.append((t0, t1, a, b))
        self.last_kwargs = kwargs
        return out

    # streamer
    def put(self, value) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.syncs.append(time.perf_counter())
        n = len(self.syncs)
        if n == self.profile_from:
            self.profile.enable()
        elif n == self.profile_to:
            self.profile.disable()

    def end(self) -> None:
        pass


def replay(env, compiled, kwargs, steps: int, sync_each: bool) -> float:
    """ms per call of the compiled forward on fixed inputs (the cache's device lengths advance each call)."""
    a, b = Stamp(env.cuda), Stamp(env.cuda)
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        compiled(**kwargs)
    be.sync(env)
    a.record()
    for _ in range(steps):
        torch.compiler.cudagraph_mark_step_begin()
        compiled(**kwargs)
        if sync_each:
            be.sync(env)
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / steps


def measure(env, kind: str, args) -> tuple[dict, str]:
    """One cache kind: the generate() probe, then the replays; returns the row and the cProfile listing."""
    model, new = env.model, args.new
    be.set_attention(model, "oscar" if kind == "oscar" else "sdpa")
    cache = be.make_cache(env, kind, args.context + new + 2 * args.replays + 80)
    with torch.no_grad():
        be.fill_context(env, cache, kind, 1, args.context)
    ids = torch.randint(0, env.vocab, (1, args.context + 1), device=env.device)
    probe = Probe(model, profile_from=new // 3, profile_to=new - 4)
    kwargs = {}
    if not env.cuda:  # CPU dry run: transformers compiles on the CPU only when asked, here with dynamo alone
        from transformers import CompileConfig

        kwargs["compile_config"] = config = CompileConfig(backend="eager", mode=None)
        config._compile_all_devices = True
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            model.generate(ids, **{cache_keyword(model): cache}, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, streamer=probe, attention_mask=torch.ones_like(ids), pad_token_id=0,
                           **kwargs)
    finally:
        del model.get_compiled_call  # the class's again
    total = time.perf_counter() - t0

    steady = range(len(probe.calls) // 3, len(probe.calls) - 1)
    # syncs[0] is the prompt, syncs[1] the first new token (prefill); call i makes token i + 2
    row = dict(kind=kind, generate_total_s=total,
               generate_step_ms=statistics.median((probe.syncs[i + 2] - probe.syncs[i + 1]) * 1e3 for i in steady),
               compiled_call_host_ms=statistics.median((probe.calls[i][1] - probe.calls[i][0]) * 1e3 for i in steady),
               loop_host_ms=statistics.median((probe.calls[i][0] - probe.syncs[i + 1]) * 1e3 for i in steady),
               call_span_gpu_ms=statistics.median(probe.calls[i][2].elapsed_time(probe.calls[i][3]) for i in steady),
               between_calls_gpu_ms=statistics.median(
                   probe.calls[i][3].elapsed_time(probe.calls[i + 1][2]) for i in steady))
    with torch.no_grad():
        row["replay_back_to_back_ms"] = replay(env, probe.compiled, probe.last_kwargs, args.replays, sync_each=False)
        row["replay_synced_ms"] = replay(env, probe.compiled, probe.last_kwargs, args.replays, sync_each=True)
    print(json.dumps(row), flush=True)

    s = io.StringIO()
    stats = pstats.Stats(probe.profile, stream=s)
    n_prof = max(1, probe.profile_to - probe.profile_from)
    s.write(f"# {kind}: cProfile over {n_prof} steady generate() steps (per-step host ms = cumtime / {n_prof})\n")
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(30)
    del cache, probe
    be.reset_compiled()
    be.free(env)
    return row, s.getvalue()


ROWS = (("generate_step_ms", "generate() step (streamer gaps)"),
        ("replay_back_to_back_ms", "compiled call replayed back to back, no sync"),
        ("replay_synced_ms", "compiled call replayed, sync after each"),
        ("call_span_gpu_ms", "device time from before the call to after it (in generate)"),
        ("between_calls_gpu_ms", "device time between calls (post-processing + idle)"),
        ("compiled_call_host_ms", "host time inside the compiled call"),
        ("loop_host_ms", "host time from the sync to the next call (generate's loop)"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--new", type=int, default=48)
    p.add_argument("--replays", type=int, default=40)
    p.add_argument("--kinds", default="oscar,static", help="caches, in order: oscar (static OSCAR), static")
    p.add_argument("--tiny", action="store_true", help="CPU dry run: bench_e2e's toy model, float32, dynamo only")
    p.add_argument("--json")
    p.add_argument("--profile-out")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or not set(kinds) <= {"oscar", "static"}:
        p.error("--kinds takes a comma list of oscar, static")
    if not args.tiny and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --tiny for a CPU dry run)")
        return 2
    device, dtype = ("cpu", "float32") if args.tiny else ("cuda", "bfloat16")
    bargs = be.parse_args(["--sections", "", "--device", device, "--dtype", dtype, *(["--tiny"] if args.tiny else []),
                           *(["--layers", str(args.layers)] if args.layers else [])])
    config = be.make_config(args.tiny, args.layers)
    model = be.build_model(config, device, getattr(torch, dtype))
    env = be.Env(bargs, model, config, time.perf_counter())
    bw = be.copy_bandwidth(env)
    floor = be.floors(env, bw, args.context)
    out = dict(device=torch.cuda.get_device_name() if env.cuda else "cpu", torch=torch.__version__,
               transformers=__import__("transformers").__version__, copy_bw_tbs=bw / 1e12 if bw else None,
               context=args.context, layers=env.layers, new_tokens=args.new, int2_floor_ms=floor.get("int2_floor_ms"),
               bf16_floor_ms=floor.get("bf16_floor_ms"), rows=[])
    listings = []
    for kind in kinds:
        row, listing = measure(env, kind, args)
        out["rows"].append(row)
        listings.append(listing)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    if args.profile_out:
        Path(args.profile_out).write_text("\n".join(listings))
    print("\n".join(listing.splitlines()[:60]) if listings else "")

    floors = (f"copy bandwidth {bw / 1e12:.3f} TB/s; INT2 floor {floor['int2_floor_ms']:.2f} ms, BF16 floor "
              f"{floor['bf16_floor_ms']:.2f} ms" if bw else "no bandwidth floors (CPU)")
    print(f"\n{out['device']}; {env.layers} layers; context {args.context}; {floors}")
    print("| what, ms | " + " | ".join(r["kind"] for r in out["rows"]) + " |")
    print("|---|" + "---|" * len(out["rows"]))
    for key, label in ROWS:
        print(f"| {label} | " + " | ".join(f"{r[key]:.3f}" for r in out["rows"]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
