"""Tensor parallelism: a rank's shard of a bundle holds exactly its KV heads. Errors name the reason."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from oscar_hf import OscarRotations
from oscar_hf.quantization import error_feedback_factor
from oscar_hf.rotations import PER_HEAD_TENSORS
from oscar_hf.rotationzoo import export_rotationzoo

LAYERS, HEADS, QUERY_HEADS, D = 2, 4, 8, 32
SHARED = ("k_rotations", "v_rotations", "k_eigenvalues", "v_eigenvalues")  # one entry per layer in the mixed bundle


def per_head_bundle(shared_rotations: bool = False, seed: int = 0) -> OscarRotations:
    """A valid bundle carrying every per-head tensor (random rotations and metrics). With `shared_rotations` the
    rotations and eigenvalues are one per layer while the feedback, key means and tilt stay per head."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if shared_rotations else HEADS

    def orthogonal():
        return torch.linalg.qr(torch.randn(LAYERS, groups, D, D, generator=g, dtype=torch.float64))[0].float()

    def factor():
        a = torch.randn(LAYERS, HEADS, D, D, generator=g, dtype=torch.float64)
        return error_feedback_factor(a @ a.transpose(-1, -2) / D)

    tilt = 0.02 * torch.randn(LAYERS, HEADS, QUERY_HEADS // HEADS, D, D, generator=g)
    return OscarRotations(
        "oscar", LAYERS, HEADS, D, torch.linspace(0.9, 0.98, LAYERS), torch.full((LAYERS,), 0.92),
        orthogonal(), orthogonal(), torch.rand(LAYERS, groups, D, generator=g),
        torch.rand(LAYERS, groups, D, generator=g),
        metadata={"model_id": "tiny-qwen3"}, k_feedback=factor(), v_feedback=factor(),
        k_means=torch.randn(LAYERS, HEADS, D, generator=g),
        k_tilt_means=torch.randn(LAYERS, HEADS, QUERY_HEADS // HEADS, D, generator=g),
        k_tilt_maps=tilt + tilt.transpose(-1, -2),
    )


# --- OscarRotations.tensor_parallel_shard ---------------------------------------------------------------------------


def test_every_tensor_field_but_the_clip_ratios_is_sharded_by_head():
    """A tensor field added to OscarRotations must be listed as per-head (or be per layer, as the clip ratios)."""
    fields = {f.name for f in dataclasses.fields(OscarRotations) if "Tensor" in str(f.type)}
    assert fields - set(PER_HEAD_TENSORS) == {"k_clip_ratios", "v_clip_ratios"}


@pytest.mark.parametrize("shared_rotations", [False, True])
@pytest.mark.parametrize("size", [2, 4])
def test_shards_concatenate_to_the_whole_bundle(size, shared_rotations):
    whole = per_head_bundle(shared_rotations)
    shards = [whole.tensor_parallel_shard(rank, size) for rank in range(size)]
    for rank, shard in enumerate(shards):
        assert shard.num_kv_heads == HEADS // size and (shard.num_layers, shard.head_dim) == (LAYERS, D)
        assert shard.tensor_parallel == {"rank": rank, "size": size, "num_kv_heads": HEADS}
        assert shard.metadata["model_id"] == "tiny-qwen3" and whole.tensor_parallel is None
        assert torch.equal(shard.k_clip_ratios, whole.k_clip_ratios)
        assert torch.equal(shard.v_clip_ratios, whole.v_clip_ratios)
    for name in PER_HEAD_TENSORS:
        original = getattr(whole, name)
        if shared_rotations and name in SHARED:
            assert all(torch.equal(getattr(s, name), original) for s in shards), name
        else:
            assert torch.equal(torch.cat([getattr(s, name) for s in shards], dim=1), original), name
    # one rank's heads, read the way the cache reads a layer
    assert torch.equal(shards[1].layer_key_tilt(1).maps, whole.k_tilt_maps[1, HEADS // size : 2 * HEADS // size])


def test_size_one_is_the_bundle_itself():
    whole = per_head_bundle()
    assert whole.tensor_parallel_shard(0, 1) is whole


@pytest.mark.parametrize(
    "rank, size, message",
    [
        (0, 3, r"Cannot split these rotations \(4 KV heads\) over 3 tensor-parallel ranks.*\[1, 2, 4\]"),
        (0, 8, r"\(4 KV heads\) over 8"),
        (2, 2, r"Rank 2 is outside a tensor-parallel group of 2 rank\(s\): ranks run from 0 to 1"),
        (-1, 2, r"Rank -1 is outside"),
        (0, 0, r"size must be at least 1, got 0"),
        (0, 2.0, r"size must be an integer, got 2\.0"),
        (True, 2, r"rank must be an integer, got True"),
    ],
)
def test_impossible_shards_are_refused_with_the_reason(rank, size, message):
    with pytest.raises(ValueError, match=message):
        per_head_bundle().tensor_parallel_shard(rank, size)


def test_a_shard_is_not_cut_again(tmp_path):
    shard = per_head_bundle().tensor_parallel_shard(1, 2)
    with pytest.raises(ValueError, match=r"from a shard .*rank 1 of 2, 2 of 4 KV heads.*whole bundle"):
        shard.tensor_parallel_shard(0, 2)


def test_a_shard_is_never_written(tmp_path):
    shard = per_head_bundle().tensor_parallel_shard(0, 2)
    with pytest.raises(ValueError, match=r"Cannot save the tensor-parallel shard of rank 0 of 2: it holds 2 of 4"):
        shard.save_pretrained(tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    with pytest.raises(ValueError, match=r"Cannot push the tensor-parallel shard"):
        shard.push_to_hub("org/never-created", endpoint="http://127.0.0.1:9")  # refused before any request
    with pytest.raises(ValueError, match=r"Cannot export the tensor-parallel shard"):
        export_rotationzoo(shard, tmp_path / "zoo")
    assert not (tmp_path / "zoo").exists()


def test_a_bundle_declaring_itself_a_shard_is_refused(tmp_path):
    import json

    per_head_bundle().save_pretrained(tmp_path)
    path = tmp_path / "oscar_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tensor_parallel": {"rank": 0, "size": 2}}))
    with pytest.raises(ValueError, match=r"oscar_config\.json declares `tensor_parallel`"):
        OscarRotations.from_pretrained(tmp_path)
