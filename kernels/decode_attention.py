"""Triton decode attention over an `OscarQuantizedLayer`: BF16 sink + packed INT2 body + BF16 recent window.

Split-K ("flash-decoding"), three launches:

- **stage 0**, grid `(batch * kv_heads, 4)`: rotates the query by R_K (float32, IEEE dot), a quarter of the channels
  per program, and rounds it to the storage dtype, as the reference does, into a padded `[rows, head_dim]` tile per
  KV head (`rotate_query`). A compiled decode step does not launch it: the step's window write computes the same
  tile (`kernels.append.append_window(..., query=)`), passed as `rotated_query`.
- **stage 1**, grid `(batch * kv_heads, splits)`. A program serves *all* query rows of one KV head (the
  `group` query heads that share it, times `q_len` query positions) from one load of each key/value block. Programs
  `0 .. body_splits-1` each walk one chunk of the 2-bit body; the others walk 64-token chunks of the sink and of the
  recent window. With few query rows (GQA decode: 4 of the 16 rows a tensor-core tile has) the tile holds up to 4
  copies of them, copy j scoring sub-block j of each body iteration, so the online softmax runs on no padding rows.
  Each program writes its partial output, running max and running sum (base-2 online softmax).
- **stage 2**, grid `(batch * kv_heads, group * q_len, head_dim / 32)`: merges one output row's partials over every
  split in one pass, normalises, un-rotates 32 of its channels by R_V^T and writes them to
  `[batch, q_len, heads, head_dim]` memory (returned as the `[batch, heads, q_len, head_dim]` view). With
  `DecodeOptions(merge_in_stage1=True)` it is not launched: the last stage-1 program of each (batch, KV head) row to
  finish does the same merge for all its rows.

INT2 blocks are never dequantized element by element. With the planar packing (`oscar_hf.quantization`), shifting a
row's `D/4` bytes by `2s` gives the codes of channel quarter `s`, and a row decodes as `code * scale + offset`, so

    q . k     = scale * sum_s (q_s . (4 + codes_s)) + (offset - 4 * scale) * sum(q)
    sum_n p v = sum_s [(p * scale_v) @ (4 + codes_s)]  ++  sum_n p * (offset_v - 4 * scale_v)

Codes become bf16/fp16 operands by bit pattern (`4 + code`, exact; see `_unpack_asm`), so the tensor cores multiply
them directly and no conversion instruction runs per element; the scale/offset corrections are one multiply-add per
(row, key). The packed bytes reach shared memory through the software pipeline (`num_stages`) with 16-byte copies and
are unpacked in the registers of the matrix-product operand layout.

Codes are read two bytes at a time (uint16), so that every product operand is 16-bit and Triton lays the other
operand out as for bf16 x bf16 (a byte operand makes it re-pack the query every block): `key_pairs` splits each
quarter's score product into the even and the odd code bytes' channels; `value_pairs` reads the same byte of two
consecutive tokens (the body stores value codes token-pair interleaved, `quantization.write_token_pairs`) and splits
the value product by token parity. Body loop on sm_90 (`benchmarks/sass_loop.py`, Triton 3.6): 1,005 -> 781
instructions per warp per 128 keys; chosen on these counts, to be timed on the device. The byte-at-a-time paths
remain for head_dim 64 and sub-blocks under 32 tokens. The PyTorch reference is
`oscar_hf.attention.segment_attention_reference`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch
import triton
import triton.language as tl

try:  # programmatic dependent launch (Triton >= 3.3); the kernels reference these only when `PDL` is set
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

from oscar_hf.layer import LENGTH_SLOTS
from oscar_hf.quantization import CODES_PER_BYTE

MAX_QUERY_LEN = 8
MAX_BLOCK_M = 64
_LOG2E = 1.4426950408889634
_MASKED = tl.constexpr(-1.0e30)  # a finite "minus infinity": exp2 of a difference of two of them stays finite (no NaN)

_SM_COUNT: dict[int, int] = {}
_MASKED_STAGE1_REGISTERS = 168


# ---------------------------------------------------------------------------------------------------------- helpers
@triton.jit
def _mma(a, b, FP32_DOT: tl.constexpr):
    """`a @ b` with float32 accumulation. Triton's CPU interpreter multiplies bf16 operands as their integer bit
    patterns, so under the interpreter the (bf16-valued) operands go in as float32: the same products, exactly."""
    if FP32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _round(x, DT: tl.constexpr, FP32_DOT: tl.constexpr):
    """`x.to(DT)`, rounding to nearest even. Under the CPU interpreter (`FP32_DOT`), which truncates float32 to bf16,
    the rounding is done on the bit pattern first, so that the interpreted kernel computes what the GPU computes."""
    if FP32_DOT and DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DT)


# Codes become floats by bit pattern, not by conversion instructions (which run at a quarter of the integer rate and
# bound the kernel otherwise): a code OR-ed into the two mantissa bits whose ulp is 1 at 4.0 gives `4 + code`
# exactly, in bf16 (0x4080 | code << 5) and in fp16 (0x4400 | code << 8); the base 4 is folded into the row's offset.
# A small base keeps `sum p * (4 + code)` from cancelling against `4 * sum p` in float32.
CODE_BASE = tl.constexpr(4.0)


def _unpack_asm(dt: str, s: int, pairs: bool = False) -> str:
    """PTX for four packed bytes (one 32-bit register, `$2`) -> four `4 + code` values of quarter `s` (`$0`, `$1`):
    one shift, one `lop3` ((t & mask) | exponent bits) and two byte permutes that interleave the code bytes with the
    constant bytes. Bytes b0 b1 | b2 b3 give `$0` = (b0, b1) and `$1` = (b2, b3); with `pairs` (the register holds
    two uint16 elements) `$0` = the even bytes (b0, b2) and `$1` = the odd ones (b1, b3)."""
    if dt == "bf16":  # low byte 0x80 | code << 5, high byte 0x40
        shift = "shr.b32 t, $2, 1;" if s == 3 else f"shl.b32 t, $2, {5 - 2 * s};"
        mask, bits, other = "0x60606060", "0x80808080", "0x40404040"
        sel = ("0x4240", "0x4341") if pairs else ("0x4140", "0x4342")
    else:  # low byte 0, high byte 0x44 | code
        shift = "mov.b32 t, $2;" if s == 0 else f"shr.b32 t, $2, {2 * s};"
        mask, bits, other = "0x03030303", "0x44444444", "0"
        sel = ("0x2404", "0x3414") if pairs else ("0x1404", "0x3424")
    return (
        f"{{ .reg .b32 t, m, c, h; {shift} mov.b32 m, {mask}; mov.b32 c, {bits}; mov.b32 h, {other}; "
        f"lop3.b32 t, t, m, c, 0xea; prmt.b32 $0, t, h, {sel[0]}; prmt.b32 $1, t, h, {sel[1]}; }}"
    )


_BF16_ASM_0, _BF16_ASM_1, _BF16_ASM_2, _BF16_ASM_3 = (tl.constexpr(_unpack_asm("bf16", s)) for s in range(4))
_FP16_ASM_0, _FP16_ASM_1, _FP16_ASM_2, _FP16_ASM_3 = (tl.constexpr(_unpack_asm("fp16", s)) for s in range(4))
_BF16_PAIRS_0, _BF16_PAIRS_1, _BF16_PAIRS_2, _BF16_PAIRS_3 = (
    tl.constexpr(_unpack_asm("bf16", s, pairs=True)) for s in range(4)
)
_FP16_PAIRS_0, _FP16_PAIRS_1, _FP16_PAIRS_2, _FP16_PAIRS_3 = (
    tl.constexpr(_unpack_asm("fp16", s, pairs=True)) for s in range(4)
)


@triton.jit
def _biased_code_pairs(packed, s: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """`4 + code` in DT of quarter `s` for the low (even) and the high (odd) byte of each uint16 in `packed`: two
    tensors of `packed`'s shape. The products then take 16-bit operands, so Triton lays the other operand out as it
    would for bf16 x bf16 instead of for a byte operand (which re-packs the query registers every block)."""
    if ASM:
        if DT == tl.bfloat16:
            if s == 0:
                asm: tl.constexpr = _BF16_PAIRS_0
            elif s == 1:
                asm: tl.constexpr = _BF16_PAIRS_1
            elif s == 2:
                asm: tl.constexpr = _BF16_PAIRS_2
            else:
                asm: tl.constexpr = _BF16_PAIRS_3
            return tl.inline_asm_elementwise(asm, "=r,=r,r", [packed], dtype=(tl.bfloat16, tl.bfloat16),
                                             is_pure=True, pack=2)
        else:
            if s == 0:
                asm: tl.constexpr = _FP16_PAIRS_0
            elif s == 1:
                asm: tl.constexpr = _FP16_PAIRS_1
            elif s == 2:
                asm: tl.constexpr = _FP16_PAIRS_2
            else:
                asm: tl.constexpr = _FP16_PAIRS_3
            return tl.inline_asm_elementwise(asm, "=r,=r,r", [packed], dtype=(tl.float16, tl.float16),
                                             is_pure=True, pack=2)
    else:
        x = packed.to(tl.int32)
        lo = (x >> (2 * s)) & 3
        hi = (x >> (8 + 2 * s)) & 3
        if DT == tl.bfloat16:
            return ((lo << 5) | 0x4080).to(tl.int16).to(tl.bfloat16, bitcast=True), \
                ((hi << 5) | 0x4080).to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            return ((lo << 8) | 0x4400).to(tl.int16).to(tl.float16, bitcast=True), \
                ((hi << 8) | 0x4400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _biased_codes(packed, s: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """`4 + code` in DT for the codes of channel quarter `s` (bits `2s, 2s+1`) of each packed byte. With `ASM`
    (compiled GPU code) four bytes are unpacked at a time (`_unpack_asm`); otherwise, and under the CPU interpreter,
    the same bit patterns are built element by element."""
    if ASM:
        if DT == tl.bfloat16:
            if s == 0:
                asm: tl.constexpr = _BF16_ASM_0
            elif s == 1:
                asm: tl.constexpr = _BF16_ASM_1
            elif s == 2:
                asm: tl.constexpr = _BF16_ASM_2
            else:
                asm: tl.constexpr = _BF16_ASM_3
            return tl.inline_asm_elementwise(asm, "=r,=r,r", [packed], dtype=tl.bfloat16, is_pure=True, pack=4)
        else:
            if s == 0:
                asm: tl.constexpr = _FP16_ASM_0
            elif s == 1:
                asm: tl.constexpr = _FP16_ASM_1
            elif s == 2:
                asm: tl.constexpr = _FP16_ASM_2
            else:
                asm: tl.constexpr = _FP16_ASM_3
            return tl.inline_asm_elementwise(asm, "=r,=r,r", [packed], dtype=tl.float16, is_pure=True, pack=4)
    else:
        c = (packed.to(tl.int32) >> (2 * s)) & 3
        if DT == tl.bfloat16:
            return ((c << 5) | 0x4080).to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            return ((c << 8) | 0x4400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _visible(pos, n_ok, qi, row_ok, b, kv_len, q_len, mask_ptr, sm_b, sm_q, sm_t, HAS_MASK: tl.constexpr,
             CAUSAL: tl.constexpr):
    """[M, N] booleans: may query row (position `kv_len - q_len + qi`) attend to key position `pos`? `pos` and
    `n_ok` are `[1, N]` (every row reads the same keys) or `[M, N]` (rows of stacked sub-blocks read different ones)."""
    vis = row_ok[:, None] & n_ok
    if CAUSAL:
        vis = vis & (pos <= (kv_len - q_len + qi)[:, None])
    if HAS_MASK:
        allowed = tl.load(mask_ptr + b * sm_b + qi[:, None] * sm_q + pos * sm_t, mask=vis, other=0)
        vis = vis & (allowed != 0)
    return vis


@triton.jit
def _any_hidden(mask_ptr, b, sm_b, sm_q, sm_t, q_len, lo, hi, QP: tl.constexpr, SCAN: tl.constexpr):
    """Whether the mask hides any column in `[lo, hi)` from one of the `q_len` query rows. A compiled generate() passes
    a boolean mask although, unpadded, it hides nothing in the body; one contiguous scan here spares the loop a
    dependent per-score mask load wherever nothing is hidden."""
    qi = tl.arange(0, QP)
    hidden = tl.zeros([QP, SCAN], dtype=tl.int32)
    for start in range(lo, hi, SCAN):
        col = start + tl.arange(0, SCAN)
        ok = (qi < q_len)[:, None] & (col < hi)[None, :]
        allowed = tl.load(mask_ptr + b * sm_b + qi[:, None] * sm_q + col[None, :] * sm_t, mask=ok, other=1)
        hidden += (allowed == 0).to(tl.int32)
    return tl.sum(tl.sum(hidden, axis=1), axis=0) > 0


@triton.jit
def _online_softmax(scores, vis, m_i, l_i):
    """Base-2 online softmax step: returns (p, alpha, new max, new sum); masked entries get p = 0."""
    scores = tl.where(vis, scores, _MASKED)
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.where(vis, tl.math.exp2(scores - m_new[:, None]), 0.0)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _int2_block(
    start, end, q0, q1, q2, q3, o0, o1, o2, o3, qsum, m_i, l_i, a0, a1, a2, a3, a_off, qi, row_ok, rj, b,
    kc_base, vc_base, ks_base, ko_base, vs_base, vo_base,
    pos0, kv_len, q_len, sm_scale_log2, mask_ptr, sm_b, sm_q, sm_t,
    QD: tl.constexpr, BLOCK_N: tl.constexpr, J: tl.constexpr, DT: tl.constexpr, HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr, KEY_PAIRS: tl.constexpr, VALUE_PAIRS: tl.constexpr,
):
    """`J` consecutive sub-blocks of `BLOCK_N` 2-bit keys/values; the rows of copy j (`rj == j`) take sub-block j, so
    one `[M, BLOCK_N]` tile of scores (and one round of online softmax) covers `J * BLOCK_N` keys.
    `*_base` point at this
    (batch, KV head)'s rows: codes are `QD`-byte rows, scale/offset one value per token (the layer's layout, checked
    by `unsupported_reason`)."""
    n = tl.arange(0, BLOCK_N)
    if J == 1:
        key = start + n  # every row scores the same keys: per-key values stay 1-D (loaded once, not per row)
        key_ok = key < end
    else:
        key = start + rj[:, None] * BLOCK_N + n[None, :]  # [M, BLOCK_N]: the key each score belongs to
        key_ok = key < end
    ASM: tl.constexpr = not FP32_DOT
    qk = tl.zeros([q0.shape[0], BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(J):
        offs = start + j * BLOCK_N + n
        n_ok = offs < end
        # Key codes are loaded as [QD, BLOCK_N] (the dot's B operand as is, no transpose).
        if KEY_PAIRS:
            # Read as uint16 (two code bytes): the even bytes' channels meet q0..q3, the odd bytes' o0..o3.
            kc = tl.load(kc_base.to(tl.pointer_type(tl.uint16)) + offs[None, :] * (QD // 2)
                         + tl.arange(0, QD // 2)[:, None], mask=n_ok[None, :], other=0)
            even, odd = _biased_code_pairs(kc, 0, DT, ASM)
            qk_j = _mma(q0, even, FP32_DOT)
            qk_j += _mma(o0, odd, FP32_DOT)
            even, odd = _biased_code_pairs(kc, 1, DT, ASM)
            qk_j += _mma(q1, even, FP32_DOT)
            qk_j += _mma(o1, odd, FP32_DOT)
            even, odd = _biased_code_pairs(kc, 2, DT, ASM)
            qk_j += _mma(q2, even, FP32_DOT)
            qk_j += _mma(o2, odd, FP32_DOT)
            even, odd = _biased_code_pairs(kc, 3, DT, ASM)
            qk_j += _mma(q3, even, FP32_DOT)
            qk_j += _mma(o3, odd, FP32_DOT)
        else:
            kc = tl.load(kc_base + offs[None, :] * QD + tl.arange(0, QD)[:, None], mask=n_ok[None, :], other=0)
            qk_j = _mma(q0, _biased_codes(kc, 0, DT, ASM), FP32_DOT)
            qk_j += _mma(q1, _biased_codes(kc, 1, DT, ASM), FP32_DOT)
            qk_j += _mma(q2, _biased_codes(kc, 2, DT, ASM), FP32_DOT)
            qk_j += _mma(q3, _biased_codes(kc, 3, DT, ASM), FP32_DOT)
        if J == 1:
            qk = qk_j
        else:
            # Every row scores sub-block j (the query operands stay four loop-invariant tensors: masking them per
            # sub-block costs more register shuffles than this select); the rows of copy j keep the result.
            qk = tl.where((rj == j)[:, None], qk_j, qk)
    k_scale = tl.load(ks_base + key, mask=key_ok, other=0.0).to(tl.float32)
    k_off = tl.load(ko_base + key, mask=key_ok, other=0.0).to(tl.float32)
    v_scale = tl.load(vs_base + key, mask=key_ok, other=0.0).to(tl.float32)
    v_off = tl.load(vo_base + key, mask=key_ok, other=0.0).to(tl.float32)
    # q . (4 + code) * scale + (offset - 4 * scale) * sum(q) = q . (code * scale + offset)
    k_off = k_off - CODE_BASE * k_scale
    v_off = v_off - CODE_BASE * v_scale
    if J == 1:
        key, key_ok = key[None, :], key_ok[None, :]
        k_scale, k_off, v_scale, v_off = k_scale[None, :], k_off[None, :], v_scale[None, :], v_off[None, :]
    scores = (qk * k_scale + qsum[:, None] * k_off) * sm_scale_log2

    vis = _visible(pos0 + key, key_ok, qi, row_ok, b, kv_len, q_len, mask_ptr, sm_b, sm_q, sm_t, HAS_MASK, CAUSAL)
    p, alpha, m_i, l_i = _online_softmax(scores, vis, m_i, l_i)
    # Values decode as (4 + code) * scale + (offset - 4 * scale). The (p * scale) operand goes in as float16 (11-bit
    # mantissa; p * scale <= the float16 scale), with float16 codes, whatever the storage dtype.
    pv = (p * v_scale).to(tl.float16)
    if VALUE_PAIRS:
        # Value codes are stored in token pairs: one uint16 is the same byte of an even and an odd token. The
        # product splits by token parity, the probabilities by column parity (a register-local split).
        pv_even, pv_odd = tl.split(tl.reshape(pv, [pv.shape[0], BLOCK_N // 2, 2]))
        a0 = a0 * alpha[:, None]
        a1 = a1 * alpha[:, None]
        a2 = a2 * alpha[:, None]
        a3 = a3 * alpha[:, None]
        for j in tl.static_range(J):
            pair = (start + j * BLOCK_N) // 2 + tl.arange(0, BLOCK_N // 2)
            vc = tl.load(vc_base.to(tl.pointer_type(tl.uint16)) + pair[:, None] * QD + tl.arange(0, QD)[None, :],
                         mask=(2 * pair < end)[:, None], other=0)
            if J == 1:
                pe, po = pv_even, pv_odd
            else:
                pe = tl.where((rj == j)[:, None], pv_even, tl.zeros_like(pv_even))
                po = tl.where((rj == j)[:, None], pv_odd, tl.zeros_like(pv_odd))
            even, odd = _biased_code_pairs(vc, 0, tl.float16, ASM)
            a0 += _mma(pe, even, FP32_DOT)
            a0 += _mma(po, odd, FP32_DOT)
            even, odd = _biased_code_pairs(vc, 1, tl.float16, ASM)
            a1 += _mma(pe, even, FP32_DOT)
            a1 += _mma(po, odd, FP32_DOT)
            even, odd = _biased_code_pairs(vc, 2, tl.float16, ASM)
            a2 += _mma(pe, even, FP32_DOT)
            a2 += _mma(po, odd, FP32_DOT)
            even, odd = _biased_code_pairs(vc, 3, tl.float16, ASM)
            a3 += _mma(pe, even, FP32_DOT)
            a3 += _mma(po, odd, FP32_DOT)
    else:
        for j in tl.static_range(J):
            offs = start + j * BLOCK_N + n
            n_ok = offs < end
            # token-pair interleaved value codes (`quantization.write_token_pairs`), read a byte per token
            vc = tl.load(vc_base + (offs // 2)[:, None] * (2 * QD) + 2 * tl.arange(0, QD)[None, :]
                         + (offs % 2)[:, None], mask=n_ok[:, None], other=0)
            if J == 1:
                pv_j = pv
            else:
                pv_j = tl.where((rj == j)[:, None], pv, tl.zeros_like(pv))
            if j == 0:  # rescale and add in one expression: the compiler folds it into the products' accumulator
                a0 = a0 * alpha[:, None] + _mma(pv_j, _biased_codes(vc, 0, tl.float16, ASM), FP32_DOT)
                a1 = a1 * alpha[:, None] + _mma(pv_j, _biased_codes(vc, 1, tl.float16, ASM), FP32_DOT)
                a2 = a2 * alpha[:, None] + _mma(pv_j, _biased_codes(vc, 2, tl.float16, ASM), FP32_DOT)
                a3 = a3 * alpha[:, None] + _mma(pv_j, _biased_codes(vc, 3, tl.float16, ASM), FP32_DOT)
            else:
                a0 += _mma(pv_j, _biased_codes(vc, 0, tl.float16, ASM), FP32_DOT)
                a1 += _mma(pv_j, _biased_codes(vc, 1, tl.float16, ASM), FP32_DOT)
                a2 += _mma(pv_j, _biased_codes(vc, 2, tl.float16, ASM), FP32_DOT)
                a3 += _mma(pv_j, _biased_codes(vc, 3, tl.float16, ASM), FP32_DOT)
    a_off = a_off * alpha + tl.sum(p * v_off, axis=1)
    return m_i, l_i, a0, a1, a2, a3, a_off


@triton.jit
def _exact_block(
    start, end, b, kvh, q0, q1, q2, q3, m_i, l_i, a0, a1, a2, a3, a_off, qi, row_ok,
    k_ptr, v_ptr, s_b, s_h, s_t,
    pos0, kv_len, q_len, sm_scale_log2, mask_ptr, sm_b, sm_q, sm_t,
    QD: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    offs = start + tl.arange(0, BLOCK_N)
    n_ok = offs < end
    rows = b * s_b + kvh * s_h + offs.to(tl.int64)[:, None] * s_t + tl.arange(0, QD)[None, :]
    cols = b * s_b + kvh * s_h + offs.to(tl.int64)[None, :] * s_t + tl.arange(0, QD)[:, None]
    k0 = tl.load(k_ptr + cols, mask=n_ok[None, :], other=0.0)
    k1 = tl.load(k_ptr + cols + QD, mask=n_ok[None, :], other=0.0)
    k2 = tl.load(k_ptr + cols + 2 * QD, mask=n_ok[None, :], other=0.0)
    k3 = tl.load(k_ptr + cols + 3 * QD, mask=n_ok[None, :], other=0.0)
    v0 = tl.load(v_ptr + rows, mask=n_ok[:, None], other=0.0)
    v1 = tl.load(v_ptr + rows + QD, mask=n_ok[:, None], other=0.0)
    v2 = tl.load(v_ptr + rows + 2 * QD, mask=n_ok[:, None], other=0.0)
    v3 = tl.load(v_ptr + rows + 3 * QD, mask=n_ok[:, None], other=0.0)
    qk = _mma(q0, k0, FP32_DOT)
    qk += _mma(q1, k1, FP32_DOT)
    qk += _mma(q2, k2, FP32_DOT)
    qk += _mma(q3, k3, FP32_DOT)
    vis = _visible((pos0 + offs)[None, :], n_ok[None, :], qi, row_ok, b, kv_len, q_len, mask_ptr, sm_b, sm_q, sm_t,
                   HAS_MASK, CAUSAL)
    p, alpha, m_i, l_i = _online_softmax(qk * sm_scale_log2, vis, m_i, l_i)
    pv = _round(p, DT, FP32_DOT)
    a0 = a0 * alpha[:, None] + _mma(pv, v0, FP32_DOT)
    a1 = a1 * alpha[:, None] + _mma(pv, v1, FP32_DOT)
    a2 = a2 * alpha[:, None] + _mma(pv, v2, FP32_DOT)
    a3 = a3 * alpha[:, None] + _mma(pv, v3, FP32_DOT)
    return m_i, l_i, a0, a1, a2, a3, a_off * alpha


# ---------------------------------------------------------------------------------------------------------- stage 0
@triton.jit
def _rotated_columns(rows_ptr, col_stride, valid, rotation, cols, D: tl.constexpr, ROTATE: tl.constexpr):
    """Columns `cols` of the rows at `rows_ptr` (`[R]` pointers, elements `col_stride` apart) times `rotation` (`[D, D]`
    float32, row-major), in float32 (an IEEE dot: the whole row is read); without ROTATE, the columns as stored."""
    if ROTATE:
        x = tl.load(rows_ptr[:, None] + tl.arange(0, D)[None, :] * col_stride, mask=valid[:, None], other=0.0)
        return tl.dot(x.to(tl.float32), tl.load(rotation + tl.arange(0, D)[:, None] * D + cols[None, :]),
                      input_precision="ieee")
    else:
        return tl.load(rows_ptr[:, None] + cols[None, :] * col_stride, mask=valid[:, None], other=0.0)


@triton.jit
def _rotate_query_tile(q_ptr, sq_b, sq_h, sq_t, b, kvh, group, q_len, rotation, qr_ptr, tile, cols, D: tl.constexpr,
                       BLOCK_M: tl.constexpr, ROTATE: tl.constexpr, FP32_DOT: tl.constexpr):
    """Columns `cols` of KV head `kvh`'s rotated query tile (its `group * q_len` rows, zero-padded to BLOCK_M) at tile
    `tile` of `qr_ptr`, rounded to that buffer's dtype as the reference rounds them. Stage 0, and the window write of a
    compiled step (`kernels.append`), which computes it instead."""
    rows = tl.arange(0, BLOCK_M)
    q_rows = q_ptr + b * sq_b + (kvh * group + rows // q_len) * sq_h + (rows % q_len) * sq_t
    q_s = _rotated_columns(q_rows, 1, rows < group * q_len, rotation, cols, D, ROTATE).to(tl.float32)
    out = qr_ptr + tile.to(tl.int64) * BLOCK_M * D + rows[:, None] * D + cols[None, :]
    tl.store(out, _round(q_s, qr_ptr.dtype.element_ty, FP32_DOT))


@triton.jit
def _rotate_query(
    q_ptr, sq_b, sq_h, sq_t, rk_ptr, srk_g, qr_ptr, q_len, num_kv_heads, group,
    D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_RK: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """`[B * kv_heads, BLOCK_M, D]` rotated query rows (the `group * q_len` rows of one KV head, zero-padded), rounded
    to the storage dtype as the reference rounds them: once per step, not once per split. One program per (batch x KV
    head, channel quarter): the product is tiny, so spreading it over 4x the programs is what shortens the launch."""
    QD: tl.constexpr = D // 4
    pid_bh = tl.program_id(0)
    kvh = (pid_bh % num_kv_heads).to(tl.int64)
    cols = tl.program_id(1) * QD + tl.arange(0, QD)
    _rotate_query_tile(q_ptr, sq_b, sq_h, sq_t, (pid_bh // num_kv_heads).to(tl.int64), kvh, group, q_len,
                       rk_ptr + kvh * srk_g, qr_ptr, pid_bh, cols, D, BLOCK_M, HAS_RK, FP32_DOT)


# ---------------------------------------------------------------------------------------------------------- stage 1
# Lengths change every decode step: not specializing on them keeps one compiled kernel per configuration.
@triton.jit(do_not_specialize=["sink_len", "body_len", "recent_len", "body_chunk", "num_splits", "body_splits",
                               "sink_splits", "first_split"])
def _decode_stage1(
    qr_ptr,
    sink_k, sink_v, s_sink_b, s_sink_h, s_sink_t,
    rec_k, rec_v, s_rec_b, s_rec_h, s_rec_t,
    kc_ptr, vc_ptr, s_c_b, s_c_h,
    ks_ptr, ko_ptr, vs_ptr, vo_ptr, s_p_b, s_p_h,
    mask_ptr, sm_b, sm_q, sm_t,
    part_o, part_m, part_l,
    sink_len, body_len, recent_len, q_len, num_kv_heads, group, body_chunk, num_splits, body_splits, sink_splits,
    sm_scale_log2, lengths_ptr, first_split,
    counter_ptr, rv_ptr, srv_g, out_ptr, so_b, so_h, so_t,
    D: tl.constexpr, BLOCK_M: tl.constexpr, RP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    EXACT_CHUNK: tl.constexpr, DT: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
    DEVICE_LENGTHS: tl.constexpr, KEY_PAIRS: tl.constexpr = False, VALUE_PAIRS: tl.constexpr = False,
    PDL: tl.constexpr = False, MASK_SCAN: tl.constexpr = True, MERGE: tl.constexpr = False,
    HAS_RV: tl.constexpr = False, MERGE_S: tl.constexpr = 1, MERGE_E: tl.constexpr = 1,
):
    QD: tl.constexpr = D // 4
    # The BLOCK_M rows of the score tile are J = BLOCK_M / RP stacked copies of the RP (padded) query rows; in the
    # body, copy j scores sub-block j of each J * BLOCK_N keys, so few query rows (GQA decode: 4 of the 16 rows a
    # tensor-core tile needs) do not leave 3/4 of the softmax work on padding. The copies merge before the store.
    J: tl.constexpr = BLOCK_M // RP
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1) + first_split  # > 0 when the body splits are served by another kernel (hopper_decode)
    if DEVICE_LENGTHS:
        # Compiled / graph-captured decoding: the segment lengths live in device memory (the layer's `lengths`), so
        # one captured launch serves every step; the grid was sized for the buffers' capacity and idle programs
        # write neutral partials.
        sink_len = tl.load(lengths_ptr)
        body_len = tl.load(lengths_ptr + 1)
        recent_len = tl.load(lengths_ptr + 2)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    kvh = (pid_bh % num_kv_heads).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    rj = rows // RP
    rr = rows % RP
    qi = rr % q_len
    row_ok = rr < group * q_len
    kv_len = sink_len + body_len + recent_len

    q_base = qr_ptr + pid_bh.to(tl.int64) * BLOCK_M * D + rr[:, None] * D + tl.arange(0, QD)[None, :]
    q0 = tl.load(q_base)
    q1 = tl.load(q_base + QD)
    q2 = tl.load(q_base + 2 * QD)
    q3 = tl.load(q_base + 3 * QD)

    m_i = tl.full([BLOCK_M], _MASKED, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    a0 = tl.zeros([BLOCK_M, QD], dtype=tl.float32)
    a1 = tl.zeros([BLOCK_M, QD], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_M, QD], dtype=tl.float32)
    a3 = tl.zeros([BLOCK_M, QD], dtype=tl.float32)
    a_off = tl.zeros([BLOCK_M], dtype=tl.float32)

    if pid_s < body_splits:
        if KEY_PAIRS:  # the body's query operands split by channel parity within each quarter
            p_base = qr_ptr + pid_bh.to(tl.int64) * BLOCK_M * D + rr[:, None] * D + 2 * tl.arange(0, QD // 2)[None, :]
            e0 = tl.load(p_base)
            e1 = tl.load(p_base + QD)
            e2 = tl.load(p_base + 2 * QD)
            e3 = tl.load(p_base + 3 * QD)
            o0 = tl.load(p_base + 1)
            o1 = tl.load(p_base + QD + 1)
            o2 = tl.load(p_base + 2 * QD + 1)
            o3 = tl.load(p_base + 3 * QD + 1)
        else:
            e0, e1, e2, e3 = q0, q1, q2, q3
            o0, o1, o2, o3 = q0, q1, q2, q3
        qsum = (
            tl.sum(q0.to(tl.float32), axis=1)
            + tl.sum(q1.to(tl.float32), axis=1)
            + tl.sum(q2.to(tl.float32), axis=1)
            + tl.sum(q3.to(tl.float32), axis=1)
        )
        lo = pid_s * body_chunk
        hi = tl.minimum(lo + body_chunk, body_len)
        c_off = b * s_c_b + kvh * s_c_h
        p_off = b * s_p_b + kvh * s_p_h
        hidden = HAS_MASK
        if HAS_MASK and MASK_SCAN:
            hidden = _any_hidden(mask_ptr, b, sm_b, sm_q, sm_t, q_len, sink_len + lo, sink_len + hi, RP, 512)
        # Two copies of the loop, the mask read compiled into one only: a split whose columns hide nothing runs a loop
        # with no mask code at all (sm_90 SASS, Triton 3.6: 1,384 instructions per 128 keys against 1,559).
        if hidden:
            for start in range(lo, hi, J * BLOCK_N):
                m_i, l_i, a0, a1, a2, a3, a_off = _int2_block(
                    start, hi, e0, e1, e2, e3, o0, o1, o2, o3, qsum, m_i, l_i, a0, a1, a2, a3, a_off, qi, row_ok, rj,
                    b, kc_ptr + c_off, vc_ptr + c_off, ks_ptr + p_off, ko_ptr + p_off, vs_ptr + p_off, vo_ptr + p_off,
                    sink_len, kv_len, q_len, sm_scale_log2, mask_ptr, sm_b, sm_q, sm_t,
                    QD, BLOCK_N, J, DT, HAS_MASK, CAUSAL, FP32_DOT, KEY_PAIRS, VALUE_PAIRS,
                )
        else:
            for start in range(lo, hi, J * BLOCK_N):
                m_i, l_i, a0, a1, a2, a3, a_off = _int2_block(
                    start, hi, e0, e1, e2, e3, o0, o1, o2, o3, qsum, m_i, l_i, a0, a1, a2, a3, a_off, qi, row_ok, rj,
                    b, kc_ptr + c_off, vc_ptr + c_off, ks_ptr + p_off, ko_ptr + p_off, vs_ptr + p_off, vo_ptr + p_off,
                    sink_len, kv_len, q_len, sm_scale_log2, mask_ptr, sm_b, sm_q, sm_t,
                    QD, BLOCK_N, J, DT, False, CAUSAL, FP32_DOT, KEY_PAIRS, VALUE_PAIRS,
                )
    elif pid_s < body_splits + sink_splits:
        row_ok = row_ok & (rj == 0)  # the exact segments are not stacked: copy 0 of the rows does all the work
        # The exact segments are split too (EXACT_CHUNK tokens a program): one program walking all of them serially
        # would finish long after the body splits. They are a few hundred tokens, not worth pipeline buffers.
        lo = (pid_s - body_splits) * EXACT_CHUNK
        hi = tl.minimum(lo + EXACT_CHUNK, sink_len)
        for start in tl.range(lo, hi, BLOCK_E, num_stages=1):
            m_i, l_i, a0, a1, a2, a3, a_off = _exact_block(
                start, hi, b, kvh, q0, q1, q2, q3, m_i, l_i, a0, a1, a2, a3, a_off, qi, row_ok,
                sink_k, sink_v, s_sink_b, s_sink_h, s_sink_t,
                0, kv_len, q_len, sm_scale_log2, mask_ptr, sm_b, sm_q, sm_t,
                QD, BLOCK_E, DT, HAS_MASK, CAUSAL, FP32_DOT,
            )
    else:
        row_ok = row_ok & (rj == 0)
        lo = (pid_s - body_splits - sink_splits) * EXACT_CHUNK
        hi = tl.minimum(lo + EXACT_CHUNK, recent_len)
        for start in tl.range(lo, hi, BLOCK_E, num_stages=1):
            m_i, l_i, a0, a1, a2, a3, a_off = _exact_block(
                start, hi, b, kvh, q0, q1, q2, q3, m_i, l_i, a0, a1, a2, a3, a_off, qi, row_ok,
                rec_k, rec_v, s_rec_b, s_rec_h, s_rec_t,
                sink_len + body_len, kv_len, q_len, sm_scale_log2, mask_ptr, sm_b, sm_q, sm_t,
                QD, BLOCK_E, DT, HAS_MASK, CAUSAL, FP32_DOT,
            )

    if J > 1:
        # Merge the J copies of each query row (online-softmax merge; a copy that saw no key has l = 0 and weight 0).
        m_j = tl.reshape(m_i, [J, RP])
        m_i = tl.max(m_j, axis=0)
        w = tl.math.exp2(m_j - m_i[None, :])
        l_i = tl.sum(w * tl.reshape(l_i, [J, RP]), axis=0)
        a_off = tl.sum(w * tl.reshape(a_off, [J, RP]), axis=0)
        w = w[:, :, None]
        a0 = tl.sum(w * tl.reshape(a0, [J, RP, QD]), axis=0)
        a1 = tl.sum(w * tl.reshape(a1, [J, RP, QD]), axis=0)
        a2 = tl.sum(w * tl.reshape(a2, [J, RP, QD]), axis=0)
        a3 = tl.sum(w * tl.reshape(a3, [J, RP, QD]), axis=0)
    if PDL:  # stage 2 (launched as a programmatic dependent) may start once every program got here
        gdc_launch_dependents()
    out_rows = tl.arange(0, RP)
    out_ok = out_rows < group * q_len
    part = (pid_bh * num_splits + pid_s).to(tl.int64)
    o_rows = part_o + part * BLOCK_M * D + out_rows[:, None] * D + tl.arange(0, QD)[None, :]
    tl.store(o_rows, a0 + a_off[:, None], mask=out_ok[:, None])
    tl.store(o_rows + QD, a1 + a_off[:, None], mask=out_ok[:, None])
    tl.store(o_rows + 2 * QD, a2 + a_off[:, None], mask=out_ok[:, None])
    tl.store(o_rows + 3 * QD, a3 + a_off[:, None], mask=out_ok[:, None])
    tl.store(part_m + part * BLOCK_M + out_rows, m_i, mask=out_ok)
    tl.store(part_l + part * BLOCK_M + out_rows, l_i, mask=out_ok)
    if MERGE:
        # Stage 2 in this launch: the last program of the (batch, KV head) row to finish merges every split. Every
        # thread's stores above come before the count (barrier, then a release); the last one's acquire and its L2
        # reads (`.cg`) see them. Splits served by the Gluon body were written by a launch that has finished.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + pid_bh, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(1) - 1:
            tl.atomic_xchg(counter_ptr + pid_bh, 0, sem="relaxed", scope="gpu")  # zero again for the next launch
            o = _merge_splits(part_o, part_m, part_l, pid_bh.to(tl.int64) * num_splits, num_splits, out_rows, out_ok,
                              tl.arange(0, D), BLOCK_M, D, MERGE_S, True)
            for e0 in range(0, D, MERGE_E):
                _store_rows(o, rv_ptr, srv_g, kvh, e0, out_ptr, so_b, so_h, so_t, b, out_rows, out_ok, q_len, group,
                            D, MERGE_E, HAS_RV, FP32_DOT)


# ---------------------------------------------------------------------------------------------------------- stage 2
@triton.jit
def _merge_splits(part_o, part_m, part_l, first, num_splits, rows, row_ok, cols, BLOCK_M: tl.constexpr,
                  D: tl.constexpr, BLOCK_S: tl.constexpr, VOLATILE: tl.constexpr):
    """The normalised output `[R, C]` of query rows `rows` (`[R]`), channels `cols` (`[C]`): their partials over
    splits `first .. first + num_splits - 1` merged in one pass, `BLOCK_S` splits at a time with online rescaling.
    `VOLATILE`: read through L2 (`.cg`), for partials other programs of the running launch wrote."""
    splits = tl.arange(0, BLOCK_S)
    cm: tl.constexpr = ".cg" if VOLATILE else ""
    m_run = tl.full([rows.shape[0]], _MASKED, dtype=tl.float32)
    l_run = tl.zeros([rows.shape[0]], dtype=tl.float32)
    acc = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        ok = (s0 + splits < num_splits)[:, None] & row_ok[None, :]  # [S, R]
        part = (first + s0 + splits)[:, None] * BLOCK_M + rows[None, :]
        m_s = tl.load(part_m + part, mask=ok, other=_MASKED, cache_modifier=cm)
        l_s = tl.load(part_l + part, mask=ok, other=0.0, cache_modifier=cm)
        o_s = tl.load(part_o + part[:, :, None] * D + cols[None, None, :], mask=ok[:, :, None], other=0.0,
                      cache_modifier=cm)
        m_new = tl.maximum(m_run, tl.max(m_s, axis=0))
        alpha = tl.math.exp2(m_run - m_new)
        w = tl.where(ok, tl.math.exp2(m_s - m_new[None, :]), 0.0)
        l_run = l_run * alpha + tl.sum(w * l_s, axis=0)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o_s, axis=0)
        m_run = m_new
    return acc / tl.where(row_ok, l_run, 1.0)[:, None]


@triton.jit
def _store_rows(o, rv_ptr, srv_g, kvh, e0, out_ptr, so_b, so_h, so_t, b, rows, row_ok, q_len, group,
                D: tl.constexpr, BLOCK_E: tl.constexpr, HAS_RV: tl.constexpr, FP32_DOT: tl.constexpr):
    """Writes channels `e0 .. e0 + BLOCK_E - 1` of the rows' outputs to `[B, q_len, Hq, D]` memory: `o` `[R, D]`
    un-rotated by R_V^T (`out[e] = sum_d o[d] R_V[e, d]`), or `o` `[R, BLOCK_E]` as it is without a rotation."""
    e = e0 + tl.arange(0, BLOCK_E)
    out_rows = out_ptr + b * so_b + (kvh * group + rows // q_len) * so_h + (rows % q_len) * so_t
    if HAS_RV:
        r = tl.load(rv_ptr + kvh * srv_g + e[:, None] * D + tl.arange(0, D)[None, :])  # [E, D]
        o = tl.sum(o[:, None, :] * r[None, :, :], axis=2)
    tl.store(out_rows[:, None] + e[None, :], _round(o, out_ptr.dtype.element_ty, FP32_DOT), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _decode_stage2(
    part_o, part_m, part_l,
    rv_ptr, srv_g,
    out_ptr, so_b, so_h, so_t,
    num_splits, q_len, num_kv_heads, group,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, HAS_RV: tl.constexpr,
    FP32_DOT: tl.constexpr, PDL: tl.constexpr = False,
):
    """One program per (output row `(b, kv head, query row)`, block of `BLOCK_E` output channels): merges the row's
    partials over all splits in one pass (`BLOCK_S` splits at a time, online rescaling; with `BLOCK_S` >= the split
    count it is a single round of independent loads), normalises, and un-rotates its channels by R_V^T. The programs
    of one row repeat the merge (a few KB from L2) rather than wait for each other."""
    pid_bh = tl.program_id(0)
    rows = tl.program_id(1) + tl.arange(0, 1)
    e0 = tl.program_id(2) * BLOCK_E
    b = (pid_bh // num_kv_heads).to(tl.int64)
    kvh = (pid_bh % num_kv_heads).to(tl.int64)
    if HAS_RV:
        cols = tl.arange(0, D)
    else:
        cols = e0 + tl.arange(0, BLOCK_E)
    if PDL:
        gdc_wait()
    o = _merge_splits(part_o, part_m, part_l, pid_bh.to(tl.int64) * num_splits, num_splits, rows, rows >= 0, cols,
                      BLOCK_M, D, BLOCK_S, False)
    _store_rows(o, rv_ptr, srv_g, kvh, e0, out_ptr, so_b, so_h, so_t, b, rows, rows >= 0, q_len, group,
                D, BLOCK_E, HAS_RV, FP32_DOT)


# ---------------------------------------------------------------------------------------------------------- launcher
def _hopper_config(wanted: bool | None, query, segments, rows: int, attention_mask, stages: int | None = None):
    """The Gluon body kernel's configuration (`kernels/hopper_decode.py`) when this call uses it, else None.
    `wanted` True raises where it cannot serve; None follows `OSCAR_HF_HOPPER_KERNEL` (`1`: wherever it can serve,
    `0`: never) and, unset, takes it where it was measured faster (`hopper_decode.measured_faster`); both fall back
    to this module's kernel silently."""
    if wanted is False or not (wanted or query.is_cuda):
        return None
    try:
        from oscar_hf.kernels import hopper_decode
    except ImportError as e:  # a Triton without Gluon
        if wanted:
            raise ValueError(f"hopper_body needs Triton's Gluon (triton.experimental.gluon): {e}") from e
        return None
    if wanted is None:
        chosen = hopper_decode.env_choice()
        if chosen is None:
            codes = segments[4]
            chosen = hopper_decode.measured_faster(codes.shape[0] * codes.shape[1], codes.shape[2], rows)
        if not chosen:
            return None
    reason = hopper_decode.supported(query, segments, attention_mask)
    if reason is not None:
        if wanted:
            raise ValueError(f"The Gluon body kernel cannot serve this call: {reason}.")
        return None
    return hopper_decode.config_for(rows, query.shape[-1], stages=stages or 3)


