"""Research prototype, not part of the package: stage 1's INT2 body loop written in Gluon (Triton's explicit-layout
dialect), compiled for sm_90 on a machine without a GPU to count the loop's instructions. It has never run on a GPU,
has no masking (whole sub-blocks only), no exact segments and no merge; it exists to measure what explicit layouts buy
before the next device session builds the real kernel (benchmarks/RESULTS.md, seventh session).

Why Gluon: in `kernels/decode_attention.py` Triton keeps the loop-invariant query operand in shared memory and
re-reads and re-packs it into the tensor-core register quads on every iteration (~78 LDS and ~190 register moves per
warp per 128 keys). Here the layouts are chosen: the query is loaded once into the A-operand layout (`k_width` 4, as
the byte codes need), the codes are loaded straight into the B-operand layout (one 32-bit load = 4 bytes of one key)
and unpacked in place by `_unpack_asm`, so nothing moves between the load and the product. One warp per program; per
iteration 4 sub-blocks of SB keys, the 16 score rows being 4 stacked copies of the 4 query rows (copy c keeps
sub-block c). The query rows are materialised 4 times in memory: loaded from one address, the compiler merges the
copies and re-copies them before every product.

    python benchmarks/research/gluon_body_loop.py --sb 16 --value-layout interleaved
"""

import argparse
import sys
from pathlib import Path

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sass_loop  # noqa: E402
from oscar_hf.kernels.decode_attention import _unpack_asm  # noqa: E402

@gluon.jit
def _unpack_bf16(codes, ASM: gl.constexpr):
    return gl.inline_asm_elementwise(ASM, "=r,=r,r", [codes], dtype=gl.bfloat16, is_pure=True, pack=4)


@gluon.jit
def _unpack_fp16(codes, ASM: gl.constexpr):
    return gl.inline_asm_elementwise(ASM, "=r,=r,r", [codes], dtype=gl.float16, is_pure=True, pack=4)


