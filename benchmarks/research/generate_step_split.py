"""Where a compiled `generate()` step's time goes (issue 19): the captured graph on the device, the host work of the
compiled call (guards, input handling, graph launch), and generate()'s own loop between steps. Where generate()
synchronises every step (stopping check, streamer), the device idles during that host work; with an OSCAR cache on
CUDA it reads the stop one step late (`oscar_hf.deferred_stop`) and the host work overlaps the previous step. The
"sync" of a step is then the previous token's arrival on the host, not a moment the device is idle, and the rows
that assume one (`deferred` in the JSON) print "-".

Each cache (`--kinds`: a static OSCAR cache with Hadamard rotations, then transformers' StaticCache; Qwen3-8B shape by
default, random weights) is filled to `--context` tokens through its write path; then:

1. `model.generate()` compiled by transformers (its default `compile_config`), `--new` tokens, with the compiled
   call wrapped to take host timestamps and CUDA events around it; cProfile runs over the steady steps.
2. The very compiled callable generate() used, replayed back to back on the same inputs with no host sync (the
   device's own throughput: graph time plus launch gaps between replays), and with a sync after each call.

    python benchmarks/research/generate_step_split.py [--context 131072] [--layers 36] [--new 48] [--json f]
    python benchmarks/research/generate_step_split.py --tiny --context 600 --new 12 --replays 4   # CPU dry run

A short table is printed last; `--profile-out` keeps the cProfile listing. The host's timeline of a step (from the sync
ending the previous step to the CUDA-graph launch) is split at the points
generate() and torch pass through: preparing the inputs (masks included), dynamo's guards and wrappers, the CUDA-graph
tree's bookkeeping, and the launch. The second half of the steady steps runs with dynamo's guard evaluation skipped
(`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`, a measurement only: it is unsafe in general), which
prices the guards in place.
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


class HostTimeline:
    """Host timestamps at named points of each generate() step, taken by patching the functions it passes through.

    A step runs from the sync that ends the previous token (the streamer's `put`) to the next one; only the first
    time a point is passed in a step counts, except the ends of spans (`*_out`), where the last does.
    """

    SPANS = (("sync", "prepare_in", "generate()'s loop before preparing inputs"),
             ("prepare_in", "prepare_out", "prepare_inputs_for_generation (masks included)"),
             ("prepare_out", "call_in", "generate()'s loop after preparing inputs"),
             ("call_in", "fx_in", "dynamo guards and wrappers, to inductor's compiled graph"),
             ("fx_in", "replay_in", "CUDA-graph tree bookkeeping before the launch"),
             ("replay_in", "replay_out", "cudaGraphLaunch"),
             ("sync", "replay_out", "host time from the sync to the launch"))

    def __init__(self):
        self.steps, self.current, self.undo = [], {}, []

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        if name.endswith("_out") or name not in self.current:
            self.current[name] = now

    def step(self) -> None:
        """The sync ending a step: close it and open the next."""
        now = time.perf_counter()
        if self.current:
            self.steps.append(self.current)
        self.current = {"sync": now}

    def patch(self, owner, attr: str, name: str) -> None:
        real = getattr(owner, attr)

        def stamped(*args, **kwargs):
            self.mark(name + "_in")
            try:
                return real(*args, **kwargs)
            finally:
                self.mark(name + "_out")

        own = attr in vars(owner)  # else inherited (or the class's, for an instance): deleting the patch restores it
        self.undo.append((owner, attr, own, vars(owner).get(attr)))
        setattr(owner, attr, stamped)

    def install(self, model) -> None:
        self.patch(model, "prepare_inputs_for_generation", "prepare")
        try:
            from torch._inductor.output_code import CompiledFxGraph

            self.patch(CompiledFxGraph, "__call__", "fx")
        except ImportError:  # pragma: no cover - older torch
            pass
        if torch.cuda.is_available():
            self.patch(torch.cuda.CUDAGraph, "replay", "replay")

    def uninstall(self) -> None:
        for owner, attr, own, previous in reversed(self.undo):
            if own:
                setattr(owner, attr, previous)
            else:
                delattr(owner, attr)
        self.undo = []

    def medians(self, steps) -> dict:
        """Median ms of each span over `steps` (indices into self.steps), for the spans every such step passed."""
        out = {}
        for start, end, label in self.SPANS:
            values = [(self.steps[i][end] - self.steps[i][start]) * 1e3 for i in steps
                      if start in self.steps[i] and end in self.steps[i]]
            if values and len(values) == len(steps):
                out[label] = statistics.median(values)
        return out


class SyncLog:
    """Where a step makes the host wait for the device: CUDA's sync debug mode warns at each synchronising call, and
    the Python stack at the warning says who made it."""

    def __init__(self):
        self.sites, self.shown = {}, None

    def start(self) -> None:
        import traceback
        import warnings

        self.shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return self.shown(message, category, filename, lineno, file, line)
            frames = [f for f in traceback.extract_stack()[:-1] if "site-packages/torch/" not in f.filename][-3:]
            site = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
            self.sites[site] = self.sites.get(site, 0) + 1

        warnings.showwarning, self.filters = show, warnings.filters[:]
        warnings.simplefilter("always")  # every sync, not the first from each line
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        import warnings

        if self.shown is not None:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning, self.shown = self.shown, None
            warnings.filters[:] = self.filters

    def report(self, steps: int) -> str:
        if not self.sites:
            return f"no synchronising call in {steps} steps"
        return "\n".join(f"{n} in {steps} steps: {site}" for site, n in sorted(self.sites.items(), key=lambda x: -x[1]))


class Probe:
    """Wraps the compiled call generate() fetches, and is also generate()'s streamer."""

    def __init__(self, model, profile_from: int, profile_to: int, skip_guards_from: int, timeline: HostTimeline):
        self.model, self.cuda = model, model.device.type == "cuda"
        self.timeline, self.skip_guards_from = timeline, skip_guards_from
        self.sync_watch, self.sync_log = range(profile_from - 4, profile_from), SyncLog()
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
        self.timeline.mark("call_in")
        a.record()
        out = self.compiled(**kwargs)
        b.record()
        t1 = time.perf_counter()
        self.calls.append((t0, t1, a, b))
        self.last_kwargs = kwargs
        return out

    # streamer: a token reaches the host once the device computed it (one step late with the deferred stop check)
    def put(self, value) -> None:
        self.syncs.append(time.perf_counter())
        self.timeline.step()
        n = len(self.syncs)
        if n == self.profile_from:
            self.profile.enable()
        elif n == self.profile_to:
            self.profile.disable()
        if n == self.skip_guards_from:
            torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        if self.cuda and n == self.sync_watch.start:
            self.sync_log.start()
        elif self.cuda and n == self.sync_watch.stop:
            self.sync_log.stop()

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
    # The compiled calls (new - 1 of them) in phases: warm-up, timed, cProfiled, timed with dynamo's guards skipped.
    # Call i runs after the (i + 2)-th streamer put (the prompt, then the prefill's token).
    calls = new - 1
    timed, profiled, unguarded = (range(calls // 4, calls // 2), range(calls // 2, 3 * calls // 4),
                                  range(3 * calls // 4, calls - 1))
    timeline = HostTimeline()
    probe = Probe(model, profile_from=profiled.start + 2, profile_to=profiled.stop + 2,
                  skip_guards_from=unguarded.start + 2, timeline=timeline)
    kwargs = {}
    if not env.cuda:  # CPU dry run: transformers compiles on the CPU only when asked, here with dynamo alone
        from transformers import CompileConfig

        kwargs["compile_config"] = config = CompileConfig(backend="eager", mode=None)
        config._compile_all_devices = True
    t0 = time.perf_counter()
    timeline.install(model)
    try:
        with torch.no_grad():
            model.generate(ids, **{cache_keyword(model): cache}, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, streamer=probe, attention_mask=torch.ones_like(ids), pad_token_id=0,
                           **kwargs)
    finally:
        torch.compiler.set_stance("default")
        timeline.uninstall()
        del model.get_compiled_call  # the class's again
    total = time.perf_counter() - t0
    probe.sync_log.stop()
    print(f"# {kind}: host syncs\n" + probe.sync_log.report(len(probe.sync_watch)), flush=True)

    # With the deferred stop check, a token reaches the host a step late: the put after call i is call i - 1's token.
    from transformers.generation.utils import DeferredStopCheck

    deferred = bool(DeferredStopCheck.is_supported(env.model.device, cache, True, False))

    def step_ms(phase):
        return statistics.median((probe.syncs[i + 2] - probe.syncs[i + 1]) * 1e3 for i in phase)

    # syncs[0] is the prompt, syncs[1] the first new token (prefill); call i makes token i + 2 (timeline step i + 1)
    row = dict(kind=kind, generate_total_s=total, generate_step_ms=step_ms(timed),
               generate_step_unguarded_ms=step_ms(unguarded),
               compiled_call_host_ms=statistics.median((probe.calls[i][1] - probe.calls[i][0]) * 1e3 for i in timed),
               loop_host_ms=None if deferred else statistics.median(
                   (probe.calls[i][0] - probe.syncs[i + 1]) * 1e3 for i in timed),
               deferred=deferred,
               call_span_gpu_ms=statistics.median(probe.calls[i][2].elapsed_time(probe.calls[i][3]) for i in timed),
               between_calls_gpu_ms=statistics.median(
                   probe.calls[i][3].elapsed_time(probe.calls[i + 1][2]) for i in timed),
               host_timeline_ms=timeline.medians([i + 1 for i in timed]),
               host_timeline_unguarded_ms=timeline.medians([i + 1 for i in unguarded]))
    with torch.no_grad():
        row["replay_back_to_back_ms"] = replay(env, probe.compiled, probe.last_kwargs, args.replays, sync_each=False)
        row["replay_synced_ms"] = replay(env, probe.compiled, probe.last_kwargs, args.replays, sync_each=True)
    print(json.dumps(row), flush=True)

    s = io.StringIO()
    stats = pstats.Stats(probe.profile, stream=s)
    n_prof = len(profiled)
    s.write(f"# {kind}: cProfile over {n_prof} steady generate() steps (per-step host ms = cumtime / {n_prof})\n")
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(30)
    del cache, probe
    be.reset_compiled()
    be.free(env)
    return row, s.getvalue()


ROWS = (("generate_step_ms", "generate() step (streamer gaps)"),
        ("generate_step_unguarded_ms", "generate() step, dynamo's guards skipped"),
        ("replay_back_to_back_ms", "compiled call replayed back to back, no sync"),
        ("replay_synced_ms", "compiled call replayed, sync after each"),
        ("call_span_gpu_ms", "device time from before the call to after it (in generate)"),
        ("between_calls_gpu_ms", "device time between calls (post-processing + idle)"),
        ("compiled_call_host_ms", "host time inside the compiled call"),
        ("loop_host_ms", "host time from the sync to the next call (generate's loop; per-step check only)"))


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
        print(f"| {label} | " + " | ".join("-" if r[key] is None else f"{r[key]:.3f}" for r in out["rows"]) + " |")
    for key, suffix in (("host_timeline_ms", ""), ("host_timeline_unguarded_ms", ", guards skipped")):
        for _, _, label in HostTimeline.SPANS:
            print(f"| host: {label}{suffix} | "
                  + " | ".join(f"{r[key][label]:.3f}" if label in r[key] else "-" for r in out["rows"]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
