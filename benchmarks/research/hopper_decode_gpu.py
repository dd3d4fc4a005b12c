"""First device run of the Gluon body kernel (`kernels/hopper_decode.py`): correctness, then timings beside the Triton
kernel and the copy bandwidth of the same run. Needs an sm_90 GPU; about a minute on an H100.

For each shape (32 query / 8 KV heads, head_dim 128, bf16; 8K / 32K / 128K batch 1, 128K batch 8):
- relative error of the Triton path and of the Gluon path against `segment_attention_reference`, and between them;
- CUDA-graph medians (`triton.testing.do_bench_cudagraph`) of a whole decode call (stage 0, stage 1, stage 2) with
  the Triton body and with the Gluon body, lengths read on the device (what a compiled step launches);
- the same call with an empty body (sink and recent window only): the fixed cost, so that `call - fixed` is the
  body's share;
- the bandwidth floor (bytes the call must move / copy bandwidth) and the share of copy bandwidth each path reaches.

    PYTHONPATH=. python benchmarks/research/hopper_decode_gpu.py [--json out.json] [--stages 3] [--quick]

A short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_kernels as bk  # noqa: E402
from oscar_hf.attention import segment_attention_reference  # noqa: E402
from oscar_hf.kernels.decode_attention import oscar_decode_attention, rotate_query  # noqa: E402
from oscar_hf.layer import OscarSegments  # noqa: E402

SHAPES = [(1, 8192), (1, 32768), (1, 131072), (8, 131072)]
# (pipeline stages, register cap, programs per SM) of the Gluon body tried with --occupancy
OCCUPANCY = [(3, 168, 8), (2, 168, 12), (2, 128, 12), (2, 128, 16), (2, 168, 24)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write every number here")
    p.add_argument("--quick", action="store_true", help="8K and 32K batch 1 only")
    p.add_argument("--shapes", help="batch x context pairs instead of the default, e.g. 2x131072,4x131072,8x32768")
    p.add_argument("--mask", action="store_true",
                   help="also time both paths with the boolean mask a compiled generate() passes ([B, 1, 1, "
                        "max_cache_len], True up to the cache's length)")
    p.add_argument("--merge", action="store_true",
                   help="also time merge_in_stage1 (no stage-2 launch), with and without the query rotated beforehand")
    p.add_argument("--occupancy", action="store_true",
                   help="also time the Gluon body with fewer pipeline stages and a register cap (more programs an SM)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("needs an sm_90 GPU (H100 / H200)")
        return 2
    from oscar_hf.kernels import hopper_decode as hd

    dev = torch.cuda.get_device_name()
    copy_bw = bk.copy_bandwidth()
    print(f"{dev}; copy bandwidth (read + write) {copy_bw / 1e12:.3f} TB/s", flush=True)
    cfg = hd.config_for(4, 128)
    print(f"Gluon body: {cfg.warps} warp(s), {cfg.j} x {cfg.sb} keys per iteration, {cfg.stages} stages", flush=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    shapes = SHAPES[:2] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in pair.split("x")) for pair in args.shapes.split(",")]
    for batch, context in shapes:
        layer = bk.make_layer(batch, context, gen)
        query = torch.randn(batch, bk.HQ, 1, bk.D, dtype=torch.bfloat16, device="cuda")
        seg = OscarSegments(layer, 1, layer.recent_keys[:, :, bk.RECENT - 1 : bk.RECENT],
                            layer.recent_values[:, :, bk.RECENT - 1 : bk.RECENT])
        ref = segment_attention_reference(query.float(), seg, None, None)  # float32: see tests/test_hopper_decode.py

        def call(hopper, mask=None, **kw):
            return oscar_decode_attention(query, layer, mask, None, 1, device_lengths=True, hopper_body=hopper, **kw)

        tl_out, gl_out = call(False), call(True)
        r = dict(batch=batch, context=context, err_triton=bk.rel_err(tl_out, ref), err_gluon=bk.rel_err(gl_out, ref),
                 gluon_vs_triton=bk.rel_err(gl_out, tl_out), finite=bool(torch.isfinite(gl_out).all()))
        ref = tl_out = gl_out = None
        r["triton_us"] = bk.bench_graph(lambda: call(False)) * 1e3
        r["gluon_us"] = bk.bench_graph(lambda: call(True)) * 1e3  # default: 8 programs per SM
        for pps in (4, 16):  # programs per SM (the Gluon programs are one warp each; registers fit 8 at once)
            r[f"gluon_p{pps}_us"] = bk.bench_graph(lambda: call(True, programs_per_sm=pps)) * 1e3
        r["gluon_p8_b1_us"] = bk.bench_graph(lambda: call(True, min_blocks_per_split=1)) * 1e3
        if args.merge:  # stage 2 folded into stage 1's last program per row: one launch less
            r["merge_err"] = max(bk.rel_err(call(False, merge_in_stage1=True), call(False)),
                                 bk.rel_err(call(True, merge_in_stage1=True), call(True)))
            r["triton_merge_us"] = bk.bench_graph(lambda: call(False, merge_in_stage1=True)) * 1e3
            r["gluon_merge_us"] = bk.bench_graph(lambda: call(True, merge_in_stage1=True)) * 1e3
            q_rot = rotate_query(query, layer.k_rotation, layer.num_heads)  # a compiled step's window write does this
            for name, hopper in (("triton", False), ("gluon", True)):
                r[f"{name}_in_step_us"] = bk.bench_graph(lambda: call(hopper, rotated_query=q_rot)) * 1e3
                r[f"{name}_in_step_merge_us"] = bk.bench_graph(
                    lambda: call(hopper, rotated_query=q_rot, merge_in_stage1=True)) * 1e3
        if args.occupancy:
            # More one-warp programs on an SM at once: shared memory (27 KiB a program with 3 stages, 18 KiB with 2)
            # and registers (255: 8 warps an SM; 168: 12; 128: 16) both cap it.
            for stages, regs, pps in OCCUPANCY:
                kw = dict(body_stages=stages, body_max_registers=regs, programs_per_sm=pps)
                r[f"occ_s{stages}_r{regs}_p{pps}_err"] = bk.rel_err(call(True, **kw), call(False))
                r[f"gluon_s{stages}_r{regs}_p{pps}_us"] = bk.bench_graph(lambda: call(True, **kw)) * 1e3
        r["gluon_best_us"] = min(v for k, v in r.items() if k.startswith("gluon_") and k.endswith("_us"))
        if args.mask:
            kv_len = int(layer.lengths[:3].sum())
            gen_mask = torch.zeros(batch, 1, 1, kv_len + 64, dtype=torch.bool, device="cuda")
            gen_mask[..., :kv_len] = True
            r["mask_err"] = bk.rel_err(call(True, gen_mask), call(False))
            r["triton_mask_us"] = bk.bench_graph(lambda: call(False, gen_mask)) * 1e3
            r["gluon_mask_us"] = bk.bench_graph(lambda: call(True, gen_mask)) * 1e3
            r["triton_mask_noscan_us"] = bk.bench_graph(lambda: call(False, gen_mask, mask_scan=False)) * 1e3
            # the scan's two loop copies take stage 1 from 168 registers to 255 (sm_90, Triton 3.6): 2 programs an
            # SM instead of 3; the default caps them at 168 (no spill); this is the uncapped kernel
            r["triton_mask_r255_us"] = bk.bench_graph(lambda: call(False, gen_mask, max_registers=255)) * 1e3
            r["gluon_mask_noscan_us"] = bk.bench_graph(lambda: call(True, gen_mask, mask_scan=False)) * 1e3
            r["mask_noscan_err"] = bk.rel_err(call(True, gen_mask, mask_scan=False), call(False, gen_mask))
        body_len = int(layer.lengths[1])
        layer.lengths[1] = 0  # sink + recent only: stage 0, the exact splits, stage 2 (grid unchanged)
        r["fixed_us"] = bk.bench_graph(lambda: call(False)) * 1e3
        layer.lengths[1] = body_len
        nbytes = bk.kernel_bytes(batch, context, 1)
        r["floor_us"] = nbytes / copy_bw * 1e6
        r["triton_bw"] = r["floor_us"] / r["triton_us"]
        r["gluon_bw"] = r["floor_us"] / r["gluon_us"]
        r["gluon_best_bw"] = r["floor_us"] / r["gluon_best_us"]
        print(json.dumps(r), flush=True)
        rows.append(r)
        layer = None
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev, copy_bw=copy_bw, stages=cfg.stages, rows=rows), f, indent=1)
    print(f"\n{dev}, copy bandwidth {copy_bw / 1e12:.3f} TB/s; device us (CUDA-graph medians), % of copy bandwidth")
    print("| batch | context | Triton us | Gluon us | Gluon best us | fixed us | floor us | Triton % BW | Gluon % BW |"
          " Gluon best % BW | err Triton | err Gluon | Gluon vs Triton |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['context'] // 1024}K | {r['triton_us']:.1f} | {r['gluon_us']:.1f} | "
              f"{r['gluon_best_us']:.1f} | {r['fixed_us']:.1f} | {r['floor_us']:.1f} | {100 * r['triton_bw']:.0f}% | "
              f"{100 * r['gluon_bw']:.0f}% | {100 * r['gluon_best_bw']:.0f}% | {r['err_triton']:.2e} | "
              f"{r['err_gluon']:.2e} | {r['gluon_vs_triton']:.2e} |")
    if args.mask:
        print("\nwith generate()'s boolean mask (scan: the split reads the mask in its loop only where it hides "
              "something)")
        print("| batch | context | Triton no mask | Triton scan | Triton no scan | Triton scan, 255 registers | "
              "Gluon no mask | Gluon scan | Gluon no scan | Gluon vs Triton, masked |")
        for r in rows:
            print(f"| {r['batch']} | {r['context'] // 1024}K | {r['triton_us']:.1f} | {r['triton_mask_us']:.1f} | "
                  f"{r['triton_mask_noscan_us']:.1f} | {r['triton_mask_r255_us']:.1f} | {r['gluon_us']:.1f} | "
                  f"{r['gluon_mask_us']:.1f} | "
                  f"{r['gluon_mask_noscan_us']:.1f} | {max(r['mask_err'], r['mask_noscan_err']):.2e} |")
    if args.merge:
        print("\nstage 2 merged into stage 1 (one launch less); in step: the query rotated beforehand, as a compiled "
              "step's window write does (stage 0 not launched)")
        print("| batch | context | Triton | Triton merged | Gluon | Gluon merged | Triton in step | Triton in step merged "
              "| Gluon in step | Gluon in step merged | floor us | err |")
        for r in rows:
            print(f"| {r['batch']} | {r['context'] // 1024}K | {r['triton_us']:.1f} | {r['triton_merge_us']:.1f} | "
                  f"{r['gluon_us']:.1f} | {r['gluon_merge_us']:.1f} | {r['triton_in_step_us']:.1f} | "
                  f"{r['triton_in_step_merge_us']:.1f} | {r['gluon_in_step_us']:.1f} | "
                  f"{r['gluon_in_step_merge_us']:.1f} | {r['floor_us']:.1f} | {r['merge_err']:.1e} |")
    if args.occupancy:
        print("\nGluon body occupancy: us per call, (pipeline stages, register cap, programs per SM); default is (3, "
              "none, 8 or 16)")
        print("| batch | context | Gluon default | " + " | ".join(f"s{s} r{g} p{q}" for s, g, q in OCCUPANCY)
              + " | worst err vs Triton |")
        for r in rows:
            print(f"| {r['batch']} | {r['context'] // 1024}K | {r['gluon_us']:.1f} | "
                  + " | ".join(f"{r[f'gluon_s{s}_r{g}_p{q}_us']:.1f}" for s, g, q in OCCUPANCY)
                  + f" | {max(r[f'occ_s{s}_r{g}_p{q}_err'] for s, g, q in OCCUPANCY):.2e} |")
    ok = all(r["finite"] and r["err_gluon"] < 2e-2 and r["gluon_vs_triton"] < 1e-2
             and all(v < 1e-2 for k, v in r.items() if k.startswith("occ_") or k == "merge_err") for r in rows)
    print("correctness:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
