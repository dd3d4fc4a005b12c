"""Where a compiled `generate()` step's time goes (issue 19): the captured graph on the device, the host work of the
compiled call (guards, input handling, graph launch), and generate()'s own loop between steps, during which the
device idles because generate() synchronises every step (stopping check, streamer).

One OSCAR static cache (Qwen3-8B shape by default, random weights, Hadamard rotations) is filled to `--context`
tokens through its write path; then:

1. `model.generate()` compiled by transformers (its default `compile_config`), `--new` tokens, with the compiled
   call wrapped to take host timestamps and CUDA events around it; cProfile runs over the steady steps.
2. The very compiled callable generate() used, replayed back to back on the same inputs with no host sync (the
   device's own throughput: graph time plus launch gaps between replays), and with a sync after each call.

    python benchmarks/research/generate_step_split.py [--context 131072] [--layers 36] [--new 48] [--json f]

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


class Probe:
    """Wraps the compiled call generate() fetches, and is also generate()'s streamer."""

    def __init__(self, model, profile_from: int, profile_to: int):
        self.model = model
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
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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
        torch.cuda.synchronize()
        self.syncs.append(time.perf_counter())
        n = len(self.syncs)
        if n == self.profile_from:
            self.profile.enable()
        elif n == self.profile_to:
            self.profile.disable()

    def end(self) -> None:
        pass


def replay(compiled, kwargs, steps: int, sync_each: bool) -> float:
    """ms per call of the compiled forward on fixed inputs (the cache's device lengths advance each call)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        compiled(**kwargs)
    torch.cuda.synchronize()
    a.record()
    for _ in range(steps):
        torch.compiler.cudagraph_mark_step_begin()
        compiled(**kwargs)
        if sync_each:
            torch.cuda.synchronize()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--new", type=int, default=48)
    p.add_argument("--replays", type=int, default=40)
    p.add_argument("--json")
    p.add_argument("--profile-out")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    bargs = be.parse_args(["--sections", "", *(["--layers", str(args.layers)] if args.layers else [])])
    config = be.make_config(False, args.layers)
    model = be.build_model(config, "cuda", torch.bfloat16)
    env = be.Env(bargs, model, config, time.perf_counter())
    bw = be.copy_bandwidth(env)
    be.set_attention(model, "oscar")
    new = args.new
    cache = be.make_cache(env, "oscar", args.context + new + 2 * args.replays + 80)
    with torch.no_grad():
        be.fill_context(env, cache, "oscar", 1, args.context)
    ids = torch.randint(0, env.vocab, (1, args.context + 1), device="cuda")
    probe = Probe(model, profile_from=new // 3, profile_to=new - 4)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, **{cache_keyword(model): cache}, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       streamer=probe, attention_mask=torch.ones_like(ids), pad_token_id=0)
    total = time.perf_counter() - t0

    steady = range(len(probe.calls) // 3, len(probe.calls) - 1)
    step_ms = statistics.median((probe.syncs[i + 2] - probe.syncs[i + 1]) * 1e3 for i in steady)
    call_host_ms = statistics.median((probe.calls[i][1] - probe.calls[i][0]) * 1e3 for i in steady)
    # syncs[0] is the prompt, syncs[1] the first new token (prefill); call i makes token i + 2
    loop_host_ms = statistics.median((probe.calls[i][0] - probe.syncs[i + 1]) * 1e3 for i in steady)
    in_call_gpu_ms = statistics.median(probe.calls[i][2].elapsed_time(probe.calls[i][3]) for i in steady)
    between_gpu_ms = statistics.median(probe.calls[i][3].elapsed_time(probe.calls[i + 1][2]) for i in steady)

    with torch.no_grad():
        back_to_back = replay(probe.compiled, probe.last_kwargs, args.replays, sync_each=False)
        synced = replay(probe.compiled, probe.last_kwargs, args.replays, sync_each=True)

    floor = be.floors(env, bw, args.context)
    row = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               transformers=__import__("transformers").__version__, copy_bw_tbs=bw / 1e12, context=args.context,
               layers=env.layers, new_tokens=new, generate_total_s=total, generate_step_ms=step_ms,
               compiled_call_host_ms=call_host_ms, loop_host_ms=loop_host_ms, call_span_gpu_ms=in_call_gpu_ms,
               between_calls_gpu_ms=between_gpu_ms, replay_back_to_back_ms=back_to_back,
               replay_synced_ms=synced, int2_floor_ms=floor["int2_floor_ms"], bf16_floor_ms=floor["bf16_floor_ms"])
    print(json.dumps(row), flush=True)

    s = io.StringIO()
    stats = pstats.Stats(probe.profile, stream=s)
    n_prof = max(1, probe.profile_to - probe.profile_from)
    s.write(f"# cProfile over {n_prof} steady generate() steps (per-step host ms = cumtime / {n_prof})\n")
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(30)
    if args.profile_out:
        Path(args.profile_out).write_text(s.getvalue())
    lines = s.getvalue().splitlines()
    print("\n".join(lines[:80]))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))

    print(f"\n{row['device']}; copy bandwidth {bw / 1e12:.3f} TB/s; {env.layers} layers; context {args.context}")
    print("| what | ms |")
    print("|---|---|")
    for k, label in (("generate_step_ms", "generate() step (streamer gaps)"),
                     ("replay_back_to_back_ms", "compiled call replayed back to back, no sync"),
                     ("replay_synced_ms", "compiled call replayed, sync after each"),
                     ("call_span_gpu_ms", "device time from before the call to after it (in generate)"),
                     ("between_calls_gpu_ms", "device time between calls (post-processing + idle)"),
                     ("compiled_call_host_ms", "host time inside the compiled call"),
                     ("loop_host_ms", "host time from the sync to the next call (generate's loop)"),
                     ("int2_floor_ms", "INT2 floor"), ("bf16_floor_ms", "BF16 floor")):
        print(f"| {label} | {row[k]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
