"""Where a compiled OSCAR decode step spends its time: a Qwen3-8B-shaped model cut to `--layers` layers, a static cache
filled to `--context` tokens through its write path, the decode step compiled by inductor without CUDA graphs (so the
profiler sees each kernel), and the top kernels of a few steps, then the device time of one layer's step by kind of
kernel (the model's matrix products, the decode attention, the cache's write, inductor's fused kernels, copies).
Kernel durations do not depend on whether a CUDA graph launches them; the gaps between kernels do, so the sum is the
graph step's device time less its gaps. Also reports why the eager step (if at all) declines the decode kernel.
Research tool, device only:

    python benchmarks/research/step_profile.py --layers 4 --contexts 32768,131072
"""

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_e2e as be  # noqa: E402

from oscar_hf import OscarQuantizedCache  # noqa: E402
from oscar_hf import attention as attn_mod  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--contexts", default="131072", help="comma-separated token counts")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    rows = {}
    for context in (int(c) for c in args.contexts.split(",")):
        rows[context] = profile_context(args, context)
    kinds = sorted({k for r in rows.values() for k in r}, key=lambda k: -max(r.get(k, 0.0) for r in rows.values()))
    print("\ndevice us per layer per step, by kind of kernel (lm_head and the final norm spread over the layers)")
    print("| kind | " + " | ".join(f"{c // 1024}K" for c in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for kind in kinds + ["total"]:
        vals = [sum(r.values()) if kind == "total" else r.get(kind, 0.0) for r in rows.values()]
        print(f"| {kind} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")


# Checked in order: the first pattern that matches a kernel's name names its kind.
KINDS = [
    ("cuBLAS split-K reduce", r"splitKreduce"),
    ("matrix products (cuBLAS)", r"nvjet|gemv|gemm|cutlass|xmma|cublas"),
    ("decode attention", r"_decode_stage|_rotate_query|_body_stage1"),
    ("cache write", r"_write|append|quantize|advance|demote|_plan"),
    ("inductor fused", r"^triton_"),
    ("copies and fills", r"Memcpy|Memset|fill|copy"),
]


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other: " + name[:40])


def profile_context(args, context: int) -> dict[str, float]:
    print(f"\n## context {context}")
    config = be.make_config(False, args.layers)
    model = be.build_model(config, "cuda", torch.bfloat16)
    be.set_attention(model, "oscar")
    cache = OscarQuantizedCache(model.config, method="hadamard", max_cache_len=context + 64)
    for _ in range(0, context, 8192):
        for layer in cache.layers:
            k = torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16)
            layer.update(k, k.clone(), return_segments=True)
    declined = []
    reference = attn_mod.segment_attention_reference

    def spy(query, segments, mask, scaling, softcap=None):
        from oscar_hf.kernels.decode_attention import unsupported_reason

        declined.append(unsupported_reason(query, segments.layer, mask, segments.num_new,
                                           device_lengths=segments.device_lengths)
                        or f"kernel would serve; demoted={segments.demoted}; mask "
                           f"{None if mask is None else (mask.dtype, tuple(mask.shape))}")
        return reference(query, segments, mask, scaling, softcap)

    attn_mod.segment_attention_reference = spy
    pos = context
    ids = torch.tensor([[7]], device="cuda")
    mask2d = torch.ones(1, context + 64, dtype=torch.long, device="cuda")

    def kw(position):
        out = be.forward_kwargs(model, ids, cache, position)
        out["attention_mask"] = mask2d[:, : position + 1]
        return out

    with torch.no_grad():
        for _ in range(2):
            model(**kw(pos))
            pos += 1
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            model(**kw(pos))
            pos += 1
        torch.cuda.synchronize()
        print(f"eager step {1e3 * (time.perf_counter() - t) / args.steps:.2f} ms ({args.layers} layers); reference "
              f"calls {len(declined)}; reasons {sorted(set(declined))[:3]}")
        declined.clear()
        step = torch.compile(model.forward, mode=None, fullgraph=False)
        for _ in range(3):
            step(**kw(pos))
            pos += 1
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            step(**kw(pos))
            pos += 1
        torch.cuda.synchronize()
        print(f"compiled (inductor, no graphs) step {1e3 * (time.perf_counter() - t) / args.steps:.2f} ms; "
              f"reference calls {len(declined)}")
        graph_ms = None
        try:  # the same compiled step replayed as one CUDA graph: its time less the kernels' sum is the gaps
            static = kw(pos)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step(**static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step(**static)
            graph.replay()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            graph_ms = start.elapsed_time(end) / 20
            print(f"the compiled step as one CUDA graph: {graph_ms:.3f} ms ({args.layers} layers)", flush=True)
            pos += 22
        except Exception as e:  # noqa: BLE001 - research tool: report and go on
            print(f"CUDA-graph replay failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step(**kw(pos))
                pos += 1
            torch.cuda.synchronize()
    attn_mod.segment_attention_reference = reference
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))
    by_kind: dict[str, float] = {}
    for event in averages:
        us = getattr(event, "self_device_time_total", None)
        us = event.self_cuda_time_total if us is None else us
        if us > 0:  # the kernels (operators' own device time is their kernels')
            kind = kind_of(event.key)
            by_kind[kind] = by_kind.get(kind, 0.0) + us / (args.steps * args.layers)
    print(f"context {context}, device us per layer per step: "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])), flush=True)
    if graph_ms is not None:
        kernels_us = sum(by_kind.values())
        by_kind["gaps (graph step less kernels)"] = 1e3 * graph_ms / args.layers - kernels_us
        print(f"context {context}: graph step {1e3 * graph_ms / args.layers:.1f} us per layer, kernels "
              f"{kernels_us:.1f}, gaps {by_kind['gaps (graph step less kernels)']:.1f}", flush=True)
    return by_kind


if __name__ == "__main__":
    main()
