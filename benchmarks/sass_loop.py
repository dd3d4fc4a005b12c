"""Count the sm_90 SASS instructions of the decode kernel's body loop, on a machine without a GPU.

Device time is scarce; instruction counts are not. Triton wheels ship `ptxas` and `nvdisasm`, so stage 1 of
`kernels/decode_attention.py` can be compiled for Hopper here and its innermost loop read: the loop that holds the
tensor-core products is found from the backward branches, and its instructions are counted by opcode. A kernel
variant that issues more instructions per key than the current one has not been worth a device run so far (RESULTS,
"Keys on the M side of the products"); use this before spending one.

    python benchmarks/sass_loop.py                      # the default launch: 4 x 32 stacked keys, 4 warps, 2 stages
    python benchmarks/sass_loop.py --block-n 64 --stack 1 --warps 4 --dtype fp16
    python benchmarks/sass_loop.py --no-key-pairs --no-value-pairs   # codes read a byte at a time

Counts depend on the Triton version (the GPU image has 3.6; install it in a side environment to match it).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from oscar_hf.kernels import decode_attention as da

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_DT_TYPE = {"bf16": tl.bfloat16, "fp16": tl.float16}


def tools_missing() -> str | None:
    """Why SASS cannot be produced here (None when it can)."""
    for tool in ("ptxas", "nvdisasm"):
        if not (_BIN / tool).exists():
            return f"this Triton ships no {tool} ({_BIN})"
    return None


def compile_stage1(block_n: int = 128, stack: int = 4, rows: int = 4, dtype: str = "bf16", num_warps: int = 4,
                   num_stages: int = 2, arch: int = 90, **constexprs):
    """Stage 1 compiled for `sm_{arch}` as `oscar_decode_attention` launches it for `rows` query rows per KV head
    (pointers and strides 16-byte divisible, as the real tensors are; lengths not specialised)."""
    fn = da._decode_stage1
    block_m = max(16, triton.next_power_of_2(rows))
    const = dict(D=128, BLOCK_M=block_m, RP=block_m // stack, BLOCK_N=block_n // stack, BLOCK_E=min(block_n, 32),
                 EXACT_CHUNK=64, DT=_DT_TYPE[dtype], HAS_MASK=False, CAUSAL=False, FP32_DOT=False,
                 DEVICE_LENGTHS=False)
    const.update(constexprs)
    for param in fn.params:  # constexpr parameters left at their defaults
        if param.is_constexpr and param.has_default and param.name not in const:
            const[param.name] = param.default
    pointers = {"kc_ptr": "*u8", "vc_ptr": "*u8", "mask_ptr": "*u8", "part_o": "*fp32", "part_m": "*fp32",
                "part_l": "*fp32", "lengths_ptr": "*i32", "counter_ptr": "*i32", "rv_ptr": "*fp32"}
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith(("_ptr", "_k", "_v")) or name in pointers:
            sig[name] = pointers.get(name, f"*{dtype}")
        elif name == "sm_scale_log2":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    divisible = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if sig[n].startswith("*") or n.startswith("s_") or n in ("sm_b", "sm_q", "sm_t")}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()}, attrs=divisible)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps,
                                                                                  num_stages=num_stages))


def sass_text(compiled) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([str(_BIN / "nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout


def mma_loop(sass: str) -> list[str]:
    """Instructions of the longest loop (a backward branch's span) that holds tensor-core products."""
    instructions, label_at, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        ins = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if ins:
            for name in pending:
                label_at[name] = len(instructions)
            pending = []
            instructions.append(ins.group(2))
    best: tuple[int, int] | None = None
    for end, ins in enumerate(instructions):
        target = re.search(r"BRA\s+`\(\.(L_x_\d+)\)", ins)
        if not target or label_at.get(target.group(1), end) >= end:
            continue
        start = label_at[target.group(1)]
        if any("MMA" in x for x in instructions[start:end + 1]) and (best is None or end - start > best[1] - best[0]):
            best = (start, end)
    if best is None:
        raise RuntimeError("no loop with tensor-core instructions found in the SASS")
    return instructions[best[0]:best[1] + 1]


def opcode_counts(loop: list[str]) -> collections.Counter:
    """Opcodes without predicates and modifiers: `@!P0 IMAD.MOV.U32 ...` counts as `IMAD`."""
    return collections.Counter(re.split(r"[\s.]", re.sub(r"^@!?U?P[T0-9]\s+", "", ins))[0] for ins in loop)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--block-n", type=int, default=128, help="keys per body iteration")
    p.add_argument("--stack", type=int, default=4, help="stacked copies of the query rows")
    p.add_argument("--rows", type=int, default=4, help="query rows per KV head (GQA group x query length)")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(_DT_TYPE), default="bf16")
    p.add_argument("--key-pairs", action=argparse.BooleanOptionalAction, default=None,
                   help="key codes read as byte pairs (default: as the launcher chooses, head_dim >= 128)")
    p.add_argument("--value-pairs", action=argparse.BooleanOptionalAction, default=None,
                   help="value codes read as token pairs (default: as the launcher chooses, sub-blocks >= 32 tokens)")
    p.add_argument("--top", type=int, default=14, help="opcodes to list")
    args = p.parse_args(argv)
    missing = tools_missing()
    if missing:
        print(f"cannot produce SASS: {missing}")
        return 2
    key_pairs = True if args.key_pairs is None else args.key_pairs  # head_dim 128 here
    value_pairs = args.block_n // args.stack >= 32 if args.value_pairs is None else args.value_pairs
    compiled = compile_stage1(args.block_n, args.stack, args.rows, args.dtype, args.warps, args.stages,
                              KEY_PAIRS=key_pairs, VALUE_PAIRS=value_pairs)
    loop = opcode_counts(mma_loop(sass_text(compiled)))
    total = sum(loop.values())
    print(f"triton {triton.__version__}, sm_90, block_n {args.block_n}, stack {args.stack}, {args.warps} warps, "
          f"{args.stages} stages, {args.dtype}, key codes by {'pairs' if key_pairs else 'bytes'}, value codes by "
          f"{'pairs' if value_pairs else 'bytes'}")
    print(f"body loop: {total} instructions per warp per iteration, {total * args.warps / args.block_n:.1f} warp "
          f"instructions per key")
    print(", ".join(f"{op} {n}" for op, n in loop.most_common(args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
