"""Compile the Gluon body kernel (`kernels/hopper_decode.py`) for sm_90 on a machine without a GPU and print what it
costs: registers, spills, shared memory, and the main loop's SASS by opcode (tensor-core products, shared and global
loads, asynchronous copies, barriers).

    python benchmarks/research/hopper_decode_compile.py                  # the shapes below
    python benchmarks/research/hopper_decode_compile.py --rows 4 --stages 4 --dtype fp16 --top 30

Counts depend on the Triton version: the GPU image has 3.6 (install it in a side environment to match it). The
main loop is found as `benchmarks/sass_loop.py` finds stage 1's: the longest backward branch whose span holds
tensor-core instructions.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sass_loop  # noqa: E402
from oscar_hf.kernels import hopper_decode as hd  # noqa: E402

_DT = {"bf16": torch.bfloat16, "fp16": torch.float16}
# (rows per KV head, what it stands for)
SHAPES = [(4, "GQA 4, decode"), (1, "MHA, decode"), (8, "GQA 8 / GQA 4 x q 2"), (16, "GQA 4 x q 4"),
          (32, "GQA 8 x q 4"), (64, "GQA 8 x q 8")]


def compile_body(rows: int = 4, head_dim: int = 128, dtype: str = "bf16", sb: int | None = None, stages: int = 3,
                 has_mask: bool = False, device_lengths: bool = False, arch: int = 90):
    """The body kernel compiled for `sm_{arch}` as `launch_body` launches it (pointers and strides 16-byte
    divisible, as the launched tensors are; lengths not specialised)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    cfg = hd.config_for(rows, head_dim, sb, stages)
    block_m_out = max(16, triton.next_power_of_2(rows))
    fn = hd._body_stage1
    const = hd.constexprs(cfg, _DT[dtype], block_m_out, has_mask, device_lengths)
    types = dict(qr_ptr=f"*{dtype}", kc_ptr="*u8", vc_ptr="*u8", ks_ptr="*fp16", ko_ptr="*fp16", vs_ptr="*fp16",
                 vo_ptr="*fp16", mask_ptr="*u8", part_o="*fp32", part_m="*fp32", part_l="*fp32",
                 lengths_ptr="*i32", sm_scale_log2="fp32")
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
    divisible = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if sig[n].startswith("*") or n.startswith("s_") or n in ("sm_b", "sm_q", "sm_t")}
    src = GluonASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()}, attrs=divisible)
    return cfg, triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=cfg.warps))


def resources(compiled) -> dict:
    """Registers, spill stores / loads and static shared memory per thread block, from `cuobjdump -res-usage` of the
    cubin (a `CompiledKernel` knows its registers only once loaded on a GPU)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        text = subprocess.run([str(sass_loop._BIN / "cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                              check=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k: int(v) for k, v in found.items()}


def summary(cfg, compiled, top: int = 16) -> dict:
    sass = sass_loop.sass_text(compiled)
    loop = sass_loop.mma_loop(sass)
    ops = sass_loop.opcode_counts(loop)
    full = collections_counter(loop)
    n = sum(ops.values())
    md = compiled.metadata
    res = resources(compiled)
    return dict(
        rows=cfg.rows, warps=cfg.warps, j=cfg.j, sb=cfg.sb, block=cfg.block, stages=cfg.stages,
        registers=res.get("REG"), local=res.get("LOCAL", 0), shared=md.shared,
        loop=n, per_key=n * cfg.warps / cfg.block, ops=ops.most_common(top), detail=full,
    )


def collections_counter(loop: list[str]) -> dict:
    """Memory and tensor-core instructions with their widths: `LDS.U16`, `LDGSTS.E.BYPASS.128`, `HMMA.16816.F32`."""
    out: dict[str, int] = {}
    for ins in loop:
        op = ins.split()[0] if not ins.startswith("@") else ins.split()[1]
        if op.split(".")[0] in ("LDS", "LDSM", "LDG", "LDGSTS", "STS", "STG", "HMMA", "BAR", "LDGDEPBAR", "DEPBAR",
                                "SHFL", "MUFU", "WARPSYNC", "UTMALDG", "SYNCS"):
            out[op] = out.get(op, 0) + 1
    return dict(sorted(out.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, action="append", help="query rows per KV head (default: a list of shapes)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(_DT), default="bf16")
    p.add_argument("--sb", type=int, default=None, help="keys per sub-block (default 32 stacked, 64 unstacked)")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--mask", action="store_true", help="with a boolean attention mask")
    p.add_argument("--device-lengths", action="store_true")
    p.add_argument("--top", type=int, default=16)
    args = p.parse_args(argv)
    missing = sass_loop.tools_missing()
    if missing:
        print(f"cannot produce SASS: {missing}")
        return 2
    shapes = [(r, "") for r in args.rows] if args.rows else SHAPES
    print(f"triton {triton.__version__}, sm_90, head_dim {args.head_dim}, {args.dtype}, {args.stages} stages"
          f"{', mask' if args.mask else ''}{', device lengths' if args.device_lengths else ''}")
    for rows, what in shapes:
        cfg, compiled = compile_body(rows, args.head_dim, args.dtype, args.sb, args.stages, args.mask,
                                     args.device_lengths)
        s = summary(cfg, compiled, args.top)
        print(f"\nrows {rows} {('(' + what + ')') if what else ''}: {s['warps']} warp(s), {s['j']} x {s['sb']} keys "
              f"per iteration, {s['registers']} registers, {s['local']} B local (spills), {s['shared']} B shared memory")
        print(f"  main loop: {s['loop']} instructions per warp per {s['block']} keys = {s['per_key']:.1f} warp "
              "instructions per key")
        print("  " + ", ".join(f"{op} {n}" for op, n in s["ops"]))
        print("  memory / tensor core / sync: " + ", ".join(f"{op} {n}" for op, n in s["detail"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
