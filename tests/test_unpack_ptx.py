"""The PTX that unpacks 2-bit codes inside the decode kernel, checked without a GPU.

The Triton interpreter runs the kernels' element-by-element fallback, never the inline PTX, so the PTX routines
(`_unpack_asm`, bytes and byte pairs) are executed here by a small emulator of the five instructions they use, on
random words, against the bit patterns the fallback builds (`4 + code` in bf16 and fp16).
"""

import random

import pytest

pytest.importorskip("triton", reason="Triton is not importable: the kernel module cannot be loaded")

from oscar_hf.kernels.decode_attention import _unpack_asm  # noqa: E402

_MASK = 0xFFFFFFFF


def _prmt(a, b, selector):
    """`prmt.b32` default mode: result byte k is byte `selector[4k:4k+3]` of {b, a} (0-3 from a, 4-7 from b)."""
    source = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for k in range(4):
        nibble = (selector >> (4 * k)) & 0xF
        assert nibble < 8, "sign-replicating selectors are not emulated"
        out |= source[nibble] << (8 * k)
    return out


def run_ptx(asm: str, word: int) -> tuple[int, int]:
    """Execute an unpack routine on input register `$2`; returns the output registers `$0`, `$1`."""
    regs = {"$2": word}
    body = asm.strip()
    assert body.startswith("{") and body.endswith("}")
    for statement in body[1:-1].split(";"):
        statement = statement.strip()
        if not statement or statement.startswith(".reg"):
            continue
        op, operands = statement.split(None, 1)
        args = [x.strip() for x in operands.split(",")]

        def value(x):
            return int(x, 16) if x.startswith("0x") else int(x) if x.isdigit() else regs[x]

        if op == "mov.b32":
            regs[args[0]] = value(args[1]) & _MASK
        elif op == "shl.b32":
            regs[args[0]] = (value(args[1]) << value(args[2])) & _MASK
        elif op == "shr.b32":
            regs[args[0]] = value(args[1]) >> value(args[2])
        elif op == "lop3.b32":
            assert args[4] == "0xea", "only (a & b) | c is emulated"
            regs[args[0]] = (value(args[1]) & value(args[2])) | value(args[3])
        elif op == "prmt.b32":
            regs[args[0]] = _prmt(value(args[1]), value(args[2]), value(args[3]))
        else:
            raise AssertionError(f"unexpected instruction {op}")
    return regs["$0"], regs["$1"]


def biased_code(byte: int, quarter: int, dtype: str) -> int:
    """The 16-bit pattern of `4 + code` for the code of channel quarter `quarter` in `byte`."""
    code = (byte >> (2 * quarter)) & 3
    return (code << 5) | 0x4080 if dtype == "bf16" else (code << 8) | 0x4400


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("quarter", [0, 1, 2, 3])
def test_byte_and_pair_unpack_ptx_give_the_reference_bit_patterns(dtype, quarter):
    rng = random.Random(quarter * 2 + (dtype == "fp16"))
    words = [0, _MASK, 0x1B1B1B1B, 0xE4E4E4E4] + [rng.getrandbits(32) for _ in range(500)]
    for word in words:
        b = [(word >> (8 * i)) & 0xFF for i in range(4)]
        want = [biased_code(x, quarter, dtype) for x in b]
        # Four uint8 elements in, four 16-bit values out: elements 0, 1 in $0 and 2, 3 in $1 (low half first).
        assert run_ptx(_unpack_asm(dtype, quarter), word) == (want[0] | want[1] << 16, want[2] | want[3] << 16)
        # Two uint16 elements (bytes b0 b1 | b2 b3) in; out: their low bytes' values ($0) and high bytes' ($1).
        assert run_ptx(_unpack_asm(dtype, quarter, pairs=True), word) == (
            want[0] | want[2] << 16, want[1] | want[3] << 16
        )


def test_the_emulator_catches_a_wrong_selector():
    wrong = _unpack_asm("bf16", 0, pairs=True).replace("0x4240", "0x4140")
    word = 0x03020100 | 0x000000C0  # byte 0 holds code 0 in quarter 0 but byte 1 holds code 1
    assert run_ptx(wrong, word) != run_ptx(_unpack_asm("bf16", 0, pairs=True), word)