def stage1_max_registers(options: DecodeOptions, has_mask: bool, on_gpu: bool) -> int | None:
    """Stage 1's register cap: `options.max_registers`, else 168 where a mask is scanned on a GPU. The scan compiles
    two loops (with and without mask reads), which takes stage 1 from 168 registers to 255 (sm_90, Triton 3.6):
    2 programs of 4 warps an SM instead of the 3 the grid is sized for. Capped at 168 the masked kernel compiles
    without spilling, and its maskless loop is as long as the maskless kernel's (1,482 against 1,478 instructions
    per 128 keys, `benchmarks/sass_loop.py`)."""
    if options.max_registers is not None or not (has_mask and options.mask_scan and on_gpu):
        return options.max_registers
    return _MASKED_STAGE1_REGISTERS


def query_tile_rows(rows: int) -> int:
    """Rows of the query tile of one KV head (`group * q_len` query rows, zero-padded): stage 0's output layout is
    `[batch * kv_heads, query_tile_rows(rows), head_dim]`."""
    return max(16, triton.next_power_of_2(rows))


def rotate_query(query: torch.Tensor, k_rotation: torch.Tensor | None, num_kv_heads: int) -> torch.Tensor:
    """Stage 0 alone: `query` `[B, Hq, q_len, D]` rotated by R_K into the tile layout `decode_attention(...,
    rotated_query=)` takes (`[B * num_kv_heads, query_tile_rows(group * q_len), D]`, flat), rounded to its dtype."""
    bsz, num_heads, q_len, head_dim = query.shape
    group = num_heads // num_kv_heads
    block_m = query_tile_rows(group * q_len)
    rk, srk = _rotation_arg(k_rotation, num_kv_heads, head_dim, query.device)
    q_rot = torch.empty(bsz * num_kv_heads * block_m * head_dim, dtype=query.dtype, device=query.device)
    _rotate_query[(bsz * num_kv_heads, 4)](
        query, query.stride(0), query.stride(1), query.stride(2), rk, srk, q_rot, q_len, num_kv_heads, group,
        D=head_dim, BLOCK_M=block_m, HAS_RK=k_rotation is not None, FP32_DOT=_interpreting(), num_warps=4,
    )
    return q_rot


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (each stage's launch overlapping the previous stage) needs sm_90 or newer."""
    return (gdc_wait is not None and not _interpreting() and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


_MERGE_COUNTERS: dict[tuple[str, int | None], torch.Tensor] = {}


def _merge_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """The zeroed int32 arrival counts of `merge_in_stage1` for `n` (batch x KV head) rows; each launch leaves them
    zero again. None where a larger buffer would have to be allocated during CUDA-graph capture."""
    index = device.index if device.type != "cuda" or device.index is not None else torch.cuda.current_device()
    key = (device.type, index)
    counters = _MERGE_COUNTERS.get(key)
    if counters is None or counters.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _MERGE_COUNTERS[key] = counters
    return counters


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _rotation_arg(rotation: torch.Tensor | None, num_kv_heads: int, head_dim: int, device) -> tuple[torch.Tensor, int]:
    """`(tensor, per-KV-head stride)` for a `[groups, D, D]` rotation (stride 0 when one rotation is shared)."""
    if rotation is None:
        return torch.empty(1, dtype=torch.float32, device=device), 0
    r = rotation.to(device=device, dtype=torch.float32).reshape(-1, head_dim, head_dim).contiguous()
    if r.shape[0] not in (1, num_kv_heads):
        raise ValueError(f"A rotation of {r.shape[0]} groups does not fit {num_kv_heads} KV heads.")
    return r, (head_dim * head_dim if r.shape[0] > 1 else 0)


@dataclass(frozen=True)
class DecodeOptions:
    """How `decode_attention` launches (benchmarks/bench_kernels.py sweeps these); `None` picks the measured default.

    `block_n` keys per body iteration, `programs_per_sm` and `min_blocks_per_split` the split-K grid, `exact_chunk`
    tokens of the exact windows per program, `stack` copies of the query rows in the score tile (default: as many as
    fit), `key_pairs` / `value_pairs` codes read two bytes at a time (see the module docstring; default: wherever the
    shapes allow), `max_registers` caps stage 1's registers per thread (ptx `.maxnreg`) so that more programs fit on
    an SM (default: none; 168 with a scanned mask, `stage1_max_registers`), `dependent_launch` launches stage 2 as a
    programmatic dependent of stage 1 (sm_90+; off by default until timed, see benchmarks/RESULTS.md).
    `hopper_body` serves the 2-bit body splits with the Gluon kernel of `kernels/hopper_decode.py` (sm_90, Triton
    3.6): True asks for it (an error where it cannot serve), False never, None (the default) where it was measured
    faster (`hopper_decode.measured_faster`) unless the environment variable `OSCAR_HF_HOPPER_KERNEL` says otherwise
    (`1` wherever it can serve, `0` never). `block_n` and `stack` then apply to the exact segments only.
    `mask_scan`: with a boolean mask, each body split first scans its columns and reads the mask in its loop only
    where they hide something (False: always read it, as before).
    `body_stages` and `body_max_registers` launch the Gluon body with that many pipeline buffers (default 3) and a
    register cap (ptx `.maxnreg`; default none, 255 registers): a one-warp program needs 27 KiB of shared memory with
    3 stages, 18 KiB with 2, so 8 or 12 fit on an SM, and 255 registers let 8 warps run on an SM, 168 12, 128 16.
    `merge_in_stage1`: the last stage-1 program of each (batch, KV head) row merges the splits, so stage 2 is not
    launched; one launch less per call, at the price of one program's merge at the end. The arrivals are counted in
    the static layer's `lengths` after its four slots, else in a zeroed buffer this module keeps per device (which is
    not allocated while a CUDA graph is being captured: stage 2 then runs; nor shared by calls running at once on two
    streams of one device).
    """

    block_n: int | None = None
    programs_per_sm: int | None = None
    min_blocks_per_split: int = 4
    exact_chunk: int = 64
    num_warps: int = 4
    num_stages: int = 2
    stack: int | None = None
    key_pairs: bool | None = None
    value_pairs: bool | None = None
    max_registers: int | None = None
    dependent_launch: bool = False
    hopper_body: bool | None = None
    mask_scan: bool = True
    body_stages: int | None = None
    body_max_registers: int | None = None
    merge_in_stage1: bool = False

    def to_ints(self) -> list[int]:
        """The options as a list of ints (-1 for None), the form a `torch.library` op signature can carry."""
        return [-1 if getattr(self, f.name) is None else int(getattr(self, f.name)) for f in fields(self)]

    @classmethod
    def from_ints(cls, values) -> DecodeOptions:
        kw = {}
        for f, v in zip(fields(cls), values):
            v = None if v == -1 else int(v)
            if v is not None and str(f.type).startswith("bool"):  # (the annotations are strings: `bool | None`)
                v = bool(v)
            kw[f.name] = v
        return cls(**kw)


def unsupported_reason(query: torch.Tensor, layer, attention_mask: torch.Tensor | None, num_new: int,
                       device_lengths: bool = False) -> str | None:
    """Why the kernel cannot serve this call over `layer`'s buffers (None when it can). Reads shapes, dtypes and
    devices only; with `device_lengths` (a static layer appended through `oscar_hf.ops.append`: its new tokens are
    never demoted in the forward that brings them, and its mask spans `max_cache_len` columns) nothing on the host
    depends on the segment lengths."""
    if not (query.is_cuda or _interpreting()):
        return "query is not on a CUDA device"
    if not getattr(layer, "is_initialized", False):
        return "layer is empty"
    bsz, num_heads, q_len, head_dim = query.shape
    if query.dtype not in (torch.bfloat16, torch.float16) or layer.dtype != query.dtype:
        return f"dtypes query {query.dtype} / cache {layer.dtype} (needs bf16 or fp16, equal)"
    if query.device != layer.device:
        return "query and cache on different devices"
    if not 1 <= q_len <= MAX_QUERY_LEN:
        return f"q_len {q_len} outside 1..{MAX_QUERY_LEN}"
    if head_dim != layer.head_dim or head_dim < 64 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} (needs a power of two >= 64 equal to the cache's)"
    if bsz != layer.batch_size or num_heads % layer.num_heads:
        return "batch or head count does not match the cache"
    group = num_heads // layer.num_heads
    if group * q_len > MAX_BLOCK_M:
        return f"{group} query heads per KV head x {q_len} queries exceed {MAX_BLOCK_M} rows"
    if query.stride(-1) != 1:
        return "query is not contiguous in head_dim"
    # The kernel reads the new tokens from the cache's exact windows: they must not have been demoted already.
    if not device_lengths and layer.body_len > 0 and layer.recent_len < num_new:
        return "new tokens were demoted to the 2-bit body in this forward"
    for a, b_ in (("sink_keys", "sink_values"), ("recent_keys", "recent_values")):
        ta, tb = getattr(layer, a), getattr(layer, b_)
        if ta.stride() != tb.stride() or ta.stride(-1) != 1:
            return f"{a}/{b_} layouts differ or are not contiguous in head_dim"
    body = layer._body_tensors()
    if body[0].stride() != body[3].stride() or body[0].stride()[2:] != (head_dim // CODES_PER_BYTE, 1):
        return "body code layouts differ or token rows are not contiguous"
    params = body[1:3] + body[4:6]
    if any(t.stride() != params[0].stride() or t.stride(-1) != 1 for t in params):
        return "body scale/offset layouts differ"
    if attention_mask is not None:
        m = attention_mask
        if m.dtype != torch.bool:
            return f"attention mask of dtype {m.dtype} (only boolean masks are read by the kernel)"
        if m.dim() != 4 or m.shape[1] != 1 or m.shape[2] != q_len or m.shape[0] not in (1, bsz):
            return f"attention mask of shape {tuple(m.shape)} (needs [batch or 1, 1, q_len, kv_len])"
        if m.shape[-1] < (layer.max_cache_len if device_lengths else layer.get_seq_length()):
            return "attention mask shorter than the cache"
        if m.device != query.device:
            return "attention mask on another device"
    return None


def oscar_decode_attention(
    query: torch.Tensor,
    layer,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    num_new: int | None = None,
    *,
    device_lengths: bool = False,
    rotated_query: torch.Tensor | None = None,
    _checked: bool = False,
    **launch,
) -> torch.Tensor:
    """`decode_attention` over the buffers of an `OscarQuantizedLayer` (a convenience for tests and benchmarks).

    With `device_lengths` the kernel reads the lengths from `layer.lengths` and sizes its grid from the buffers'
    capacity (what a compiled, graph-captured step does); otherwise the lengths are read on the host. The keyword
    arguments `launch` are the fields of `DecodeOptions`; `rotated_query` is stage 0's output computed elsewhere
    (`rotate_query`, or a step's window write, which is where a compiled decode step computes it).
    """
    num_new = query.shape[2] if num_new is None else num_new
    reason = None if _checked else unsupported_reason(query, layer, attention_mask, num_new, device_lengths)
    if reason is not None:
        raise ValueError(f"The Triton decode kernel does not support this call: {reason}. Use the reference path.")
    lengths = layer.lengths if device_lengths else tuple(layer.lengths[:3].tolist())
    return decode_attention(
        query, layer.segment_tensors(), lengths, layer.k_rotation, layer.v_rotation, attention_mask, scaling,
        DecodeOptions(**launch), rotated_query=rotated_query,
    )


def decode_attention(
    query: torch.Tensor,
    segments,
    lengths,
    k_rotation: torch.Tensor | None,
    v_rotation: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    options: DecodeOptions = DecodeOptions(),
    rotated_query: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of `query` `[B, Hq, q_len, D]` (not rotated) over a mixed-precision cache; the last `q_len` tokens
    held are the query's own positions. Returns `[B, Hq, q_len, D]` un-rotated, in the query dtype (a view of
    `[B, q_len, Hq, D]` memory).

    `segments`: the ten buffers `(sink_keys, sink_values, recent_keys, recent_values, body_key_codes, body_key_scale,
    body_key_offset, body_value_codes, body_value_scale, body_value_offset)` (`OscarQuantizedLayer.segment_tensors`).
    `lengths`: `(sink_len, body_len, recent_len)` as host ints, or an int32 tensor on the query's device whose first
    three entries the kernel reads at run time; the grid is then sized for the buffers' capacity, so one launch (one
    captured graph) serves every step.
    `attention_mask`: None (causal among the new tokens) or a boolean `[B or 1, 1, q_len, >= kv_len]` mask whose column
    p is cache position p (sink, then body, then recent, in token order), True = attend.
    `rotated_query`: stage 0's output computed elsewhere (`kernels.append.append_window` with `query`); stage 0 is
    then not launched.
    """
    (sink_k, sink_v, rec_k, rec_v, kc, ks, ko, vc, vs, vo) = segments
    o = options
    bsz, num_heads, q_len, head_dim = query.shape
    kvh = sink_k.shape[1]
    group = num_heads // kvh
    dev = query.device
    device_lengths = isinstance(lengths, torch.Tensor)
    if device_lengths:
        if lengths.device != dev or lengths.dtype != torch.int32:
            raise ValueError(f"Device lengths must be int32 on {dev}; got {lengths.dtype} on {lengths.device}.")
        # Sized for the buffers' capacity: the grid must not change between steps.
        sink_len, body_len, recent_len = sink_k.shape[2], kc.shape[2], rec_k.shape[2]
    else:
        sink_len, body_len, recent_len = (int(x) for x in lengths)
    rows_pow2 = triton.next_power_of_2(group * q_len)
    block_m = query_tile_rows(group * q_len)

    n_bh = bsz * kvh
    # `block_n` keys per iteration are `stack` sub-blocks of at least 16 keys, one per stacked copy of the query rows
    # (see `_decode_stage1`). Measured on H100 (benchmarks/RESULTS.md, 2026-11-23): 128-token iterations of 4 x 32
    # stacked keys issue the fewest instructions per key (unstacked, 64-token blocks were best for many rows). On H200
    # with two-byte code reads (2026-12-01): few (batch x KV head) rows want ~3 programs per SM; many rows want many
    # short splits (16 per SM: the programs finish unevenly, and 4 fit on an SM at once); 2 pipeline stages.
    block_n = o.block_n
    if block_n is None:
        block_n = 128 if n_bh < 32 or rows_pow2 <= 4 else 64
    stack = o.stack
    if stack is None:
        stack = min(4, block_m // rows_pow2, max(1, block_n // 16))
    if block_m % stack or (block_m // stack) < rows_pow2 or block_n % stack or block_n // stack < 16:
        raise ValueError(f"stack={stack} does not fit {group * q_len} query rows and block_n={block_n}.")
    # Codes read two bytes at a time where the products allow it (each parity's half is a product's K, >= 16).
    key_pairs, value_pairs = o.key_pairs, o.value_pairs
    if key_pairs is None:
        key_pairs = head_dim >= 128
    elif key_pairs and head_dim < 128:
        raise ValueError(f"key_pairs needs head_dim >= 128 (got {head_dim}).")
    if value_pairs is None:
        value_pairs = block_n // stack >= 32
    elif value_pairs and block_n // stack < 32:
        raise ValueError(f"value_pairs needs sub-blocks of >= 32 tokens (block_n={block_n}, stack={stack}).")
    exact_chunk = o.exact_chunk
    hopper = _hopper_config(o.hopper_body, query, segments, group * q_len, attention_mask, o.body_stages)
    body_block = block_n if hopper is None else hopper.block
    body_blocks = triton.cdiv(body_len, body_block)
    if body_blocks:
        programs_per_sm = o.programs_per_sm
        if programs_per_sm is None:
            if hopper is not None:
                from oscar_hf.kernels.hopper_decode import programs_per_sm as gluon_programs_per_sm

                programs_per_sm = gluon_programs_per_sm(n_bh)
            else:
                programs_per_sm = 3 if n_bh < 32 else 16
        want = triton.cdiv(programs_per_sm * _sm_count(dev), n_bh)
        splits = max(1, min(want, body_blocks // max(1, o.min_blocks_per_split)))
        chunk = triton.cdiv(body_blocks, splits) * body_block
        splits = triton.cdiv(body_len, chunk)
    else:
        splits, chunk = 0, body_block
    sink_splits = triton.cdiv(sink_len, exact_chunk)
    recent_splits = max(1, triton.cdiv(recent_len, exact_chunk))  # at least one program, even with nothing to do
    num_splits = splits + sink_splits + recent_splits

    rv, srv = _rotation_arg(v_rotation, kvh, head_dim, dev)
    if attention_mask is not None:
        # Column p is cache position p: the kernel reads columns from 0, so a static cache's mask (max_cache_len
        # columns) and a dynamic one's (kv_len columns) are read alike.
        mask = attention_mask
        mask_u8 = mask.view(torch.uint8) if mask.element_size() == 1 else mask.to(torch.uint8)
        sm_b = mask_u8.stride(0) if mask_u8.shape[0] > 1 else 0
        sm_q, sm_t = mask_u8.stride(2), mask_u8.stride(3)
        has_mask, causal = True, False
    else:
        mask_u8 = torch.empty(1, dtype=torch.uint8, device=dev)
        sm_b = sm_q = sm_t = 0
        has_mask, causal = False, q_len > 1

    part_o = torch.empty(n_bh * num_splits * block_m * head_dim, dtype=torch.float32, device=dev)
    part_m = torch.empty(n_bh * num_splits * block_m, dtype=torch.float32, device=dev)
    part_l = torch.empty_like(part_m)
    # [B, q_len, Hq, D] memory: the attention interface transposes to exactly this, so its `.contiguous()` is free.
    out = torch.empty(bsz, q_len, num_heads, head_dim, dtype=query.dtype, device=dev).transpose(1, 2)

    scale = scaling if scaling is not None else head_dim**-0.5
    dt = tl.bfloat16 if query.dtype == torch.bfloat16 else tl.float16
    pdl = bool(o.dependent_launch)
    if pdl and not _pdl_supported(dev):
        raise ValueError("dependent_launch needs an sm_90 or newer GPU (and not the Triton interpreter).")
    if rotated_query is not None:
        if rotated_query.numel() != n_bh * block_m * head_dim or rotated_query.dtype != query.dtype:
            raise ValueError(f"rotated_query must hold {n_bh} x {block_m} x {head_dim} {query.dtype} values (stage "
                             f"0's layout), got {rotated_query.numel()} {rotated_query.dtype}.")
        q_rot = rotated_query
    else:
        q_rot = rotate_query(query, k_rotation, kvh)
    # Stage 1 is launched normally: launched as a dependent of stage 0 it was 18% slower at 128K batch 1 (H200,
    # 2026-12-01; its programs are likely placed unevenly on the SMs). With `dependent_launch`, stage 2's launch
    # overlaps stage 1's last stores.
    sm_scale_log2 = float(scale * _LOG2E)
    first_split = 0
    if hopper is not None and splits > 0:
        from oscar_hf.kernels import hopper_decode

        hopper_decode.launch_body(
            q_rot, segments, part_o, part_m, part_l, sink_len=sink_len, body_len=body_len, q_len=q_len,
            num_kv_heads=kvh, group=group, body_chunk=chunk, body_splits=splits, num_splits=num_splits,
            block_m_out=block_m, sm_scale_log2=sm_scale_log2, mask_u8=mask_u8, sm_b=sm_b, sm_q=sm_q, sm_t=sm_t,
            has_mask=has_mask, lengths=lengths if device_lengths else None, cfg=hopper, dtype=query.dtype,
            n_bh=n_bh, mask_scan=o.mask_scan, max_registers=o.body_max_registers,
        )
        first_split = splits  # the Triton stage 1 below serves the sink and recent-window splits only
    max_registers = stage1_max_registers(o, has_mask, query.is_cuda and not _interpreting())
    counters = None
    if o.merge_in_stage1:
        # A static layer's lengths carry its own counts after the four length slots (`oscar_hf.layer`).
        own = device_lengths and lengths.numel() >= LENGTH_SLOTS + n_bh
        counters = lengths[LENGTH_SLOTS:] if own else _merge_counters(dev, n_bh)
    merge = counters is not None
    rp = block_m // stack  # the padded query rows of one stacked copy: the rows a partial holds
    tile = max(1, 4096 // (rp * head_dim))  # ~32 float32 registers a thread for the merge's [S, R, D] tiles
    _decode_stage1[(n_bh, num_splits - first_split)](
        q_rot,
        sink_k, sink_v, *sink_k.stride()[:3],
        rec_k, rec_v, *rec_k.stride()[:3],
        kc, vc, *kc.stride()[:2],
        ks, ko, vs, vo, *ks.stride()[:2],
        mask_u8, sm_b, sm_q, sm_t,
        part_o, part_m, part_l,
        sink_len, body_len, recent_len, q_len, kvh, group, chunk, num_splits, splits, sink_splits,
        sm_scale_log2, lengths if device_lengths else mask_u8, first_split,
        counters if merge else mask_u8, rv, srv, out, out.stride(0), out.stride(1), out.stride(2),
        D=head_dim, BLOCK_M=block_m, RP=rp, BLOCK_N=block_n // stack,
        BLOCK_E=min(block_n, 32, exact_chunk),
        EXACT_CHUNK=exact_chunk,
        DT=dt,
        HAS_MASK=has_mask, CAUSAL=causal, FP32_DOT=_interpreting(), DEVICE_LENGTHS=device_lengths,
        KEY_PAIRS=key_pairs, VALUE_PAIRS=value_pairs, PDL=pdl and not merge, MASK_SCAN=o.mask_scan,
        MERGE=merge, HAS_RV=v_rotation is not None, MERGE_S=_pow2_at_most(tile),
        MERGE_E=_pow2_at_most(tile) if v_rotation is not None else head_dim,
        num_warps=o.num_warps, num_stages=o.num_stages,
        **({} if max_registers is None else {"maxnreg": max_registers}),
    )
    if merge:
        return out
    block_e = 32
    _decode_stage2[(n_bh, group * q_len, head_dim // block_e)](
        part_o, part_m, part_l,
        rv, srv,
        out, out.stride(0), out.stride(1), out.stride(2),
        num_splits, q_len, kvh, group,
        D=head_dim, BLOCK_M=block_m, BLOCK_S=min(64, max(16, triton.next_power_of_2(num_splits))), BLOCK_E=block_e,
        HAS_RV=v_rotation is not None,
        FP32_DOT=_interpreting(), PDL=pdl, num_warps=4,
        **({"launch_pdl": True} if pdl else {}),  # (a launch option Triton < 3.4 does not know)
    )
    return out
