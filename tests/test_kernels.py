"""The Triton kernels against the PyTorch reference, at small shapes.

Without a GPU these run in Triton's CPU interpreter. `TRITON_INTERPRET=1` must be set before Triton is first imported
(Triton's own library functions are wrapped at import), and `import oscar_hf` already imports Triton through
transformers. So, on a machine without CUDA, when Triton is already loaded in compiled mode, this module runs itself
in a
subprocess with `TRITON_INTERPRET=1` (`test_kernels_under_interpreter`) and skips its tests in this process; no other
test module is affected. Lengths are drawn at random and are not multiples of the block sizes, and every buffer a
kernel allocates or writes is poisoned first, so an unwritten element shows up as NaN or as a wrong code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not importable: the kernels cannot be built or interpreted")

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_RUN_IN_SUBPROCESS = not torch.cuda.is_available() and not _INTERPRET
in_process = pytest.mark.skipif(
    _RUN_IN_SUBPROCESS, reason="no CUDA: run under TRITON_INTERPRET=1 in a subprocess (test_kernels_under_interpreter)"
)


@pytest.mark.skipif(not _RUN_IN_SUBPROCESS, reason="the kernel tests run in this process")
def test_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    run = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert " passed" in run.stdout and "failed" not in run.stdout.splitlines()[-1], run.stdout[-3000:]

from oscar_hf.attention import segment_attention_reference  # noqa: E402
from oscar_hf.kernel_dispatch import decode_attention_fast_path  # noqa: E402
from oscar_hf.kernels import decode_attention as dk  # noqa: E402
from oscar_hf.kernels import quantize as qk  # noqa: E402
from oscar_hf.layer import OscarQuantizedLayer, OscarSegments  # noqa: E402
from oscar_hf.quantization import (  # noqa: E402
    KeyTilt,
    error_feedback_factor,
    quantize_rows,
    read_token_pairs,
    write_token_pairs,
)
from oscar_hf.storage import recall_demoted  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_rotation(groups: int, d: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(groups, d, d, dtype=torch.float64, generator=gen))
    return q.float()


def _rows(shape, gen, dtype=torch.bfloat16) -> torch.Tensor:
    """Rows with channel outliers and per-row magnitudes, as KV activations have."""
    x = torch.randn(*shape, generator=gen) * torch.rand(*shape[:-1], 1, generator=gen).mul(3).add(0.1)
    outliers = torch.rand(shape, generator=gen) < 0.02
    x = torch.where(outliers, x * 20, x)
    return x.to(dtype).to(DEVICE)


# ------------------------------------------------------------------------------------------------------ write path
@in_process
@pytest.mark.parametrize("clip_ratio", [0.96, 0.92, 1.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_kernel_matches_reference_bit_for_bit(clip_ratio, dtype):
    gen = torch.Generator().manual_seed(int(clip_ratio * 100) + (dtype == torch.float16))
    b, h, d = 2, 2, 128
    n = int(torch.randint(17, 45, (1,), generator=gen))  # not a multiple of BLOCK_R
    rows = _rows((b, h, n, d), gen, dtype)
    rows[0, 0, 3] = 0.7  # a constant row: null range
    rows[1, 1, 5, : d // 2] = 0.0  # repeated order statistics
    rows[0, 1, 7] = -rows[0, 1, 7].abs()
    ref = quantize_rows(rows, clip_ratio)

    # Write into the middle of a larger, poisoned buffer, as a demotion writes at `body_len`.
    cap, at = n + 11, 6
    codes = torch.full((b, h, cap, d // 4), 0xA5, dtype=torch.uint8, device=DEVICE)
    scale = torch.full((b, h, cap), float("nan"), dtype=torch.float16, device=DEVICE)
    offset = torch.full((b, h, cap), float("nan"), dtype=torch.float16, device=DEVICE)
    qk.quantize_rows_into(
        rows, clip_ratio, codes[:, :, at : at + n], scale[:, :, at : at + n], offset[:, :, at : at + n]
    )

    torch.testing.assert_close(codes[:, :, at : at + n], ref.codes, rtol=0, atol=0)
    torch.testing.assert_close(scale[:, :, at : at + n], ref.scale, rtol=0, atol=0)
    torch.testing.assert_close(offset[:, :, at : at + n], ref.offset, rtol=0, atol=0)
    # Nothing outside the destination rows was touched.
    assert (codes[:, :, :at] == 0xA5).all() and (codes[:, :, at + n :] == 0xA5).all()
    assert scale[:, :, :at].isnan().all() and scale[:, :, at + n :].isnan().all()


@in_process
@pytest.mark.parametrize("at", [6, 7])
def test_quantize_kernel_writes_token_pair_interleaved_codes(at):
    """Value codes go to the body token-pair interleaved (`quantization.write_token_pairs`): the kernel writes them
    there itself, from an even or an odd first token, touching no other byte of the plane."""
    gen = torch.Generator().manual_seed(40 + at)
    b, h, d, n = 2, 2, 128, 21
    rows = _rows((b, h, n, d), gen)
    ref = quantize_rows(rows, 0.96)
    cap = 40
    plane = torch.full((b, h, cap, d // 4), 0xA5, dtype=torch.uint8, device=DEVICE)
    expected = plane.clone()
    write_token_pairs(expected, ref.codes, at)
    scale = torch.empty(b, h, n, dtype=torch.float16, device=DEVICE)
    offset = torch.empty_like(scale)
    qk.quantize_rows_into(rows, 0.96, plane, scale, offset, token_pairs_from=at)
    torch.testing.assert_close(plane, expected, rtol=0, atol=0)
    torch.testing.assert_close(read_token_pairs(plane, at + n)[:, :, at:], ref.codes, rtol=0, atol=0)
    with pytest.raises(ValueError, match="token-pair"):
        qk.quantize_rows_into(rows, 0.96, plane, scale, offset, token_pairs_from=cap - n + 1)


@in_process
@pytest.mark.parametrize("groups", [1, 2], ids=["shared-factor", "per-head-factor"])
def test_quantize_kernel_with_error_feedback_matches_reference_bit_for_bit(groups):
    gen = torch.Generator().manual_seed(40 + groups)
    b, h, d = 2, 2, 64
    n = int(torch.randint(17, 40, (1,), generator=gen))
    rows = _rows((b, h, n, d), gen)
    rows[0, 0, 3] = 0.7  # constant row
    # A skewed metric (as a query covariance is), so feedback really moves codes.
    a = torch.randn(groups, d, d, generator=gen, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64)
    metric = a @ a.mT
    factor = error_feedback_factor(metric).to(DEVICE)
    ref = quantize_rows(rows, 0.96, feedback=factor)
    plain = quantize_rows(rows, 0.96)
    assert (ref.codes != plain.codes).float().mean() > 0.05  # feedback changes codes: the comparison means something

    cap, at = n + 9, 4
    codes = torch.full((b, h, cap, d // 4), 0xA5, dtype=torch.uint8, device=DEVICE)
    scale = torch.full((b, h, cap), float("nan"), dtype=torch.float16, device=DEVICE)
    offset = torch.full((b, h, cap), float("nan"), dtype=torch.float16, device=DEVICE)
    qk.quantize_rows_into(rows, 0.96, codes[:, :, at : at + n], scale[:, :, at : at + n], offset[:, :, at : at + n],
                          feedback=factor)
    torch.testing.assert_close(codes[:, :, at : at + n], ref.codes, rtol=0, atol=0)
    torch.testing.assert_close(scale[:, :, at : at + n], ref.scale, rtol=0, atol=0)
    torch.testing.assert_close(offset[:, :, at : at + n], ref.offset, rtol=0, atol=0)
    assert (codes[:, :, :at] == 0xA5).all() and (codes[:, :, at + n :] == 0xA5).all()
    with pytest.raises(ValueError, match="groups does not fit"):
        qk.quantize_rows_into(rows, 0.96, codes[:, :, at : at + n], scale[:, :, at : at + n],
                              offset[:, :, at : at + n], feedback=factor[:1].expand(3, d, d))


def _key_tilt(heads, groups, d, gen) -> KeyTilt:
    """Query means of the size of the keys and maps small enough that `S + W W^T` stays well conditioned."""
    b = torch.randn(heads, groups, d, d, generator=gen) * (0.3 / d**0.5)
    return KeyTilt((torch.randn(heads, groups, d, generator=gen) * 0.5).to(DEVICE), (b + b.mT).to(DEVICE))


@in_process
@pytest.mark.parametrize(
    "groups,tilt_heads,block_rows",
    [(1, 2, 4), (4, 2, 2), (4, 1, None), (3, 2, 2)],
    ids=["G1-per-head-4rows", "G4-per-head-2rows", "G4-shared-default", "G3-padded-2rows"],
)
def test_quantize_kernel_with_key_tilt_matches_reference_bit_for_bit(groups, tilt_heads, block_rows):
    gen = torch.Generator().manual_seed(60 + groups + block_rows if block_rows else 70 + groups)
    b, h, d = 1, 2, 32
    n = int(torch.randint(5, 10, (1,), generator=gen))  # not a multiple of the 2 or 4 rows of a program
    n += n % 2 == 0
    rows = _rows((b, h, n, d), gen)
    rows[0, 0, 3] = 0.7  # constant row
    rows[0, 1, 2, 5] = float("nan")  # a non-finite row codes garbage, but only for itself
    a = torch.randn(h, d, d, generator=gen, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64)
    factor = error_feedback_factor(a @ a.mT).to(DEVICE)
    tilt = _key_tilt(tilt_heads, groups, d, gen)
    ref = quantize_rows(rows, 0.96, feedback=factor, tilt=tilt)
    untilted = quantize_rows(rows, 0.96, feedback=factor)
    assert (ref.codes != untilted.codes).float().mean() > 0.05  # the tilt moves codes: the comparison means something

    cap, at = n + 7, 3
    codes = torch.full((b, h, cap, d // 4), 0xA5, dtype=torch.uint8, device=DEVICE)
    scale = torch.full((b, h, cap), float("nan"), dtype=torch.float16, device=DEVICE)
    offset = torch.full((b, h, cap), float("nan"), dtype=torch.float16, device=DEVICE)
    qk.quantize_rows_into(rows, 0.96, codes[:, :, at : at + n], scale[:, :, at : at + n], offset[:, :, at : at + n],
                          feedback=factor, tilt=tilt, block_rows=block_rows)
    ok = torch.isfinite(rows).all(-1)
    assert ok.sum() == b * h * n - 1
    torch.testing.assert_close(codes[:, :, at : at + n][ok], ref.codes[ok], rtol=0, atol=0)
    torch.testing.assert_close(scale[:, :, at : at + n][ok], ref.scale[ok], rtol=0, atol=0)
    torch.testing.assert_close(offset[:, :, at : at + n][ok], ref.offset[ok], rtol=0, atol=0)
    assert (codes[:, :, :at] == 0xA5).all() and (codes[:, :, at + n :] == 0xA5).all()
    assert scale[:, :, :at].isnan().all() and scale[:, :, at + n :].isnan().all()


@in_process
def test_quantize_kernel_declines_key_tilts_it_cannot_code():
    gen = torch.Generator().manual_seed(80)
    rows = _rows((1, 2, 5, 32), gen)
    factor = error_feedback_factor(torch.eye(32, dtype=torch.float64).expand(2, 32, 32)).to(DEVICE)
    assert qk.can_quantize(rows, _key_tilt(2, 8, 32, gen))
    assert not qk.can_quantize(rows, _key_tilt(2, 9, 32, gen))  # more query heads than the kernel keeps
    out = qk.quantize_rows(rows, 0.96, factor)
    args = (rows, 0.96, out.codes, out.scale, out.offset)
    with pytest.raises(ValueError, match="at most 8 query heads"):
        qk.quantize_rows_into(*args, feedback=factor, tilt=_key_tilt(2, 9, 32, gen))
    with pytest.raises(ValueError, match="base metric"):
        qk.quantize_rows_into(*args, tilt=_key_tilt(2, 4, 32, gen))
    with pytest.raises(ValueError, match="does not fit rows of 2 heads"):
        qk.quantize_rows_into(*args, feedback=factor, tilt=_key_tilt(3, 4, 32, gen))


@in_process
def test_quantize_kernel_keeps_a_nonfinite_row_to_itself():
    gen = torch.Generator().manual_seed(3)
    rows = _rows((1, 2, 21, 64), gen)
    rows[0, 1, 4, 9] = float("nan")
    rows[0, 0, 2, 0] = float("inf")
    ref = quantize_rows(rows, 0.96)
    got = qk.quantize_rows(rows, 0.96)
    finite = torch.isfinite(rows).all(dim=-1)
    assert finite.sum() == rows.shape[0] * rows.shape[1] * rows.shape[2] - 2
    torch.testing.assert_close(got.codes[finite], ref.codes[finite], rtol=0, atol=0)
    torch.testing.assert_close(got.scale[finite], ref.scale[finite], rtol=0, atol=0)
    torch.testing.assert_close(got.offset[finite], ref.offset[finite], rtol=0, atol=0)


@in_process
def test_quantize_kernel_rejects_bad_outputs():
    rows = torch.randn(1, 1, 5, 64, dtype=torch.bfloat16, device=DEVICE)
    codes = torch.empty(1, 1, 5, 8, dtype=torch.uint8, device=DEVICE)  # should be 64 / 4 = 16 bytes
    scale = torch.empty(1, 1, 5, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="do not match"):
        qk.quantize_rows_into(rows, 0.9, codes, scale, scale.clone())


# ----------------------------------------------------------------------------------------------------- decode attention
@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every buffer the decode launcher allocates (partials, output) starts as NaN."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(dk.torch, "empty", empty)


def _filled_layer(gen, *, batch, kv_heads, head_dim, prompt, rotation, sink=8, recent=16, block=8):
    k_rot = v_rot = None
    if rotation == "shared":
        k_rot, v_rot = _random_rotation(1, head_dim, gen), _random_rotation(1, head_dim, gen)
    elif rotation == "per_head":
        k_rot, v_rot = _random_rotation(kv_heads, head_dim, gen), _random_rotation(kv_heads, head_dim, gen)
    layer = OscarQuantizedLayer(k_rot, v_rot, 0.96, 0.92, sink_tokens=sink, recent_tokens=recent, demote_block=block)
    layer.update(_rows((batch, kv_heads, prompt, head_dim), gen), _rows((batch, kv_heads, prompt, head_dim), gen))
    return layer


def _step(layer, gen, q_len, group):
    b, h, d = layer.batch_size, layer.num_heads, layer.head_dim
    seg, _ = layer.update(_rows((b, h, q_len, d), gen), _rows((b, h, q_len, d), gen), return_segments=True)
    # The kernels attend with the new tokens exact and the body as stored. A short forward that demoted tokens gets a
    # per-query view from the reference instead (the attention function routes it there; test_crop.py checks it):
    # compare the kernels with what they compute.
    seg.demoted = None
    query = _rows((b, h * group, q_len, d), gen)
    return seg, query


def _truth(query, seg: OscarSegments, mask, scaling=None):
    """Attention in float64 over exactly what the cache holds (body dequantized in float64)."""
    layer = seg.layer
    keys, values = seg.rotated_keys_values(torch.float64)
    q = query.double()
    group = query.shape[1] // keys.shape[1]
    if layer.k_rotation is not None:
        q = q @ layer.k_rotation.double().repeat_interleave(group if layer.k_rotation.shape[0] > 1 else 1, 0)
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = q @ keys.transpose(-1, -2) * (scaling or query.shape[-1] ** -0.5)
    kv_len, q_len = keys.shape[-2], query.shape[-2]
    if mask is None:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
    scores = scores.masked_fill(~mask[..., :kv_len], float("-inf"))  # column p is cache position p
    out = scores.softmax(-1) @ values
    if layer.v_rotation is not None:
        rv = layer.v_rotation.double().repeat_interleave(group if layer.v_rotation.shape[0] > 1 else 1, 0)
        out = out @ rv.transpose(-1, -2)
    return out


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _check_against_reference(out, query, seg, mask, scaling=None):
    assert out.shape == query.shape and out.dtype == query.dtype
    assert torch.isfinite(out).all(), "an output element was never written (poisoned NaN survived)"
    ref = segment_attention_reference(query, seg, mask, scaling)
    truth = _truth(query, seg, mask, scaling)
    err_kernel, err_ref = _rel(out, truth), _rel(ref, truth)
    # Both read the same 2-bit codes; they differ only by bf16 rounding of intermediates.
    assert _rel(out, ref) < 2e-2, (err_kernel, err_ref)
    assert err_kernel <= 2 * err_ref + 2e-3, (err_kernel, err_ref)


@in_process
@pytest.mark.parametrize(
    "rotation,q_len,group,batch",
    [("per_head", 1, 4, 2), ("shared", 3, 2, 1), (None, 8, 2, 1), ("per_head", 5, 1, 2)],
)
def test_decode_kernel_matches_reference(poisoned_allocations, rotation, q_len, group, batch):
    gen = torch.Generator().manual_seed(q_len * 10 + group)
    prompt = int(torch.randint(90, 160, (1,), generator=gen))
    layer = _filled_layer(gen, batch=batch, kv_heads=2, head_dim=64, prompt=prompt, rotation=rotation)
    for _ in range(2):  # two steps: the second may demote
        seg, query = _step(layer, gen, q_len, group)
        assert layer.body_len > 0 and layer.body_len % 16 != 0 or layer.body_len > 0
        # 16-token exact chunks: the sink and the recent window are each split over several programs.
        out = dk.oscar_decode_attention(query, layer, None, None, q_len, block_n=16, min_blocks_per_split=2,
                                        exact_chunk=16)
        _check_against_reference(out, query, seg, None)


@in_process
@pytest.mark.parametrize(
    "rotation,q_len,group,device_lengths",
    [("per_head", 1, 4, True), ("shared", 3, 2, False), (None, 2, 4, True), ("per_head", 8, 8, False)],
)
def test_decode_kernel_merges_in_stage1(poisoned_allocations, monkeypatch, rotation, q_len, group, device_lengths):
    """`merge_in_stage1`: the last stage-1 program of each row merges the splits instead of a stage-2 launch. Same
    attention as the two-launch call (only the grouping of the merge's float32 sums differs), and the arrival counts
    are zero again after every call, so the next launch counts from zero. A static layer counts in its own `lengths`
    (allocated with its buffers, never inside a captured step); host lengths use the module's buffer."""
    monkeypatch.setattr(dk, "_MERGE_COUNTERS", {})
    gen = torch.Generator().manual_seed(31 + q_len)
    layer = _filled_layer(gen, batch=2, kv_heads=2, head_dim=64, prompt=150, rotation=rotation)
    if device_lengths:
        layer = OscarQuantizedLayer(layer.k_rotation, layer.v_rotation, 0.96, 0.92, sink_tokens=8, recent_tokens=16,
                                    demote_block=8, max_cache_len=300)
        layer.update(_rows((2, 2, 150, 64), gen), _rows((2, 2, 150, 64), gen))
    for _ in range(3):  # crosses a demotion
        seg, query = _step(layer, gen, q_len, group)
        kw = dict(device_lengths=device_lengths, block_n=16, min_blocks_per_split=1, exact_chunk=16)
        two_launches = dk.oscar_decode_attention(query, layer, None, None, q_len, **kw)
        one_launch = dk.oscar_decode_attention(query, layer, None, None, q_len, merge_in_stage1=True, **kw)
        assert torch.isfinite(one_launch).all(), "an output element was never written (poisoned NaN survived)"
        assert _rel(one_launch, two_launches) < 5e-3
        _check_against_reference(one_launch, query, seg, None)
        if device_lengths:
            assert layer.lengths.numel() == 4 + 2 * 2 and not layer.lengths[4:].any()
            assert not dk._MERGE_COUNTERS, "a static layer's decode counted in the module's buffer"
        else:
            assert not dk._MERGE_COUNTERS[(query.device.type, query.device.index)].any()


@in_process
@pytest.mark.parametrize("q_len,group,padded", [(1, 4, False), (2, 4, True), (1, 1, False), (1, 2, True)])
def test_decode_kernel_stacked_query_rows_match_reference(poisoned_allocations, q_len, group, padded):
    """Few query rows per KV head: the score tile stacks copies of them over consecutive key sub-blocks (`stack` > 1);
    bodies that end inside a sub-block, and a left-padding mask that reaches into the body."""
    gen = torch.Generator().manual_seed(30 + 4 * q_len + group)
    prompt = int(torch.randint(150, 230, (1,), generator=gen))
    layer = _filled_layer(gen, batch=2, kv_heads=2, head_dim=64, prompt=prompt, rotation="per_head")
    seg, query = _step(layer, gen, q_len, group)
    mask = None
    if padded:
        kv_len = layer.get_seq_length()
        mask = torch.ones(2, 1, q_len, kv_len, dtype=torch.bool, device=DEVICE).tril(kv_len - q_len)
        mask[1, :, :, :40] = False  # the second sequence's padding covers the sink and part of the body
    rows = 1 << (q_len * group - 1).bit_length()
    stacks = [s for s in (1, 2, 4) if 16 // s >= rows]
    assert len(stacks) > 1
    outs = []
    for stack in stacks:
        # A register cap (`max_registers`) changes the compiled code, not the result.
        out = dk.oscar_decode_attention(query, layer, mask, None, q_len, block_n=64, min_blocks_per_split=1,
                                        stack=stack, max_registers=96 if stack == stacks[-1] else None)
        _check_against_reference(out, query, seg, mask)
        outs.append(out)
    # Stacking changes only the order in which partial softmax sums are merged.
    for out in outs[1:]:
        assert _rel(out, outs[0]) < 1e-2
    with pytest.raises(ValueError, match="stack"):
        dk.oscar_decode_attention(query, layer, mask, None, q_len, block_n=32, stack=4)


@in_process
@pytest.mark.parametrize(
    "q_len,group,stack,padded", [(1, 4, 4, False), (1, 4, 1, True), (2, 3, 2, True), (5, 2, 1, False)]
)
def test_decode_kernel_code_pairs_match_reference(poisoned_allocations, q_len, group, stack, padded):
    """Codes read two bytes at a time: key codes by byte pairs (`key_pairs`, each quarter's score product split by
    channel parity) and value codes by token pairs (`value_pairs`, the value product split by token parity). Same
    products as the byte paths, in another order: every combination must match the reference, and each other
    closely; head_dim 128 and 128-token blocks (the pairs need 16 channels / tokens per parity). Half the cases
    write their last demotion from inside a token pair (after a crop to an odd body)."""
    gen = torch.Generator().manual_seed(70 + 4 * q_len + group)
    prompt = int(torch.randint(150, 230, (1,), generator=gen))
    layer = _filled_layer(gen, batch=2, kv_heads=2, head_dim=128, prompt=prompt, rotation="per_head", block=5)
    if not padded:
        # Crop back to an odd body (blocks of 5 tokens), then demote more: a write that starts inside a token pair.
        while layer.body_len % 2 == 0:
            layer.crop(-1)
        assert layer.body_len > 0
        layer.update(_rows((2, 2, 40, 128), gen), _rows((2, 2, 40, 128), gen))
    seg, query = _step(layer, gen, q_len, group)
    mask = None
    if padded:
        kv_len = layer.get_seq_length()
        mask = torch.ones(2, 1, q_len, kv_len, dtype=torch.bool, device=DEVICE).tril(kv_len - q_len)
        mask[1, :, :, :40] = False
    outs = []
    for key_pairs in (False, True):
        for value_pairs in (False, True):
            out = dk.oscar_decode_attention(query, layer, mask, None, q_len, block_n=128, min_blocks_per_split=1,
                                            stack=stack, key_pairs=key_pairs, value_pairs=value_pairs)
            _check_against_reference(out, query, seg, mask)
            outs.append(out)
    for out in outs[1:]:
        assert _rel(out, outs[0]) < 1e-2


@in_process
def test_decode_kernel_code_pairs_refuse_shapes_they_cannot_serve():
    gen = torch.Generator().manual_seed(3)
    layer = _filled_layer(gen, batch=1, kv_heads=2, head_dim=64, prompt=120, rotation=None)
    _, query = _step(layer, gen, 1, 4)
    with pytest.raises(ValueError, match="key_pairs"):
        dk.oscar_decode_attention(query, layer, key_pairs=True)
    with pytest.raises(ValueError, match="value_pairs"):
        dk.oscar_decode_attention(query, layer, block_n=64, stack=4, value_pairs=True)


@in_process
def test_decode_kernel_dependent_launch_only_where_supported():
    """Programmatic dependent launch of stage 2 (opt-in, sm_90+) gives the same output; asked for elsewhere it is an
    error, not a kernel that runs PTX the device (or the interpreter) cannot."""
    gen = torch.Generator().manual_seed(5)
    layer = _filled_layer(gen, batch=1, kv_heads=2, head_dim=64, prompt=120, rotation=None)
    _, query = _step(layer, gen, 1, 2)
    if dk._pdl_supported(query.device):
        out = dk.oscar_decode_attention(query, layer, dependent_launch=True)
        ref = dk.oscar_decode_attention(query, layer, dependent_launch=False)
        assert torch.equal(out, ref)
    else:
        with pytest.raises(ValueError, match="dependent_launch"):
            dk.oscar_decode_attention(query, layer, dependent_launch=True)


@in_process
def test_decode_kernel_left_padded_batch_with_mask(poisoned_allocations):
    gen = torch.Generator().manual_seed(11)
    q_len, group = 2, 4
    layer = _filled_layer(gen, batch=3, kv_heads=1, head_dim=128, prompt=101, rotation="per_head")
    seg, query = _step(layer, gen, q_len, group)
    kv_len = layer.get_seq_length()
    # transformers' mask is [batch, 1, q_len, kv_len (+ spare: a static cache's)], column p = cache position p:
    # causal, plus each sequence's left padding.
    mask = torch.ones(3, 1, q_len, kv_len + 3, dtype=torch.bool, device=DEVICE).tril(kv_len - q_len)
    starts = [0, 9, 77]  # the third sequence's padding reaches into the 2-bit body
    for i, s in enumerate(starts):
        mask[i, :, :, :s] = False
    out = dk.oscar_decode_attention(query, layer, mask, 0.1, q_len, block_n=16, min_blocks_per_split=1)
    _check_against_reference(out, query, seg, mask, 0.1)


@in_process
def test_decode_kernel_sink_only_and_tiny_body(poisoned_allocations):
    gen = torch.Generator().manual_seed(5)
    layer = _filled_layer(gen, batch=1, kv_heads=2, head_dim=64, prompt=5, rotation="shared")
    seg, query = _step(layer, gen, 3, 2)  # new tokens straddle the sink and the recent window; no body yet
    assert layer.body_len == 0
    _check_against_reference(dk.oscar_decode_attention(query, layer, None, None, 3), query, seg, None)
    layer = _filled_layer(gen, batch=1, kv_heads=2, head_dim=64, prompt=35, rotation="shared")
    seg, query = _step(layer, gen, 1, 2)
    assert 0 < layer.body_len < 16
    _check_against_reference(dk.oscar_decode_attention(query, layer, None, None, 1, block_n=16), query, seg, None)


@in_process
def test_decode_kernel_declines_what_it_cannot_serve():
    gen = torch.Generator().manual_seed(1)
    layer = _filled_layer(gen, batch=1, kv_heads=2, head_dim=64, prompt=60, rotation=None)
    seg, query = _step(layer, gen, 1, 2)
    assert dk.unsupported_reason(query, layer, None, 1) is None
    long_query = _rows((1, 4, 9, 64), gen)
    assert "q_len" in dk.unsupported_reason(long_query, layer, None, 9)
    float_mask = torch.zeros(1, 1, 1, layer.get_seq_length(), device=DEVICE)
    assert "dtype" in dk.unsupported_reason(query, layer, float_mask, 1)
    per_head_mask = torch.ones(1, 4, 1, layer.get_seq_length(), dtype=torch.bool, device=DEVICE)
    assert "shape" in dk.unsupported_reason(query, layer, per_head_mask, 1)
    assert "dtypes" in dk.unsupported_reason(query.float(), layer, None, 1)
    with pytest.raises(ValueError, match="does not support"):
        dk.oscar_decode_attention(long_query, layer, None, None, 9)
    # The attention function's entry point only takes CUDA tensors; on CPU the reference runs.
    if not query.is_cuda:
        assert decode_attention_fast_path(query, seg, None, None) is None


@in_process
def test_decode_kernel_declines_when_new_tokens_were_demoted():
    gen = torch.Generator().manual_seed(2)
    layer = _filled_layer(gen, batch=1, kv_heads=1, head_dim=64, prompt=40, rotation=None, recent=0, block=4)
    seg, query = _step(layer, gen, 4, 1)
    assert layer.recent_len < 4 and layer.body_len > 0
    assert "demoted" in dk.unsupported_reason(query, layer, None, 4)


@in_process
@pytest.mark.parametrize("block_n,padded", [(16, False), (64, True)])
def test_decode_kernel_reads_device_lengths_and_a_static_mask(poisoned_allocations, block_n, padded):
    """A static layer's decode step: the grid is sized for the buffers' capacity and the lengths come from
    `layer.lengths`, so the same launch must give the same attention at every step, demotions included; the mask is a
    static cache's (`max_cache_len` columns, column p = cache position p), with left padding reaching the body."""
    gen = torch.Generator().manual_seed(21)
    max_len = 400
    layer = OscarQuantizedLayer(
        _random_rotation(2, 64, gen), _random_rotation(2, 64, gen), 0.96, 0.92,
        sink_tokens=8, recent_tokens=16, demote_block=8, max_cache_len=max_len,
    )
    layer.update(_rows((2, 2, 57, 64), gen), _rows((2, 2, 57, 64), gen))
    assert layer.body_capacity > 3 * layer.body_len  # most programs find nothing to do
    bodies = set()
    for _ in range(10):  # crosses a demotion
        seg, query = _step(layer, gen, 1, 4)
        assert seg.device_lengths
        kv_len = layer.get_seq_length()
        mask = None
        if padded:
            mask = torch.zeros(2, 1, 1, max_len, dtype=torch.bool, device=DEVICE)
            mask[..., :kv_len] = True
            mask[1, ..., :30] = False
        out = dk.oscar_decode_attention(query, layer, mask, None, 1, device_lengths=True, block_n=block_n,
                                        exact_chunk=16)
        assert torch.isfinite(out).all(), "an output element was never written (poisoned NaN survived)"
        if padded:
            # Splits whose columns the scan finds all visible skip the mask in their loop: the same arithmetic.
            unscanned = dk.oscar_decode_attention(query, layer, mask, None, 1, device_lengths=True, block_n=block_n,
                                                  exact_chunk=16, mask_scan=False)
            assert torch.equal(out, unscanned)
        # The host-length launch splits the body differently; only the merge order of the partials may differ.
        expected = dk.oscar_decode_attention(query, layer, mask, None, 1, block_n=block_n, exact_chunk=16)
        assert _rel(out, expected) < 1e-2
        _check_against_reference(out, query, seg, mask)
        bodies.add(layer.body_len)
    assert len(bodies) > 1


@in_process
@pytest.mark.parametrize("feedback,pairs", [(False, False), (False, True), (True, False)])
def test_predicated_write_is_a_noop_without_a_block_and_exact_with_one(feedback, pairs):
    """The write kernel's device-offset mode (a compiled step's demotion): `(go, first)` read on the device; with
    go = 0 nothing is written, with go = 1 the rows land at `first` bit for bit as the reference codes them."""
    gen = torch.Generator().manual_seed(8 + 2 * feedback + pairs)
    b, h, n, d, cap = 1, 2, 8, 64, 40
    rows = _rows((b, h, n, d), gen)
    factor = None
    if feedback:
        x = torch.randn(4 * d, d, generator=gen, dtype=torch.float64)
        factor = error_feedback_factor((x.T @ x / (4 * d)).float()[None]).to(DEVICE)
    codes = torch.full((b, h, cap, d // 4), 0xAB, dtype=torch.uint8, device=DEVICE)
    scale = torch.full((b, h, cap), 7.0, dtype=torch.float16, device=DEVICE)
    offset = scale.clone()
    before = [t.clone() for t in (codes, scale, offset)]
    first = 13  # odd: a value write that starts inside a token pair
    for go in (0, 1):
        ctrl = torch.tensor([go, first], dtype=torch.int32, device=DEVICE)
        qk.quantize_rows_into(rows, 0.92, codes, scale, offset, factor, token_pairs_from=0 if pairs else None,
                              device_offset=ctrl)
        if go == 0:
            assert all(torch.equal(t, u) for t, u in zip((codes, scale, offset), before))
    ref = quantize_rows(rows, 0.92, factor)
    at = slice(first, first + n)
    assert torch.equal(scale[:, :, at], ref.scale) and torch.equal(offset[:, :, at], ref.offset)
    got_codes = read_token_pairs(codes, first + n)[:, :, at] if pairs else codes[:, :, at]
    assert torch.equal(got_codes, ref.codes)
    outside = torch.ones(cap, dtype=torch.bool)
    outside[at] = False
    assert torch.equal(scale[:, :, outside], before[1][:, :, outside])


def _undo(layer):
    return layer.undo_keys, layer.undo_values


def _static_layer_pair(d, factor):
    layers = []
    for _ in range(2):
        layer = OscarQuantizedLayer(None, None, 0.96, 0.92, sink_tokens=5, recent_tokens=6, demote_block=3,
                                    max_cache_len=80, k_feedback=factor, v_feedback=factor)
        layer.lazy_initialization(*(2 * [torch.zeros(2, 2, 0, d, dtype=torch.bfloat16, device=DEVICE)]))
        layers.append(layer)
    return layers


def _assert_same_state(layer_a, layer_b):
    """Equal lengths and, bit for bit, the valid rows of every segment (slots past a segment's length may hold
    different leftovers) and of the undo ring; the lengths' reserved slot (the window write's program count) is back
    to 0 on both."""
    assert layer_a.lengths.tolist() == layer_b.lengths.tolist()
    assert layer_b.lengths[3] == 0
    sink, body, recent = layer_a.lengths.tolist()[:3]
    (ka, va), (kb, vb) = layer_a.body_rows(), layer_b.body_rows()
    for a, b in [(ka.codes, kb.codes), (ka.scale, kb.scale), (ka.offset, kb.offset), (va.codes, vb.codes),
                 (va.scale, vb.scale), (va.offset, vb.offset)]:
        assert a.shape[2] == body and torch.equal(a, b)
    for name, count in (("sink_keys", sink), ("sink_values", sink), ("recent_keys", recent),
                        ("recent_values", recent)):
        assert torch.equal(getattr(layer_a, name)[:, :, :count], getattr(layer_b, name)[:, :, :count])
    # The undo ring holds the newest demoted rows exactly (what `crop` brings back), in the same slots.
    held = min(body, layer_a.undo_capacity)
    for a, b in zip(recall_demoted(*_undo(layer_a), body - held, body), recall_demoted(*_undo(layer_b),
                                                                                       body - held, body)):
        assert torch.equal(a, b)


@in_process
@pytest.mark.parametrize("feedback,tilted,paired", [(False, False, True), (True, False, True), (True, True, True),
                                                    (True, True, False)])
def test_device_append_equals_host_append(feedback, tilted, paired, monkeypatch):
    """`oscar_hf::append`'s CUDA path (device arithmetic + predicated write, no host read) against its reference path:
    every buffer and length equal after each append, from an empty layer (new tokens straddling the sink) through
    several demotions; keys and values demoted in one launch (`paired`; with a key tilt, the values in the tilted
    coder's one-warp programs) or in two."""
    from oscar_hf import ops

    monkeypatch.setattr(ops, "PAIRED_DEMOTION", paired)
    gen = torch.Generator().manual_seed(40 + feedback + 2 * tilted)
    d = 64
    factor = tilt = None
    if feedback:
        x = torch.randn(4 * d, d, generator=gen, dtype=torch.float64)
        factor = error_feedback_factor((x.T @ x / (4 * d)).float()[None]).to(DEVICE)
    if tilted:
        tilt = _key_tilt(2, 2, d, gen)
    layers = _static_layer_pair(d, factor)
    demotions = 0
    for n in [3, 3, 1, 2, 1, 1, 3, 1, 1, 1, 2, 3, 1, 1, 1, 1, 2, 3, 1]:
        keys, values = _rows((2, 2, n, d), gen), _rows((2, 2, n, d), gen)
        body = layers[0].body_len
        for layer, fn in zip(layers, (ops.append_host, ops.append_device)):
            fn(keys, values, layer.lengths, layer.segment_tensors(), _undo(layer), layer.demote_block, 80, 0.96, 0.92,
               factor, factor, tilt)
        demotions += layers[0].body_len > body
        _assert_same_state(*layers)
    assert demotions >= 3 and layers[0].sink_len == 5
    # Past max_cache_len: the reference raises; the device path fires a device-side assertion (a trap that ends the
    # CUDA context, so not provoked on a GPU here) and, where assertions are compiled out (the interpreter), writes
    # nothing at all.
    keys = values = _rows((2, 2, 2, d), gen)
    with pytest.raises(ValueError, match="full"):
        ops.append_host(keys, values, layers[0].lengths, layers[0].segment_tensors(), _undo(layers[0]), 3,
                        layers[0].get_seq_length() + 1, 0.96, 0.92, factor, factor)
    if DEVICE == "cpu":
        state = [t.clone() for t in (*layers[1].segment_tensors(), *_undo(layers[1]), layers[1].lengths)]
        ops.append_device(keys, values, layers[1].lengths, layers[1].segment_tensors(), _undo(layers[1]), 3,
                          layers[1].get_seq_length() + 1, 0.96, 0.92, factor, factor)
        after = (*layers[1].segment_tensors(), *_undo(layers[1]), layers[1].lengths)
        assert all(torch.equal(a, b) for a, b in zip(state, after))


@in_process
@pytest.mark.parametrize("rotated", [True, False])
def test_window_write_rotates_the_query_for_the_decode(rotated):
    """`oscar_hf::append_decode_attention`'s CUDA path: the window write also rotates the step's query into stage 0's
    layout and the decode launches no rotation. Against the two ops (append, then decode with its own stage 0): the
    same buffers bit for bit, the same attention (up to a rare ulp of a rotated query element), across demotions and
    new-token counts 1-3 (GQA 2)."""
    from oscar_hf import ops

    gen = torch.Generator().manual_seed(60 + rotated)
    d = 64
    rot = [_random_rotation(2, d, gen).contiguous().to(DEVICE) if rotated else None for _ in range(2)]
    layers = []
    for _ in range(2):
        layer = OscarQuantizedLayer(*rot, 0.96, 0.92, sink_tokens=5, recent_tokens=6, demote_block=3, max_cache_len=80)
        layer.lazy_initialization(*(2 * [torch.zeros(2, 2, 0, d, dtype=torch.bfloat16, device=DEVICE)]))
        layers.append(layer)
    two_ops, fused = layers
    demotions = 0
    for n in [3, 3, 1, 2, 1, 1, 3, 1, 1, 2, 1, 1, 3]:
        keys, values, query = _rows((2, 2, n, d), gen), _rows((2, 2, n, d), gen), _rows((2, 4, n, d), gen)
        body = two_ops.body_len
        outs = []
        for layer, with_query in ((two_ops, False), (fused, True)):
            r = ops.append_device(keys, values, layer.lengths, layer.segment_tensors(), _undo(layer), 3, 80, 0.96,
                                  0.92, k_rotation=layer.k_rotation, v_rotation=layer.v_rotation,
                                  query=query if with_query else None)
            assert (r is not None) == with_query
            if with_query and DEVICE == "cpu":  # stage 0 on its own computes the same tile
                assert torch.equal(r, dk.rotate_query(query, layer.k_rotation, 2))
            outs.append(dk.decode_attention(query, layer.segment_tensors(), layer.lengths, layer.k_rotation,
                                            layer.v_rotation, rotated_query=r))
        _assert_same_state(two_ops, fused)
        assert torch.isfinite(outs[1]).all()
        assert _rel(outs[1], outs[0]) < 1e-3
        if DEVICE == "cpu":  # the interpreter sums both rotations' float32 products in one order: no ulp apart
            assert torch.equal(outs[1], outs[0])
        demotions += two_ops.body_len > body
    assert demotions >= 3


@in_process
def test_demotion_codes_keys_and_values_in_one_launch_where_it_can():
    """A decode step's demotion takes one launch for keys and values (the append tests above check its codes bit for
    bit against the reference); untilted keys and values with different kinds of coder take two."""
    from oscar_hf.kernels.append import DemoteSchedule

    gen = torch.Generator().manual_seed(70)
    d = 64
    x = torch.randn(4 * d, d, generator=gen, dtype=torch.float64)
    factor = error_feedback_factor((x.T @ x / (4 * d)).float()[None]).to(DEVICE)
    layer = _static_layer_pair(d, factor)[0]
    kc, ks, ko, vc, vs, vo = layer.segment_tensors()[4:]
    block = layer.demote_block
    when = DemoteSchedule(layer.lengths, 1, layer.sink_keys.shape[2], layer.recent_keys.shape[2], 80)
    keys = layer.recent_keys[:, :, :block]

    def values(feedback):
        return qk.ValueRows(layer.recent_values[:, :, :block], 0.92, vc, vs, vo, feedback, layer.undo_values)

    assert qk.can_pair(keys, kc, ks, ko, factor, None, when, layer.undo_keys, values(factor))
    assert not qk.can_pair(keys, kc, ks, ko, factor, None, when, layer.undo_keys, values(None))
    # A tilted layer's values are coded by their own branch of the coder, with a factor or without.
    tilt = _key_tilt(2, 2, d, gen)
    assert qk.can_pair(keys, kc, ks, ko, factor, tilt, when, layer.undo_keys, values(None))
    assert not qk.can_pair(keys, kc, ks, ko, factor, None, None, layer.undo_keys, values(factor))
    with pytest.raises(ValueError, match="one launch|keys' launch"):
        qk.quantize_rows_into(keys, 0.96, kc, ks, ko, factor, device_offset=when, ring=layer.undo_keys,
                              values=values(None))


def _newest_rows(layer, n):
    """The newest `n` stored keys and values: in the sink and the window, as a decode step never demotes its own."""
    sink, _, recent = layer.lengths.tolist()[:3]
    return tuple(torch.cat([s[:, :, :sink], r[:, :, :recent]], 2)[:, :, -n:]
                 for s, r in ((layer.sink_keys, layer.recent_keys), (layer.sink_values, layer.recent_values)))


def _assert_rarely_one_ulp_apart(got, expected):
    """Equal, but for a few elements one ulp apart: a float32 dot product summed in another order than
    torch.matmul's now and then lands on the other side of a rounding boundary of the 16-bit dtype."""
    equal = got == expected
    neighbours = (got.view(torch.int16).int() - expected.view(torch.int16).int()).abs() == 1
    assert (equal | neighbours).all()
    assert (~equal).float().mean() < 1e-2


@in_process
@pytest.mark.parametrize("k_groups,v_groups,mean_groups", [(2, 2, 2), (1, 1, 1), (None, 1, 2), (2, None, None)])
def test_device_append_rotates_the_new_states_as_the_host_does(k_groups, v_groups, mean_groups):
    """The window write rotates and centres the model's states itself (per-head or one rotation, a mean key of one
    or per head, either rotation absent). The rows it stores are `rotate_new_states`' rows (up to a rare ulp: the
    kernel's float32 dot sums in its own order), and the rest of the step is the reference's: fed the rows the kernel
    stored, `append_host` leaves every buffer and length bit for bit as the device path did, through several
    demotions. (Fed `rotate_new_states`' own rows, a row an ulp apart could change a body code after its demotion.)"""
    from oscar_hf import ops
    from oscar_hf.quantization import rotate_new_states

    gen = torch.Generator().manual_seed(50 + (k_groups or 0) + 3 * (mean_groups or 0))
    d = 64
    # Contiguous, as the layer keeps its rotations (the kernel reads them in place).
    k_rot = None if k_groups is None else _random_rotation(k_groups, d, gen).contiguous().to(DEVICE)
    v_rot = None if v_groups is None else _random_rotation(v_groups, d, gen).contiguous().to(DEVICE)
    mean = None if mean_groups is None else torch.randn(1, mean_groups, 1, d, generator=gen).mul(4).to(DEVICE)
    host, device = _static_layer_pair(d, None)
    demotions = 0
    for n in [3, 3, 1, 2, 1, 1, 3, 1, 1, 1, 2, 3, 1, 1, 1, 1, 2, 3, 1]:
        keys, values = _rows((2, 2, n, d), gen), _rows((2, 2, n, d), gen)
        body = host.body_len
        ops.append_device(keys, values, device.lengths, device.segment_tensors(), _undo(device), 3, 80, 0.96, 0.92,
                          k_rotation=k_rot, v_rotation=v_rot, k_mean_rotated=mean)
        stored = _newest_rows(device, n)
        for got, expected in zip(stored, rotate_new_states(keys, values, k_rot, v_rot, mean, torch.bfloat16)):
            _assert_rarely_one_ulp_apart(got, expected)
        ops.append_host(*(t.clone() for t in stored), host.lengths, host.segment_tensors(), _undo(host), 3, 80, 0.96,
                        0.92)
        demotions += host.body_len > body
        _assert_same_state(host, device)
    assert demotions >= 3


def test_a_scanned_mask_caps_stage1_registers_on_the_gpu():
    """The mask scan's two loops would take stage 1 to 255 registers (2 programs an SM, not 3): capped unless the
    caller chose a cap, and only where there is a mask to scan on a GPU."""
    cap = dk._MASKED_STAGE1_REGISTERS
    assert dk.stage1_max_registers(dk.DecodeOptions(), has_mask=True, on_gpu=True) == cap
    assert dk.stage1_max_registers(dk.DecodeOptions(max_registers=200), has_mask=True, on_gpu=True) == 200
    assert dk.stage1_max_registers(dk.DecodeOptions(mask_scan=False), has_mask=True, on_gpu=True) is None
    assert dk.stage1_max_registers(dk.DecodeOptions(), has_mask=False, on_gpu=True) is None
    assert dk.stage1_max_registers(dk.DecodeOptions(), has_mask=True, on_gpu=False) is None