@gluon.jit
def body_kernel(q_ptr, kc_ptr, vc_ptr, ks_ptr, ko_ptr, vs_ptr, vo_ptr, out_ptr, lo, hi, sm_scale_log2,
                K0: gl.constexpr, K1: gl.constexpr, K2: gl.constexpr, K3: gl.constexpr,
                V0: gl.constexpr, V1: gl.constexpr, V2: gl.constexpr, V3: gl.constexpr,
                SB: gl.constexpr, KW: gl.constexpr, VINT: gl.constexpr):
    QD: gl.constexpr = 32
    D: gl.constexpr = 128
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=KW)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=KW)
    # --- block-diagonal query operands, loaded once, kept in registers
    r = gl.arange(0, 16, layout=gl.SliceLayout(1, a_l))
    k = gl.arange(0, QD, layout=gl.SliceLayout(0, a_l))
    qp = q_ptr + r[:, None] * D + k[None, :]  # 16 materialised rows (4 copies): distinct loads, no CSE
    q0 = gl.load(qp)
    q1 = gl.load(qp + QD)
    q2 = gl.load(qp + 2 * QD)
    q3 = gl.load(qp + 3 * QD)
    # --- index tensors of the code operands
    kb = gl.arange(0, QD, layout=gl.SliceLayout(1, b_l))  # K index: byte
    kn = gl.arange(0, SB, layout=gl.SliceLayout(0, b_l))  # key within the sub-block
    k_off = kn[None, :] * QD + kb[:, None]
    vk = gl.arange(0, SB, layout=gl.SliceLayout(1, b_l))  # K index: key within the sub-block
    vd = gl.arange(0, QD, layout=gl.SliceLayout(0, b_l))  # N index: byte
    if VINT:  # key-interleaved value codes: 4 tokens' byte i adjacent ([token // 4][byte][token % 4])
        v_off = (vk // 4)[:, None] * (4 * QD) + vd[None, :] * 4 + (vk % 4)[:, None]
    else:
        v_off = vk[:, None] * QD + vd[None, :]
    sr = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    sn = gl.arange(0, SB, layout=gl.SliceLayout(0, mma))
    key_in = (sr // 4)[:, None] * SB + sn[None, :]  # [16, SB]: key offset of each score
    pr = gl.arange(0, 16, layout=gl.SliceLayout(1, a_l))
    qsum = gl.sum(q0.to(gl.float32) + q1.to(gl.float32) + q2.to(gl.float32) + q3.to(gl.float32), axis=1)
    qsum = gl.convert_layout(qsum, gl.SliceLayout(1, mma))

    m_i = gl.full([16], -1.0e30, gl.float32, layout=gl.SliceLayout(1, mma))
    l_i = gl.full([16], 0.0, gl.float32, layout=gl.SliceLayout(1, mma))
    a_off = gl.full([16], 0.0, gl.float32, layout=gl.SliceLayout(1, mma))
    o0 = gl.full([16, QD], 0.0, gl.float32, layout=mma)
    o1 = gl.full([16, QD], 0.0, gl.float32, layout=mma)
    o2 = gl.full([16, QD], 0.0, gl.float32, layout=mma)
    o3 = gl.full([16, QD], 0.0, gl.float32, layout=mma)
    for start in range(lo, hi, 4 * SB):
        s = gl.full([16, SB], 0.0, gl.float32, layout=mma)
        for c in gl.static_range(4):
            kc = gl.load(kc_ptr + (start + c * SB) * QD + k_off)
            s_c = gl.full([16, SB], 0.0, gl.float32, layout=mma)
            s_c = mma_v2(q0, _unpack_bf16(kc, K0), s_c)
            s_c = mma_v2(q1, _unpack_bf16(kc, K1), s_c)
            s_c = mma_v2(q2, _unpack_bf16(kc, K2), s_c)
            s_c = mma_v2(q3, _unpack_bf16(kc, K3), s_c)
            s = gl.where(((sr // 4) == c)[:, None], s_c, s)
        key = start + key_in
        k_scale = gl.load(ks_ptr + key).to(gl.float32)
        k_o = gl.load(ko_ptr + key).to(gl.float32)
        v_scale = gl.load(vs_ptr + key).to(gl.float32)
        v_o = gl.load(vo_ptr + key).to(gl.float32)
        sc = (s * k_scale + qsum[:, None] * (k_o - 4.0 * k_scale)) * sm_scale_log2
        m_new = gl.maximum(m_i, gl.max(sc, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        a_off = a_off * alpha + gl.sum(p * (v_o - 4.0 * v_scale), axis=1)
        m_i = m_new
        pa = gl.convert_layout((p * v_scale).to(gl.float16), gl.DotOperandLayout(operand_index=0, parent=mma, k_width=KW))
        o0 = o0 * alpha[:, None]
        o1 = o1 * alpha[:, None]
        o2 = o2 * alpha[:, None]
        o3 = o3 * alpha[:, None]
        for c in gl.static_range(4):
            pc = gl.where(((pr // 4) == c)[:, None], pa, 0.0)
            vc = gl.load(vc_ptr + (start + c * SB) * QD + v_off)
            o0 = mma_v2(pc, _unpack_fp16(vc, V0), o0)
            o1 = mma_v2(pc, _unpack_fp16(vc, V1), o1)
            o2 = mma_v2(pc, _unpack_fp16(vc, V2), o2)
            o3 = mma_v2(pc, _unpack_fp16(vc, V3), o3)
    orow = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    ocol = gl.arange(0, QD, layout=gl.SliceLayout(0, mma))
    op = out_ptr + orow[:, None] * D + ocol[None, :]
    gl.store(op, o0 + a_off[:, None])
    gl.store(op + QD, o1)
    gl.store(op + 2 * QD, o2)
    gl.store(op + 3 * QD, o3)
    gl.store(out_ptr + 16 * D + orow, m_i)
    gl.store(out_ptr + 16 * D + 16 + orow, l_i)


def compile_body(sb: int, interleaved_values: bool):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = body_kernel.arg_names
    asm = {f"K{s}": _unpack_asm("bf16", s) for s in range(4)} | {f"V{s}": _unpack_asm("fp16", s) for s in range(4)}
    const = dict(asm, SB=sb, KW=4, VINT=interleaved_values)
    types = dict(q_ptr="*bf16", kc_ptr="*u8", vc_ptr="*u8", ks_ptr="*bf16", ko_ptr="*bf16", vs_ptr="*bf16",
                 vo_ptr="*bf16", out_ptr="*fp32", lo="i32", hi="i32", sm_scale_log2="fp32")
    sig = {n: ("constexpr" if n in const else types[n]) for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
    src = GluonASTSource(body_kernel, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1, num_stages=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Instruction count of the Gluon body-loop prototype (sm_90, no GPU).")
    p.add_argument("--sb", type=int, default=16, help="keys per sub-block (4 sub-blocks per iteration)")
    p.add_argument("--value-layout", choices=("rows", "interleaved"), default="rows",
                   help="value codes as stored today (token rows) or key-interleaved ([token/4][byte][token%%4])")
    args = p.parse_args(argv)
    compiled = compile_body(args.sb, args.value_layout == "interleaved")
    loop = sass_loop.opcode_counts(sass_loop.mma_loop(sass_loop.sass_text(compiled)))
    total, keys = sum(loop.values()), 4 * args.sb
    print(f"triton {triton.__version__}, gluon prototype, 1 warp, {keys} keys per iteration, {args.value_layout} values")
    print(f"body loop: {total} instructions per iteration, {total / keys:.1f} warp instructions per key")
    print(", ".join(f"{op} {n}" for op, n in loop.most_common(14)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
