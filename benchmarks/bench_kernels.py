"""Kernel benchmark for the GPU machine: correctness against the reference, then timings beside same-run baselines.

For each shape (32 query / 8 KV heads, head_dim 128, batch 1 and 8, context 8K / 32K / 128K):
- relative error of the Triton decode attention against `segment_attention_reference` (the PyTorch oracle);
- `triton.testing.do_bench` medians of the kernel and of PyTorch SDPA bf16 (`enable_gqa=True`) on the same shape;
- the bandwidth floor: bytes the kernel must move / the device-to-device copy bandwidth measured in this run.
Then the write (demotion) kernel -- plain rounding, error feedback, and error feedback in each key's tilted metric
(`KeyTilt`, G = 4 query heads per KV head; with a sweep of rows per program) -- and optionally (`--generate PATH`)
greedy generate() with the Triton path against the PyTorch path on the reference model. A short table is printed
last; `--json` keeps every number.

    PYTHONUNBUFFERED=1 python benchmarks/bench_kernels.py --json out.json [--sweep] \\
        [--generate .assets/oscar-ref-code-qwen3]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import re
import time

import torch
import triton
import triton.testing

from oscar_hf.attention import segment_attention_reference
from oscar_hf.kernels.decode_attention import oscar_decode_attention, rotate_query
from oscar_hf.kernels.quantize import quantize_rows_into
from oscar_hf.layer import OscarQuantizedLayer, OscarSegments
from oscar_hf.quantization import KeyTilt, dequantize_rows, error_feedback_factor, quantize_rows

HQ, HKV, D = 32, 8, 128
SINK, RECENT = 64, 256


def bench(fn) -> float:
    """Median milliseconds, launched eagerly from Python (CPU launch cost included when it exceeds device time)."""
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def bench_graph(fn) -> float:
    """Median milliseconds of a CUDA-graph replay of `fn`: device time without Python launch cost."""
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read + written."""
    n = 1 << 30
    src = torch.randn(n // 2, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    bw = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    src = dst = None  # (frees the memory for the next shape)
    return bw


def random_rotation(gen) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=gen))
    return q.float()[None]


def make_layer(batch: int, context: int, gen) -> OscarQuantizedLayer:
    """A layer holding `context` tokens (64 sink, 256 recent, the rest INT2), filled with random data directly."""
    layer = OscarQuantizedLayer(random_rotation(gen), random_rotation(gen), 0.96, 0.92, SINK, RECENT, 64,
                                max_cache_len=context + 64)
    probe = torch.zeros(batch, HKV, 1, D, dtype=torch.bfloat16, device="cuda")
    layer.lazy_initialization(probe, probe)
    body = context - SINK - RECENT
    for name in ("sink_keys", "sink_values", "recent_keys", "recent_values"):
        getattr(layer, name).normal_()
    for codes in (layer.body_key_codes, layer.body_value_codes):
        codes.copy_(torch.randint(0, 256, codes.shape, dtype=torch.uint8, device="cuda"))
    for scale in (layer.body_key_scale, layer.body_value_scale):
        scale.copy_(torch.rand(scale.shape, device="cuda") * 0.6 + 0.2)
    for offset in (layer.body_key_offset, layer.body_value_offset):
        offset.copy_(-(torch.rand(offset.shape, device="cuda") * 0.6 + 0.6))
    layer.sink_len, layer.body_len, layer.recent_len = SINK, body, RECENT
    return layer


