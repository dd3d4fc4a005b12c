"""Bundle format: round trip, and a clear error for every way a bundle can be wrong. RotationZoo import/export."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from oscar_hf import OscarRotations
from oscar_hf.rotationzoo import K_FILENAME, V_FILENAME, export_rotationzoo, load_rotationzoo

SHARED = Path(os.environ.get("OSCAR_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared"))
ZOO = SHARED / "rotationzoo" / "qwen3-4b-thinking-2507"


def _bundle(num_layers=2, heads=2, d=16, groups=1, seed=0) -> OscarRotations:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(num_layers, groups, d, d, generator=g, dtype=torch.float64))
    k_clip = torch.linspace(0.9, 0.98, num_layers)
    return OscarRotations("oscar", num_layers, heads, d, k_clip, torch.full((num_layers,), 0.88),
                          q.float(), q.flip(-2).float(), metadata={"model_id": "org/m"})


def test_save_load_round_trip_is_exact(tmp_path):
    b = _bundle(groups=2)
    b.save_pretrained(tmp_path)
    loaded = OscarRotations.from_pretrained(tmp_path)
    assert torch.equal(loaded.k_rotations, b.k_rotations) and torch.equal(loaded.v_rotations, b.v_rotations)
    assert torch.equal(loaded.k_clip_ratios, b.k_clip_ratios) and loaded.groups == 2
    assert loaded.metadata["model_id"] == "org/m"


def test_bundle_for_another_model_is_rejected_with_the_mismatch_named(tmp_path):
    from transformers import Qwen3Config

    _bundle(num_layers=2, heads=2, d=16).save_pretrained(tmp_path)
    config = Qwen3Config(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                         hidden_size=64, intermediate_size=64, vocab_size=32)
    with pytest.raises(ValueError, match=r"layers: bundle 2.*3.*KV heads: bundle 2.*1.*head_dim: bundle 16.*32"):
        OscarRotations.from_pretrained(tmp_path, config=config)


@pytest.mark.parametrize("cut", [0, 7, 100])
def test_truncated_safetensors_fails_naming_the_file(tmp_path, cut):
    _bundle().save_pretrained(tmp_path)
    path = tmp_path / "rotations.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut else b"not a safetensors file at all")
    with pytest.raises(ValueError, match="rotations.safetensors.*corrupt or truncated"):
        OscarRotations.from_pretrained(tmp_path)


def test_corrupt_config_fails_naming_the_file(tmp_path):
    _bundle().save_pretrained(tmp_path)
    (tmp_path / "oscar_config.json").write_text('{"format_version": 1, "meth')
    with pytest.raises(ValueError, match="oscar_config.json is not valid JSON"):
        OscarRotations.from_pretrained(tmp_path)


def test_unknown_format_version_is_rejected(tmp_path):
    _bundle().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "oscar_config.json").read_text())
    config["format_version"] = 99
    (tmp_path / "oscar_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version 99.*does not read"):
        OscarRotations.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda r: r.__setitem__((1, 0, 3, 3), float("nan")), r"k_rotations holds NaN or Inf values \(layers \[1\]\)"),
        (lambda r: r.mul_(1.5), r"k_rotations of layer 0 is not orthogonal"),
    ],
)
def test_non_finite_or_non_orthogonal_rotation_is_rejected(tmp_path, corrupt, message):
    _bundle().save_pretrained(tmp_path)
    path = tmp_path / "rotations.safetensors"
    tensors = load_file(str(path))
    corrupt(tensors["k_rotations"])
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=message):
        OscarRotations.from_pretrained(tmp_path)


def test_missing_file_names_what_a_bundle_holds(tmp_path):
    _bundle().save_pretrained(tmp_path)
    (tmp_path / "rotations.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="rotations.safetensors is missing"):
        OscarRotations.from_pretrained(tmp_path)


def test_zoo_pickle_with_arbitrary_objects_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / K_FILENAME, "wb") as f:
        pickle.dump({"format_version": 1, "objective": "qqt_r_h_pbr", "layers": Evil()}, f)
    (tmp_path / V_FILENAME).write_bytes((tmp_path / K_FILENAME).read_bytes())
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_rotationzoo(tmp_path)


def test_zoo_export_then_import_round_trips_per_head_bundles(tmp_path):
    b = _bundle(groups=2)
    export_rotationzoo(b, tmp_path)
    state = torch.load(tmp_path / K_FILENAME, weights_only=True)
    assert state["objective"] == "qqt_r_h_pbr" and state["source_grouping"] == "head"
    back = load_rotationzoo(tmp_path, num_kv_heads=2)
    assert torch.equal(back.k_rotations, b.k_rotations) and torch.equal(back.v_rotations, b.v_rotations)


def test_zoo_swapped_k_and_v_files_are_named(tmp_path):
    export_rotationzoo(_bundle(), tmp_path)
    with pytest.raises(ValueError, match="swapped"):
        load_rotationzoo(tmp_path / V_FILENAME, tmp_path / K_FILENAME)


@pytest.mark.skipif(not ZOO.is_dir(), reason=f"RotationZoo sample not found at {ZOO} (set OSCAR_SHARED)")
def test_real_rotationzoo_files_import_export_and_bundle_round_trip(tmp_path):
    rot = load_rotationzoo(ZOO, num_kv_heads=8, model_id="Qwen/Qwen3-4B-Thinking-2507")
    assert (rot.num_layers, rot.groups, rot.head_dim) == (36, 1, 128)
    # eigh order, as our construction stores it: ascending spectra.
    assert (rot.k_eigenvalues.diff(dim=-1) >= 0).all() and (rot.v_eigenvalues.diff(dim=-1) >= 0).all()
    export_rotationzoo(rot, tmp_path / "zoo")
    for name in (K_FILENAME, V_FILENAME):
        original = torch.load(ZOO / name, weights_only=True)
        exported = torch.load(tmp_path / "zoo" / name, weights_only=True)
        assert {k: v for k, v in original.items() if k != "layers"} == {k: v for k, v in exported.items() if k != "layers"}
        for i in range(36):
            assert torch.equal(original["layers"][i]["rotation"], exported["layers"][i]["rotation"])
            assert torch.equal(original["layers"][i]["eigenvalues"], exported["layers"][i]["eigenvalues"])
    rot.save_pretrained(tmp_path / "bundle")
    again = OscarRotations.from_pretrained(tmp_path / "bundle")
    assert torch.equal(again.k_rotations, rot.k_rotations)
