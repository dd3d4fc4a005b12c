"""Stage 1 of the decode attention for the 2-bit body on Hopper (sm_90), written in Gluon: explicit layouts and an
asynchronous copy pipeline. **The default where it was measured faster** (`measured_faster`: on an H100 with
Triton 3.6, batch 1-8 at 128K and batch 4-8 at 32K, 4-25% less time than the Triton body; benchmarks/RESULTS.md,
"Fourth run" and "Fifth run"); elsewhere the Triton kernel of `kernels/decode_attention.py` serves.
`DecodeOptions(hopper_body=...)` or `OSCAR_HF_HOPPER_KERNEL` (`1`: wherever it can serve, `0`: never) override the
choice.

It replaces the body programs of `decode_attention._decode_stage1` and writes the same partials (output, running
max, running sum of a base-2 online softmax) into the same buffers, so stage 0 (the rotated query) and stage 2 (the
split merge and un-rotation by R_V^T) are reused as they are, and the sink and recent-window splits still come from
the Triton kernel (launched on those splits only). The storage format and the arithmetic are the Triton kernel's
(read its module docstring first): planar 2-bit codes, `4 + code` made a bf16/fp16 operand by bit pattern
(`decode_attention._unpack_asm`), per-(token, head) float16 scale and offset folded in after the products, value
codes token-pair interleaved (`quantization.write_token_pairs`).

What is different, and why (the Triton kernel is stall-bound, benchmarks/RESULTS.md):

- **One warp per program** for up to 16 query rows per KV head (GQA decode: 4 rows). The four warps of the Triton
  kernel share every score tile, so each online-softmax round crosses warps (shared memory and barriers). Here a row's
  keys all sit in one warp: row max and sum are two shuffles. More rows (up to 64: 8 query heads x 8 positions) take
  one warp per 16 rows, each with the whole key block (the warps then read the same codes; nothing crosses warps).
- **A cp.async ring of `NUM_STAGES` buffers** (key codes, value codes, and the four per-token parameters as one
  `[4, BLOCK]` tile) keeps `NUM_STAGES - 1` blocks in flight while the warp unpacks and multiplies the current one;
  the loads hold no registers. Copies past the split's end are predicated off (zero fill); the last block's keys past
  the end are masked in the softmax. Per-token parameters are copied in 16-byte vectors, so the body's capacity must
  be a multiple of 8 tokens (`supported` checks it; the buffers are zero-filled, so the tokens past `body_len` in the
  last vector are finite, and their probabilities are exactly 0).
- **Operands built where the products read them.** The query is loaded once into the A-operand registers (`k_width`
  4); key codes are read from shared memory as 4-byte words straight into the B-operand layout (4 channels of one
  key) and unpacked in place; value codes are read as 16-bit token pairs, unpacked into the two tokens' `4 + code`
  and joined into the B operand of the probability product (a register relabelling, checked at compile time with
  `assert_trivial`). The probabilities go from the score accumulator to the A operand without data movement.
- **Stacked rows** (as in the Triton kernel): with `RP` <= 4 query rows the 16 score rows are `J` copies of them, copy
  j scoring sub-block j of each `J * SB` keys, so the softmax runs on no padding rows. The per-token parameters are
  then wanted at `[row, key] -> key of copy(row)`: a `[J, SB]` tile is loaded in a layout that broadcasts over the
  rows of a copy and relabelled to the score layout (an explicit linear layout, no data movement).
- Query copies come from distinct addresses (`copy_stride`, 0 at run time but not known to the compiler): loaded
  from one address, the compiler merges them and re-copies registers before every product (RESULTS, Gluon prototype).

Products are `mma.sync` (`mma_v2`). `wgmma` needs M = 64 per warpgroup, and a decode step has 4-16 query rows per
KV head; with the keys on M (scores^T = codes @ q^T) it fits, but the probabilities would have to go through shared
memory for the value product (B from shared memory) every block: see `benchmarks/research/hopper_decode_notes.md`.

`benchmarks/research/hopper_decode_compile.py` compiles this for sm_90 without a GPU and prints registers, shared
memory, spills and the main loop's SASS; `benchmarks/research/hopper_decode_gpu.py` checks and times it on one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from oscar_hf.kernels.decode_attention import _interpreting, _unpack_asm

ENV_FLAG = "OSCAR_HF_HOPPER_KERNEL"
MAX_ROWS = 64  # query rows per KV head (GQA group x q_len): one warp per 16
_MASKED = gl.constexpr(-1.0e30)  # the Triton kernel's finite "minus infinity"
_CODE_BASE = gl.constexpr(4.0)


def env_choice() -> bool | None:
    """`OSCAR_HF_HOPPER_KERNEL`: `1` asks for this kernel wherever it can serve, `0` never; unset (None) leaves the
    choice to `measured_faster`."""
    value = os.environ.get(ENV_FLAG, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV_FLAG}={value!r}: use 1 (the Gluon body wherever it can serve), 0 (never) or leave it "
                         "unset (where it was measured faster).")
    return None if value == "" else value == "1"


# The Triton releases whose Gluon API this kernel is written against (3.9 renamed and removed calls it makes).
MEASURED_TRITON = ("3.6.",)


def measured_faster(kv_rows: int, body_capacity: int, rows: int) -> bool:
    """Whether this kernel beat the Triton body for `kv_rows` (batch x KV heads) rows of `body_capacity` 2-bit tokens
    each and `rows` query rows per KV head. H100, Triton 3.6, 4 query rows, device lengths (benchmarks/RESULTS.md,
    "Fourth run" call 2 for 8 x 8K and 8 x 32K, "Fifth run" call 3 for the rest, 2026-12-07; Gluon against Triton us
    per call): faster at 8 x 128K (63.0 against 67.4), 16 x 128K
    (105.9 / 140.2), 32 x 128K (186.8 / 228.1), 64 x 128K (356.6 / 421.0, 16 programs per SM), 32 x 32K
    (66.1 / 74.6) and 64 x 32K (119.0 / 124.5, 16 per SM); slower at 8 x 8K (17.8 / 15.1), 8 x 32K (26.4 / 23.4)
    and 128 x 32K (248.8 / 239.6). So: at least 2^20 (row, token) pairs over at most 64 rows. Not measured with more
    than 4 query rows per KV head."""
    return (triton.__version__.startswith(MEASURED_TRITON) and rows <= 4 and kv_rows <= 64
            and kv_rows * body_capacity >= 1 << 20)


def programs_per_sm(kv_rows: int) -> int:
    """Programs per SM of the split-K grid: 8 for up to 32 (batch x KV head) rows, 16 above (the runs of
    `measured_faster`: 16 per SM took 64 x 128K from 509.0 to 356.6 us; 4 per SM was slower everywhere)."""
    return 8 if kv_rows <= 32 else 16


# ------------------------------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class BodyConfig:
    """A launch of the body kernel: `rows` query rows per KV head (group x q_len), `head_dim`, `sb` keys per
    sub-block, `stages` pipeline buffers. Derived: `warps` (one per 16 rows), `rp` the rows of one copy, `j` the
    stacked copies, `block` keys per iteration (`j * sb`)."""

    rows: int
    head_dim: int = 128
    sb: int | None = None  # default: 32 with stacked copies, 64 without
    stages: int = 3

    def __post_init__(self):
        if self.sb is None:
            object.__setattr__(self, "sb", 32 if self.j > 1 else 64)

    @property
    def rp(self) -> int:  # score rows per copy (the query rows padded)
        return self.m // self.j

    @property
    def warps(self) -> int:
        return max(1, triton.next_power_of_2(self.rows) // 16)

    @property
    def m(self) -> int:  # score rows: 16 per warp
        return 16 * self.warps

    @property
    def j(self) -> int:
        return min(4, self.m // triton.next_power_of_2(self.rows)) if self.warps == 1 else 1

    @property
    def block(self) -> int:
        return self.j * self.sb

    def check(self) -> None:
        if self.head_dim not in (64, 128):
            raise ValueError(f"head_dim {self.head_dim}: the Gluon body kernel is built for 64 and 128")
        if not 1 <= self.rows <= MAX_ROWS:
            raise ValueError(f"{self.rows} query rows per KV head (1..{MAX_ROWS})")
        if self.sb not in (32, 64) or self.stages < 2:
            raise ValueError(f"sb={self.sb} (32 or 64), stages={self.stages} (>= 2)")


def _acc_bases(m: int, n: int, warps: int) -> tuple[list, list, list]:
    """Register, lane and warp bases of the `mma_v2` accumulator `[m, n]` (instr 16 x 8, warps along M): what
    `gl.to_linear_layout(NVMMADistributedLayout([2, 0], [warps, 1], [16, 8]), [m, n])` gives (checked by
    `hopper_decode_compile.py`)."""
    reg = [[0, 1], [8, 0]]
    c = 8
    while c < n:
        reg.append([0, c])
        c *= 2
    r = 16 * warps
    while r < m:
        reg.append([r, 0])
        r *= 2
    lane = [[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]]
    warp = [[16 * (1 << i), 0] for i in range(warps.bit_length() - 1)]
    return reg, lane, warp


def per_key_layout(cfg: BodyConfig, n: int) -> gl.DistributedLinearLayout:
    """`[J, RP, n]` layout whose reshape to `[J * RP, n]` is the score accumulator's layout: row `c * RP + rr` is
    copy c's row rr. Its slice along dim 1 holds, in each thread, the per-key values of exactly the copies and keys
    of that thread's scores (broadcast over the rows of a copy)."""
    rp = cfg.rp

    def split(b):
        row, col = b
        if row == 0:
            return [0, 0, col]
        return [0, row, col] if row < rp else [row // rp, 0, col]

    reg, lane, warp = _acc_bases(cfg.m, n, cfg.warps)
    return gl.DistributedLinearLayout(reg_bases=[split(b) for b in reg], lane_bases=[split(b) for b in lane],
                                      warp_bases=[split(b) for b in warp], block_bases=[], shape=[cfg.j, rp, n])


def value_pair_layout(cfg: BodyConfig, qd: int) -> gl.DistributedLinearLayout:
    """`[SB / 2, QD]` layout of the 16-bit value-code pairs whose unpacked tokens (`join` then reshape to `[SB, QD]`,
    key = 2 * pair + parity) are the B operand of the probability product (`DotOperandLayout(1, mma, 2)`): that
    operand's bases with the key bit 0 (the parity) dropped and the others halved."""
    reg = [[4, 0]]  # key + 8
    k = 16
    while k < cfg.sb:
        reg.append([k // 2, 0])
        k *= 2
    c = 8
    while c < qd:
        reg.append([0, c])
        c *= 2
    lane = [[1, 0], [2, 0], [0, 1], [0, 2], [0, 4]]
    warp = [[0, 0]] * (cfg.warps.bit_length() - 1)  # every warp reads every pair (rows are split over warps)
    return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=lane, warp_bases=warp, block_bases=[],
                                      shape=[cfg.sb // 2, qd])


# ------------------------------------------------------------------------------------------------------ kernel
_BF16 = [gl.constexpr(_unpack_asm("bf16", s)) for s in range(4)]
_FP16 = [gl.constexpr(_unpack_asm("fp16", s)) for s in range(4)]
_FP16_PAIRS = [gl.constexpr(_unpack_asm("fp16", s, pairs=True)) for s in range(4)]
_BF16_0, _BF16_1, _BF16_2, _BF16_3 = _BF16
_FP16_0, _FP16_1, _FP16_2, _FP16_3 = _FP16
_PAIRS_0, _PAIRS_1, _PAIRS_2, _PAIRS_3 = _FP16_PAIRS


@gluon.jit
def _key_codes(packed, S: gl.constexpr, DT: gl.constexpr):
    """`4 + code` (DT) of channel quarter S of each byte; four bytes (one 32-bit register) at a time."""
    if DT == gl.bfloat16:
        if S == 0:
            asm: gl.constexpr = _BF16_0
        elif S == 1:
            asm: gl.constexpr = _BF16_1
        elif S == 2:
            asm: gl.constexpr = _BF16_2
        else:
            asm: gl.constexpr = _BF16_3
    else:
        if S == 0:
            asm: gl.constexpr = _FP16_0
        elif S == 1:
            asm: gl.constexpr = _FP16_1
        elif S == 2:
            asm: gl.constexpr = _FP16_2
        else:
            asm: gl.constexpr = _FP16_3
    if DT == gl.bfloat16:
        return gl.inline_asm_elementwise(asm, "=r,=r,r", [packed], dtype=gl.bfloat16, is_pure=True, pack=4)
    else:
        return gl.inline_asm_elementwise(asm, "=r,=r,r", [packed], dtype=gl.float16, is_pure=True, pack=4)


@gluon.jit
def _value_codes(pairs, S: gl.constexpr, B_L: gl.constexpr):
    """Token pairs `[SB / 2, QD]` (uint16) -> `4 + code` (float16) of quarter S as `[SB, QD]` in `B_L`."""
    if S == 0:
        asm: gl.constexpr = _PAIRS_0
    elif S == 1:
        asm: gl.constexpr = _PAIRS_1
    elif S == 2:
        asm: gl.constexpr = _PAIRS_2
    else:
        asm: gl.constexpr = _PAIRS_3
    even, odd = gl.inline_asm_elementwise(asm, "=r,=r,r", [pairs], dtype=(gl.float16, gl.float16), is_pure=True,
                                          pack=2)
    both = gl.join(even, odd)  # [SB / 2, QD, 2]: the parity in-thread
    both = gl.permute(both, (0, 2, 1))
    both = gl.reshape(both, [2 * pairs.shape[0], pairs.shape[1]])
    return gl.convert_layout(both, B_L, assert_trivial=True)


@gluon.jit
def _copy_params(rows, buf, ks_ptr, ko_ptr, vs_ptr, vo_ptr, offs, mask):
    """Start the copies of one block's key scale, key offset, value scale and value offset (rows `4 * buf ..`)."""
    cp.async_copy_global_to_shared(rows.index(4 * buf), ks_ptr + offs, mask=mask)
    cp.async_copy_global_to_shared(rows.index(4 * buf + 1), ko_ptr + offs, mask=mask)
    cp.async_copy_global_to_shared(rows.index(4 * buf + 2), vs_ptr + offs, mask=mask)
    cp.async_copy_global_to_shared(rows.index(4 * buf + 3), vo_ptr + offs, mask=mask)


@gluon.jit
def _per_key(tile, J: gl.constexpr, RP: gl.constexpr, SB: gl.constexpr, PK_L: gl.constexpr, ACC: gl.constexpr):
    """`[J * SB]` per-key values (a shared-memory row) as `[J * RP, SB]` in the score layout: row c * RP + rr takes
    key c * SB + n."""
    if J == 1:
        return gl.expand_dims(tile.load(gl.SliceLayout(0, ACC)).to(gl.float32), 0)
    else:
        x = tile.reshape([J, SB]).load(gl.SliceLayout(1, PK_L)).to(gl.float32)
        x = gl.expand_dims(x, 1)
        x = gl.broadcast(x, gl.full([J, RP, SB], 0.0, gl.float32, PK_L))[0]
        x = gl.reshape(x, [J * RP, SB])
        return gl.convert_layout(x, ACC, assert_trivial=True)


@gluon.jit(do_not_specialize=["sink_len", "body_len", "chunk_blocks", "num_splits", "copy_stride"])
def _body_stage1(
    qr_ptr,
    kc_ptr, vc_ptr, s_c_b, s_c_h,
    ks_ptr, ko_ptr, vs_ptr, vo_ptr, s_p_b, s_p_h,
    mask_ptr, sm_b, sm_q, sm_t,
    part_o, part_m, part_l,
    sink_len, body_len, q_len, num_kv_heads, group, chunk_blocks, num_splits, copy_stride,
    sm_scale_log2, lengths_ptr,
    D: gl.constexpr, BLOCK_M_OUT: gl.constexpr, RP: gl.constexpr, J: gl.constexpr, SB: gl.constexpr,
    WARPS: gl.constexpr, NUM_STAGES: gl.constexpr, DT: gl.constexpr, HAS_MASK: gl.constexpr,
    DEVICE_LENGTHS: gl.constexpr, MASK_SCAN: gl.constexpr, PK_L: gl.constexpr, VP_L: gl.constexpr,
):
    QD: gl.constexpr = D // 4
    M: gl.constexpr = 16 * WARPS
    BLOCK: gl.constexpr = J * SB
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
    QA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=4)  # query: 4 channels a thread
    KB: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=ACC, k_width=4)  # key codes: one 32-bit word
    PA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)  # probabilities
    VB: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=ACC, k_width=2)  # value codes: token pairs
    ROW: gl.constexpr = gl.SliceLayout(1, ACC)
    COL: gl.constexpr = gl.SliceLayout(0, ACC)
    # copies into shared memory: 16-byte vectors
    CP_K: gl.constexpr = gl.BlockedLayout([1, 16], [32 // (QD // 16), QD // 16], [WARPS, 1], [1, 0])
    CP_V: gl.constexpr = gl.BlockedLayout([1, 16], [32 // (QD // 8), QD // 8], [WARPS, 1], [1, 0])
    CP_P: gl.constexpr = gl.BlockedLayout([8], [32], [WARPS], [0])
    SMEM: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
    SMEM1: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])

    pid_bh = gl.program_id(0)
    pid_s = gl.program_id(1)
    if DEVICE_LENGTHS:
        sink_len = gl.load(lengths_ptr)
        body_len = gl.load(lengths_ptr + 1)
    b = (pid_bh // num_kv_heads).to(gl.int64)
    kvh = (pid_bh % num_kv_heads).to(gl.int64)
    lo = pid_s * chunk_blocks * BLOCK  # (a multiple of BLOCK: the parameter copies are 16-byte aligned)
    hi = gl.minimum(lo + chunk_blocks * BLOCK, body_len)

    # ---- query operands, loaded once (stage 0's rows rr = r % RP; copies at distinct addresses)
    qr = gl.arange(0, M, layout=gl.SliceLayout(1, QA))
    qk = gl.arange(0, QD, layout=gl.SliceLayout(0, QA))
    q_rows = (qr % RP) + (qr // RP) * copy_stride
    q_base = qr_ptr + pid_bh.to(gl.int64) * BLOCK_M_OUT * D + q_rows[:, None] * D + qk[None, :]
    q0 = gl.load(q_base)
    q1 = gl.load(q_base + QD)
    q2 = gl.load(q_base + 2 * QD)
    q3 = gl.load(q_base + 3 * QD)
    qsum = gl.sum(q0.to(gl.float32) + q1.to(gl.float32) + q2.to(gl.float32) + q3.to(gl.float32), axis=1)
    qsum = gl.convert_layout(qsum, ROW)

    # ---- shared-memory ring
    kc_smem = gl.allocate_shared_memory(gl.uint8, [NUM_STAGES, BLOCK, QD], SMEM)
    vc_smem = gl.allocate_shared_memory(gl.uint8, [NUM_STAGES, BLOCK // 2, 2 * QD], SMEM)
    pr_rows = gl.allocate_shared_memory(gl.float16, [NUM_STAGES * 4, BLOCK], SMEM1)  # (buffer, parameter) rows
    vc16 = vc_smem._reinterpret(gl.uint16, [NUM_STAGES, BLOCK // 2, QD], SMEM)

    c_off = b * s_c_b + kvh * s_c_h
    p_off = b * s_p_b + kvh * s_p_h
    k_rows = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, CP_K))
    k_ptrs = kc_ptr + c_off + k_rows[:, None] * QD + gl.arange(0, QD, layout=gl.SliceLayout(0, CP_K))[None, :]
    v_rows = gl.arange(0, BLOCK // 2, layout=gl.SliceLayout(1, CP_V))
    v_ptrs = vc_ptr + c_off + v_rows[:, None] * (2 * QD) + gl.arange(0, 2 * QD, layout=gl.SliceLayout(0, CP_V))[None, :]
    p_key = gl.arange(0, BLOCK, layout=CP_P)
    p_vec = (p_key // 8) * 8  # the parameters move in 8-token vectors: one predicate per vector

    # ---- per-score index tensors (loop-invariant)
    sr = gl.arange(0, M, layout=ROW)
    sn = gl.arange(0, SB, layout=COL)
    s_copy = sr // RP
    s_key = s_copy[:, None] * SB + sn[None, :]  # [M, SB]: key offset within the block of each score
    if HAS_MASK:
        s_qi = (sr % RP) % q_len
    pa_copy = gl.arange(0, M, layout=gl.SliceLayout(1, PA)) // RP

    m_i = gl.full([M], _MASKED, gl.float32, ROW)
    l_i = gl.full([M], 0.0, gl.float32, ROW)
    a_off = gl.full([M], 0.0, gl.float32, ROW)
    a0 = gl.full([M, QD], 0.0, gl.float32, ACC)
    a1 = gl.full([M, QD], 0.0, gl.float32, ACC)
    a2 = gl.full([M, QD], 0.0, gl.float32, ACC)
    a3 = gl.full([M, QD], 0.0, gl.float32, ACC)

    hidden = HAS_MASK
    if HAS_MASK and MASK_SCAN:
        hidden = _any_hidden(mask_ptr, b, sm_b, sm_q, sm_t, q_len, sink_len + lo, sink_len + hi, WARPS)

    n_blocks = gl.cdiv(hi - lo, BLOCK)
    # prologue: NUM_STAGES - 1 blocks in flight
    for i in gl.static_range(NUM_STAGES - 1):
        start = lo + i * BLOCK
        cp.async_copy_global_to_shared(kc_smem.index(i), k_ptrs + start * QD, mask=(start + k_rows < hi)[:, None])
        cp.async_copy_global_to_shared(vc_smem.index(i), v_ptrs + start * QD,
                                       mask=(start + 2 * v_rows < hi)[:, None])
        _copy_params(pr_rows, i, ks_ptr, ko_ptr, vs_ptr, vo_ptr, p_off + start + p_key, start + p_vec < hi)
        cp.commit_group()

    for i in range(n_blocks):
        # refill the buffer the previous iteration read (NUM_STAGES - 1 blocks ahead); past the end: predicated off
        gl.thread_barrier()
        nxt = i + NUM_STAGES - 1
        buf_w = nxt % NUM_STAGES
        start = lo + nxt * BLOCK
        cp.async_copy_global_to_shared(kc_smem.index(buf_w), k_ptrs + start * QD,
                                       mask=(start + k_rows < hi)[:, None])
        cp.async_copy_global_to_shared(vc_smem.index(buf_w), v_ptrs + start * QD,
                                       mask=(start + 2 * v_rows < hi)[:, None])
        _copy_params(pr_rows, buf_w, ks_ptr, ko_ptr, vs_ptr, vo_ptr, p_off + start + p_key, start + p_vec < hi)
        cp.commit_group()
        cp.wait_group(NUM_STAGES - 1)
        gl.thread_barrier()

        buf = i % NUM_STAGES
        start = lo + i * BLOCK
        kc_buf = kc_smem.index(buf)
        # ---- scores: [M, SB]; with stacked rows, copy c keeps sub-block c
        s = gl.full([M, SB], 0.0, gl.float32, ACC)
        for c in gl.static_range(J):
            kt = kc_buf.slice(c * SB, SB, dim=0).permute((1, 0)).load(KB)  # [QD, SB] bytes
            s_c = mma_v2(q0, _key_codes(kt, 0, DT), gl.full([M, SB], 0.0, gl.float32, ACC))
            s_c = mma_v2(q1, _key_codes(kt, 1, DT), s_c)
            s_c = mma_v2(q2, _key_codes(kt, 2, DT), s_c)
            s_c = mma_v2(q3, _key_codes(kt, 3, DT), s_c)
            if J == 1:
                s = s_c
            else:
                s = gl.where((s_copy == c)[:, None], s_c, s)
        k_scale = _per_key(pr_rows.index(4 * buf), J, RP, SB, PK_L, ACC)
        k_off = _per_key(pr_rows.index(4 * buf + 1), J, RP, SB, PK_L, ACC)
        # q . (4 + code) * scale + (offset - 4 * scale) * sum(q) = q . (code * scale + offset)
        scores = (s * k_scale + qsum[:, None] * (k_off - _CODE_BASE * k_scale)) * sm_scale_log2
        vis = s_key < hi - start
        if HAS_MASK:  # (compile-time: without a mask the loop holds no mask code)
            if hidden:  # (a uniform branch: the warp skips the load where the scan found nothing hidden)
                allowed = gl.load(mask_ptr + b * sm_b + s_qi[:, None] * sm_q + (sink_len + start + s_key) * sm_t,
                                  mask=vis, other=0)
                vis = vis & (allowed != 0)
        scores = gl.where(vis, scores, _MASKED)
        m_new = gl.maximum(m_i, gl.max(scores, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.where(vis, gl.exp2(scores - m_new[:, None]), 0.0)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        v_scale = _per_key(pr_rows.index(4 * buf + 2), J, RP, SB, PK_L, ACC)
        v_off = _per_key(pr_rows.index(4 * buf + 3), J, RP, SB, PK_L, ACC)
        a_off = a_off * alpha + gl.sum(p * (v_off - _CODE_BASE * v_scale), axis=1)
        # (p * scale) in float16 against float16 codes, whatever the storage dtype (as the Triton kernel)
        pa = gl.convert_layout((p * v_scale).to(gl.float16), PA)
        a0 = a0 * alpha[:, None]
        a1 = a1 * alpha[:, None]
        a2 = a2 * alpha[:, None]
        a3 = a3 * alpha[:, None]
        vc_buf = vc16.index(buf)
        for c in gl.static_range(J):
            if J == 1:
                pc = pa
            else:
                pc = gl.where((pa_copy == c)[:, None], pa, 0.0)
            vt = vc_buf.slice(c * (SB // 2), SB // 2, dim=0).load(VP_L)  # [SB / 2, QD] token pairs
            a0 = mma_v2(pc, _value_codes(vt, 0, VB), a0)
            a1 = mma_v2(pc, _value_codes(vt, 1, VB), a1)
            a2 = mma_v2(pc, _value_codes(vt, 2, VB), a2)
            a3 = mma_v2(pc, _value_codes(vt, 3, VB), a3)
    cp.wait_group(0)

    # ---- merge the J copies of each row (online-softmax merge; a copy that saw no key has l = 0, weight 0)
    part = (pid_bh * num_splits + pid_s).to(gl.int64)
    if J == 1:
        _store_partial(part_o, part_m, part_l, part, group * q_len, m_i, l_i, a_off, a0, a1, a2, a3, RP, QD, D,
                       BLOCK_M_OUT, ACC)
    else:
        MERGE: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 4, 8], [1, 1, WARPS], [2, 1, 0])
        JR: gl.constexpr = gl.SliceLayout(2, MERGE)
        m_j = gl.convert_layout(gl.reshape(m_i, [J, RP]), JR)
        m_o = gl.max(m_j, axis=0)
        w = gl.exp2(m_j - m_o[None, :])
        l_o = gl.sum(w * gl.convert_layout(gl.reshape(l_i, [J, RP]), JR), axis=0)
        off_o = gl.sum(w * gl.convert_layout(gl.reshape(a_off, [J, RP]), JR), axis=0)
        w3 = gl.expand_dims(w, 2)
        o0 = gl.sum(w3 * gl.convert_layout(gl.reshape(a0, [J, RP, QD]), MERGE), axis=0)
        o1 = gl.sum(w3 * gl.convert_layout(gl.reshape(a1, [J, RP, QD]), MERGE), axis=0)
        o2 = gl.sum(w3 * gl.convert_layout(gl.reshape(a2, [J, RP, QD]), MERGE), axis=0)
        o3 = gl.sum(w3 * gl.convert_layout(gl.reshape(a3, [J, RP, QD]), MERGE), axis=0)
        ROWO: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(0, MERGE))
        m_o = gl.convert_layout(m_o, ROWO)
        l_o = gl.convert_layout(l_o, ROWO)
        off_o = gl.convert_layout(off_o, ROWO)
        _store_partial(part_o, part_m, part_l, part, group * q_len, m_o, l_o, off_o, o0, o1, o2, o3, RP, QD, D,
                       BLOCK_M_OUT, gl.SliceLayout(0, MERGE))


@gluon.jit
def _any_hidden(mask_ptr, b, sm_b, sm_q, sm_t, q_len, lo, hi, WARPS: gl.constexpr):
    """`decode_attention._any_hidden` for one split: does the mask hide any column in `[lo, hi)` from a query row?"""
    SCAN: gl.constexpr = 512
    L: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [1, WARPS], [1, 0])
    QP: gl.constexpr = 8  # q_len <= 8 (at most 64 rows of up to 8 heads)
    qi = gl.arange(0, QP, layout=gl.SliceLayout(1, L))
    hidden = gl.full([QP, SCAN], 0, gl.int32, L)
    for start in range(lo, hi, SCAN):
        col = start + gl.arange(0, SCAN, layout=gl.SliceLayout(0, L))
        ok = (qi < q_len)[:, None] & (col < hi)[None, :]
        allowed = gl.load(mask_ptr + b * sm_b + qi[:, None] * sm_q + col[None, :] * sm_t, mask=ok, other=1)
        hidden += (allowed == 0).to(gl.int32)
    return gl.sum(gl.sum(hidden, axis=1), axis=0) > 0


@gluon.jit
def _store_partial(part_o, part_m, part_l, part, n_rows, m, l, off, o0, o1, o2, o3, RP: gl.constexpr,
                   QD: gl.constexpr, D: gl.constexpr, BLOCK_M_OUT: gl.constexpr, L: gl.constexpr):
    """The split's partial as the Triton stage 1 writes it: rows `< n_rows` of `[BLOCK_M_OUT, D]` output (the value
    offsets' share added), running max and sum."""
    rows = gl.arange(0, RP, layout=gl.SliceLayout(1, L))
    cols = gl.arange(0, QD, layout=gl.SliceLayout(0, L))
    ok = rows < n_rows
    base = part_o + part * BLOCK_M_OUT * D + rows[:, None] * D + cols[None, :]
    gl.store(base, o0 + off[:, None], mask=ok[:, None])
    gl.store(base + QD, o1 + off[:, None], mask=ok[:, None])
    gl.store(base + 2 * QD, o2 + off[:, None], mask=ok[:, None])
    gl.store(base + 3 * QD, o3 + off[:, None], mask=ok[:, None])
    gl.store(part_m + part * BLOCK_M_OUT + rows, m, mask=ok)
    gl.store(part_l + part * BLOCK_M_OUT + rows, l, mask=ok)


# ------------------------------------------------------------------------------------------------------ launcher
def config_for(rows: int, head_dim: int, sb: int | None = None, stages: int = 3) -> BodyConfig:
    cfg = BodyConfig(rows=rows, head_dim=head_dim, sb=sb, stages=stages)
    cfg.check()
    return cfg


def constexprs(cfg: BodyConfig, dtype: torch.dtype, block_m_out: int, has_mask: bool, device_lengths: bool,
               mask_scan: bool = True) -> dict:
    """The kernel's compile-time arguments for `cfg` (also what `hopper_decode_compile.py` compiles)."""
    qd = cfg.head_dim // 4
    return dict(
        D=cfg.head_dim, BLOCK_M_OUT=block_m_out, RP=cfg.rp, J=cfg.j, SB=cfg.sb, WARPS=cfg.warps,
        NUM_STAGES=cfg.stages, DT=gl.bfloat16 if dtype == torch.bfloat16 else gl.float16, HAS_MASK=has_mask,
        DEVICE_LENGTHS=device_lengths, MASK_SCAN=mask_scan, PK_L=per_key_layout(cfg, cfg.sb),
        VP_L=value_pair_layout(cfg, qd),
    )


def supported(query: torch.Tensor, segments, attention_mask=None) -> str | None:
    """Why the Gluon body kernel cannot serve this call (None when it can): the Triton stage 1 then serves the body
    too. Assumes `decode_attention.unsupported_reason` already passed."""
    if _interpreting():
        return "the Triton interpreter runs no Gluon kernel"
    if not query.is_cuda or torch.cuda.get_device_capability(query.device) != (9, 0):
        return "not an sm_90 (Hopper) GPU"
    bsz, num_heads, q_len, head_dim = query.shape
    kc, ks = segments[4], segments[5]
    kvh = kc.shape[1]
    rows = (num_heads // kvh) * q_len
    if head_dim not in (64, 128):
        return f"head_dim {head_dim} (built for 64 and 128)"
    if rows > MAX_ROWS:
        return f"{rows} query rows per KV head (at most {MAX_ROWS})"
    if ks.shape[-1] % 8:
        return f"body capacity {ks.shape[-1]} is not a multiple of 8 tokens (parameters move in 8-token vectors)"
    if ks.stride(1) % 8 or ks.stride(0) % 8 or kc.stride(1) % 16 or kc.stride(0) % 16:
        return "body buffers not 16-byte aligned per (batch, KV head)"
    if any(t.data_ptr() % 16 for t in segments[4:]):
        return "body buffers not 16-byte aligned"
    return None


def launch_body(q_rot, segments, part_o, part_m, part_l, *, sink_len, body_len, q_len, num_kv_heads, group,
                body_chunk, body_splits, num_splits, block_m_out, sm_scale_log2, mask_u8, sm_b, sm_q, sm_t,
                has_mask, lengths, cfg: BodyConfig, dtype: torch.dtype, n_bh: int, mask_scan: bool = True,
                max_registers: int | None = None) -> None:
    """Launch the body programs `0 .. body_splits - 1` of every (batch x KV head) row; `body_chunk` tokens a split
    (a multiple of `cfg.block`). `lengths` is the device lengths tensor or None (host lengths)."""
    (_, _, _, _, kc, ks, ko, vc, vs, vo) = segments
    device_lengths = lengths is not None
    _body_stage1[(n_bh, body_splits)](
        q_rot,
        kc, vc, *kc.stride()[:2],
        ks, ko, vs, vo, *ks.stride()[:2],
        mask_u8, sm_b, sm_q, sm_t,
        part_o, part_m, part_l,
        sink_len, body_len, q_len, num_kv_heads, group, body_chunk // cfg.block, num_splits, 0,
        sm_scale_log2, lengths if device_lengths else mask_u8,
        num_warps=cfg.warps,
        **({} if max_registers is None else {"maxnreg": max_registers}),
        **constexprs(cfg, dtype, block_m_out, has_mask, device_lengths, mask_scan),
    )