def kernel_bytes(batch: int, context: int, q_len: int) -> int:
    body = context - SINK - RECENT
    int2 = batch * HKV * body * 2 * (D // 4 + 2 * 2)  # K and V codes + fp16 scale and offset
    exact = batch * HKV * (SINK + RECENT) * 2 * D * 2
    q_out = 2 * batch * HQ * q_len * D * 2
    return int2 + exact + q_out


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_attention(shapes, copy_bw, configs, gen):
    rows = []
    for batch, context in shapes:
        layer = make_layer(batch, context, gen)
        for q_len in (1, 4) if (batch, context) == (1, 32768) else (1,):
            query = torch.randn(batch, HQ, q_len, D, dtype=torch.bfloat16, device="cuda")
            # q_len new tokens are the last ones of the recent window.
            seg = OscarSegments(layer, q_len, layer.recent_keys[:, :, RECENT - q_len : RECENT],
                                layer.recent_values[:, :, RECENT - q_len : RECENT])
            ref = segment_attention_reference(query, seg, None, None)
            results = {}
            for cname, cfg in configs.items():
                # Lengths read on the device, the grid from the buffers' capacity (max_cache_len = context + 64):
                # what a compiled decode step launches, and no host read inside the timed (or captured) call.
                cfg = dict(cfg, device_lengths=True)
                out = oscar_decode_attention(query, layer, None, None, q_len, **cfg)
                err = rel_err(out, ref)
                # Eager launches (Python cost included) only for the default; the sweep is read on device time.
                ms = bench(lambda: oscar_decode_attention(query, layer, None, None, q_len, **cfg)) \
                    if cname == "default" else float("nan")
                gms = bench_graph(lambda: oscar_decode_attention(query, layer, None, None, q_len, **cfg))
                results[cname] = (gms, err, ms)
            # The default call as a compiled decode step makes it: stage 0 computed in the step's window write.
            q_rot = rotate_query(query, layer.k_rotation, HKV)
            in_step_ms = bench_graph(lambda: oscar_decode_attention(query, layer, None, None, q_len,
                                                                    device_lengths=True, rotated_query=q_rot))
            k = torch.randn(batch, HKV, context, D, dtype=torch.bfloat16, device="cuda")
            v = torch.randn_like(k)
            def sdpa():
                return torch.nn.functional.scaled_dot_product_attention(query, k, v, enable_gqa=True)

            sdpa_eager_ms = bench(sdpa)
            sdpa_ms = bench_graph(sdpa)
            k = v = None  # (frees the memory for the next shape)
            nbytes = kernel_bytes(batch, context, q_len)
            floor_ms = nbytes / copy_bw * 1e3
            best = min(results, key=lambda c: results[c][0])
            row = dict(batch=batch, context=context, q_len=q_len, sdpa_ms=sdpa_ms, sdpa_eager_ms=sdpa_eager_ms,
                       bytes=nbytes, floor_ms=floor_ms, default_eager_ms=results["default"][2],
                       default_ms=results["default"][0], default_err=results["default"][1], in_step_ms=in_step_ms,
                       best_config=best, best_ms=results[best][0], best_err=results[best][1],
                       max_err=max(r_[1] for r_ in results.values()), all={c: r for c, r in results.items()})
            print(json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "all"}), flush=True)
            rows.append(row)
            ref = None  # (frees the memory for the next shape)
        layer = None  # (frees the memory for the next shape)
        torch.cuda.empty_cache()
    return rows


def feedback_factor(gen) -> torch.Tensor:
    """A per-head error-feedback factor from a skewed random metric (a query covariance's shape)."""
    a = torch.randn(HKV, D, D, generator=gen, dtype=torch.float64) * torch.logspace(0, -1.5, D, dtype=torch.float64)
    return error_feedback_factor(a @ a.mT).cuda()


def key_tilt(gen, groups: int = HQ // HKV) -> KeyTilt:
    """A per-head key tilt: query means of the keys' size and symmetric maps small enough to keep S + W W^T well
    conditioned."""
    b = torch.randn(HKV, groups, D, D, generator=gen) * (0.3 / D**0.5)
    return KeyTilt((torch.randn(HKV, groups, D, generator=gen) * 0.5).cuda(), (b + b.mT).cuda())


def tilted_metric_error(keys, q, factor, tilt) -> torch.Tensor:
    """`(x - xq)^T (S + W W^T) (x - xq)` per row, float64, with S recovered from its factor (U^T U = S^-1)."""
    u = factor.double()
    s = torch.linalg.inv(u.mT @ u)  # [H, D, D]
    e = (dequantize_rows(q).double() - keys.double())
    w = tilt.columns(keys).double()  # [B, H, n, D, G]
    return torch.einsum("bhnd,hde,bhne->bhn", e, s, e) + (e.unsqueeze(-2) @ w).squeeze(-2).pow(2).sum(-1)


def run_write(copy_bw, gen):
    """Demotion of 64 tokens (K and V) and the write of a 2K-token prompt, batch 1 and 8: plain rounding, error
    feedback (the calibrated bundles' default), and keys coded in their tilted metric (values with error feedback).
    For the tilted coding: a sweep of rows per program (one warp each), and, if the codes are not bit-exact, the
    metric error of the kernel's keys against the reference's."""
    rows = []
    factor = feedback_factor(gen)
    tilt = key_tilt(gen)
    shapes = ((1, 64), (8, 64), (1, 2048), (8, 2048))
    for (batch, tokens), coding in itertools.product(shapes, ("plain", "feedback", "tilt")):
        fb = None if coding == "plain" else factor
        kt = tilt if coding == "tilt" else None
        keys = (torch.randn(batch, HKV, tokens, D, device="cuda") * 2).to(torch.bfloat16)
        cap = tokens + 128
        codes = torch.empty(batch, HKV, cap, D // 4, dtype=torch.uint8, device="cuda")
        scale = torch.empty(batch, HKV, cap, dtype=torch.float16, device="cuda")
        offset = torch.empty_like(scale)
        at = slice(37, 37 + tokens)

        def write(**launch):
            quantize_rows_into(keys, 0.92, codes[:, :, at], scale[:, :, at], offset[:, :, at], fb)
            quantize_rows_into(keys, 0.96, codes[:, :, at], scale[:, :, at], offset[:, :, at], fb, kt, **launch)

        write()  # the keys' coding is the one left in the buffers
        ref = quantize_rows(keys, 0.96, fb, kt)
        exact = bool((codes[:, :, at] == ref.codes).all() and (scale[:, :, at] == ref.scale).all()
                     and (offset[:, :, at] == ref.offset).all())
        mismatch = (codes[:, :, at] != ref.codes).float().mean().item()
        row = dict(batch=batch, tokens=tokens, coding=coding, feedback=fb is not None, bit_exact=exact,
                   code_mismatch=mismatch)
        if coding == "tilt" and not exact:
            got = type(ref)(codes[:, :, at], scale[:, :, at], offset[:, :, at])
            err_k, err_r = tilted_metric_error(keys, got, factor, tilt), tilted_metric_error(keys, ref, factor, tilt)
            row["metric_error_rel"] = ((err_k.mean() - err_r.mean()) / err_r.mean()).item()
        ms = bench(write)
        graph_ms = bench_graph(write)
        ref_ms = bench(lambda: (quantize_rows(keys, 0.92, fb), quantize_rows(keys, 0.96, fb, kt)))
        if coding == "tilt":
            row["block_rows_graph_ms"] = {r: bench_graph(lambda: write(block_rows=r)) for r in (1, 2, 4)}
        nbytes = 2 * (keys.numel() * 2 + codes[:, :, at].numel() + 4 * scale[:, :, at].numel())
        row.update(kernel_ms=ms, kernel_graph_ms=graph_ms, reference_ms=ref_ms, bytes=nbytes,
                   floor_ms=nbytes / copy_bw * 1e3)
        print(json.dumps(row), flush=True)
        rows.append(row)
        ref = None  # (frees the memory for the next shape)
        torch.cuda.empty_cache()
    return rows


def run_generate(path: str, prompt_len: int = 2048, new_tokens: int = 256):
    import numpy as np
    from transformers import AutoModelForCausalLM

    import oscar_hf.kernel_dispatch as kernels
    from oscar_hf import OscarQuantizedCache, cache_keyword

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="oscar").cuda().eval()
    tokens = np.load(f"{path}/heldout_tokens.npy")
    start = 1_048_576 + 12_345  # evaluation split
    out = {}
    for batch in (1, 2):
        ids = torch.tensor(tokens[start : start + prompt_len * batch].astype("int64"), device="cuda").view(batch, -1)
        mask = torch.ones_like(ids)
        if batch == 2:  # left-pad the second sequence by 100 tokens
            ids[1, :100] = 0
            mask[1, :100] = 0
        gens = {}
        for name, enabled in (("pytorch", False), ("triton", True)):
            kernels.set_enabled(enabled)
            cache = OscarQuantizedCache(config=model.config, method="hadamard")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                res = model.generate(input_ids=ids, attention_mask=mask, **{cache_keyword(model): cache},
                                     do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     pad_token_id=0,
                                     return_dict_in_generate=True, output_scores=True)
            torch.cuda.synchronize()
            scores = torch.stack([sc.float() for sc in res.scores], dim=1)  # [batch, steps, vocab]
            gens[name] = (res.sequences[:, prompt_len:], time.perf_counter() - t0, scores)
        kernels.set_enabled(True)
        a, b_ = gens["pytorch"][0], gens["triton"][0]
        same = (a == b_).float().mean().item()
        diverged = (a != b_).any(dim=-1).tolist()
        first_diff = [int((a[i] != b_[i]).float().argmax()) if diverged[i] else None for i in range(batch)]
        # Before the first divergence both paths saw the same tokens: their logits should differ by rounding only.
        # At the divergence, the reference path's top-2 margin says whether it was a near tie.
        logit_gap, margin = [], []
        for i in range(batch):
            stop = first_diff[i] if diverged[i] else new_tokens
            sp, st = gens["pytorch"][2][i, :stop], gens["triton"][2][i, :stop]
            finite = torch.isfinite(sp) & torch.isfinite(st)  # min_new_tokens masks EOS with -inf in both
            logit_gap.append(float((sp - st).abs()[finite].max()) if stop else 0.0)
            if diverged[i]:
                top2 = gens["pytorch"][2][i, first_diff[i]].topk(2).values
                margin.append(float(top2[0] - top2[1]))
            else:
                margin.append(None)
        out[f"batch{batch}"] = dict(match=same, first_divergence=first_diff, max_logit_gap_before=logit_gap,
                                    top2_margin_at_divergence=margin, pytorch_s=gens["pytorch"][1],
                                    triton_s=gens["triton"][1])
        print(json.dumps({f"generate_batch{batch}": out[f"batch{batch}"]}), flush=True)
    return out


CONFIG_RE = re.compile(r"n(\d+)w(\d+)s(\d+)p(\d+)(?:j(\d+))?(?:r(\d+))?(?:b(k|v|kv))?(d)?")


def parse_config(name: str) -> dict:
    """`n{block_n}w{warps}s{stages}p{programs per SM}[j{stack}][r{max registers}][b{k,v,kv}][d]` as launch
    keywords (`d`: stage 2 launched as a programmatic dependent of stage 1)."""
    m = CONFIG_RE.fullmatch(name)
    if m is None:
        raise SystemExit(f"bad launch configuration {name!r}: expected e.g. n128w4s3p3, n128w4s3p5r96, n128w4s3p3bkv")
    bn, nw, ns, pps, stack, regs, bytes_of, dependent = m.groups()
    cfg = dict(block_n=int(bn), num_warps=int(nw), num_stages=int(ns), programs_per_sm=int(pps))
    if stack:
        cfg["stack"] = int(stack)
    if regs:
        cfg["max_registers"] = int(regs)
    if bytes_of and "k" in bytes_of:
        cfg["key_pairs"] = False
    if bytes_of and "v" in bytes_of:
        cfg["value_pairs"] = False
    if dependent:
        cfg["dependent_launch"] = True
    return cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="also time a few launch configurations")
    ap.add_argument("--generate", default=None, help="reference model directory for the greedy-match check")
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--configs", default=None,
                    help="comma-separated launch configurations to sweep, n{block_n}w{warps}s{stages}p{programs per SM}"
                         "[j{stacked query-row copies}][r{max registers per thread}][b{k,v,kv}: key/value codes a byte "
                         "at a time][d: dependent launch of stage 2], e.g. n128w4s3p3j1, n128w4s3p5r96, n128w4s3p3bkv, "
                         "n128w4s2p3d")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--no-write", action="store_true", help="skip the write-kernel benchmark")
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(0)
    dev = torch.cuda.get_device_name()
    print(f"device {dev}; torch {torch.__version__}; triton {triton.__version__}; "
          f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}", flush=True)
    if args.generate_only:
        run_generate(args.generate)
        return
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth (read+write): {copy_bw / 1e12:.3f} TB/s", flush=True)

    configs = {"default": {}}
    names = args.configs.split(",") if args.configs else []
    if args.sweep and not names:
        names = [f"n{bn}w{nw}s{ns}p{pps}" for bn, nw, ns in ((64, 4, 3), (128, 4, 3), (128, 8, 3), (64, 4, 4))
                 for pps in (2, 4, 8)]
    for name in names:
        configs[name] = parse_config(name)
    contexts = [int(c) for c in args.contexts.split(",")]
    shapes = [(b, c) for b in (int(x) for x in args.batches.split(",")) for c in contexts]
    attn = run_attention(shapes, copy_bw, configs, gen)
    write = [] if args.no_write else run_write(copy_bw, gen)
    gen_res = run_generate(args.generate) if args.generate else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev, copy_bw=copy_bw, attention=attn, write=write, generate=gen_res), f, indent=1)

    print("\nDevice times are CUDA-graph replays (both SDPA and OSCAR); eager = do_bench of Python launches.")
    print("| batch | context | q | SDPA bf16 us (eager) | OSCAR us default (eager) | speedup | floor us | "
          "% of copy BW | "
          "best cfg | best us | best speedup | best % BW | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in attn:
        print(f"| {r['batch']} | {r['context'] // 1024}K | {r['q_len']} | {r['sdpa_ms'] * 1e3:.1f} "
              f"({r['sdpa_eager_ms'] * 1e3:.1f}) | {r['default_ms'] * 1e3:.1f} ({r['default_eager_ms'] * 1e3:.1f}) | "
              f"{r['sdpa_ms'] / r['default_ms']:.2f}x | {r['floor_ms'] * 1e3:.1f} | "
              f"{100 * r['floor_ms'] / r['default_ms']:.0f}% | {r['best_config']} | {r['best_ms'] * 1e3:.1f} | "
              f"{r['sdpa_ms'] / r['best_ms']:.2f}x | {100 * r['floor_ms'] / r['best_ms']:.0f}% | {r['max_err']:.2e} |")
    print("\nthe default call as a compiled decode step makes it (the query rotated in the window write), device us:")
    print("| batch | context | q | OSCAR us in the step | % of copy BW | vs SDPA |")
    for r in attn:
        print(f"| {r['batch']} | {r['context'] // 1024}K | {r['q_len']} | {r['in_step_ms'] * 1e3:.1f} | "
              f"{100 * r['floor_ms'] / r['in_step_ms']:.0f}% | {r['sdpa_ms'] / r['in_step_ms']:.2f}x |")
    print("\nper configuration, device us (rel err):")
    for r in attn:
        print(f"  b{r['batch']} {r['context'] // 1024}K q{r['q_len']}: " + ", ".join(
            f"{c} {v[0] * 1e3:.1f}" for c, v in sorted(r["all"].items(), key=lambda kv: kv[1][0])))
    print("\n| write: batch | tokens (K+V) | coding | kernel us graph (eager) | reference us | floor us | bit-exact |")
    print("|---|---|---|---|---|---|---|")
    names = {"plain": "plain", "feedback": "error feedback", "tilt": "keys tilted (G 4), values feedback"}
    for r in write:
        exact = f"{r['bit_exact']} ({r['code_mismatch']:.1e} codes differ"
        if "metric_error_rel" in r:
            exact += f", tilted metric error {r['metric_error_rel']:+.1e} relative"
        print(f"| {r['batch']} | {r['tokens']} | {names[r['coding']]} | {r['kernel_graph_ms'] * 1e3:.1f} "
              f"({r['kernel_ms'] * 1e3:.1f}) | {r['reference_ms'] * 1e3:.1f} | {r['floor_ms'] * 1e3:.2f} | {exact}) |")
    for r in write:
        if "block_rows_graph_ms" in r:
            print(f"  tilted b{r['batch']} {r['tokens']} tokens, rows per program -> graph us: " + ", ".join(
                f"{k}: {v * 1e3:.1f}" for k, v in r["block_rows_graph_ms"].items()))
    if gen_res:
        print(f"\ngreedy generate, 2K prompt + 256 new tokens, Triton vs PyTorch path: {json.dumps(gen_res)}")


if __name__ == "__main__":
    main()
