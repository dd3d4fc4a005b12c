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
        assert {k: v for k, v in original.items() if k != "layers"} == {
            k: v for k, v in exported.items() if k != "layers"
        }
        for i in range(36):
            assert torch.equal(original["layers"][i]["rotation"], exported["layers"][i]["rotation"])
            assert torch.equal(original["layers"][i]["eigenvalues"], exported["layers"][i]["eigenvalues"])
    rot.save_pretrained(tmp_path / "bundle")
    again = OscarRotations.from_pretrained(tmp_path / "bundle")
    assert torch.equal(again.k_rotations, rot.k_rotations)


# --- Writing never goes through a link (issue 21, class 6) ---------------------------------------------------------


def _linked_bundle(tmp_path):
    """A bundle laid out as `snapshot_download` leaves it: a folder of links into shared blobs."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    _bundle().save_pretrained(blobs)
    snapshot.mkdir()
    for name in ("rotations.safetensors", "oscar_config.json", "README.md"):
        (snapshot / name).symlink_to(blobs / name)
    return blobs, snapshot


def test_attach_evaluation_replaces_links_instead_of_rewriting_the_shared_blobs(tmp_path):
    blobs, snapshot = _linked_bundle(tmp_path)
    before = {p.name: p.read_bytes() for p in blobs.iterdir()}
    evaluation = {"metrics": ["kl_mean"], "results": {"oscar": {"kl_mean": 0.5}}}
    OscarRotations.attach_evaluation(snapshot, evaluation)
    assert {p.name: p.read_bytes() for p in blobs.iterdir()} == before
    for name in ("oscar_config.json", "README.md"):
        assert not (snapshot / name).is_symlink()
    assert (snapshot / "rotations.safetensors").is_symlink()  # the tensors are not rewritten at all
    assert json.loads((snapshot / "oscar_config.json").read_text())["evaluation"] == evaluation
    assert OscarRotations.from_pretrained(snapshot).metadata["evaluation"] == evaluation


def test_save_pretrained_over_links_leaves_their_targets_alone(tmp_path):
    blobs, snapshot = _linked_bundle(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (snapshot / "README.md").unlink()
    (snapshot / "README.md").symlink_to(victim)
    before = {p.name: p.read_bytes() for p in blobs.iterdir()}
    other = _bundle(seed=1)
    other.save_pretrained(snapshot)
    assert victim.read_text() == "precious"
    assert {p.name: p.read_bytes() for p in blobs.iterdir()} == before
    assert not any(p.is_symlink() for p in snapshot.iterdir())
    assert sorted(p.name for p in snapshot.iterdir()) == ["README.md", "oscar_config.json", "rotations.safetensors"]
    assert torch.equal(OscarRotations.from_pretrained(snapshot).k_rotations, other.k_rotations)
    assert oct((snapshot / "oscar_config.json").stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


# --- The whole config is checked against a schema before any tensor is read (issue 21, class 8) --------------------


def _edit_config(path, **changes):
    config = json.loads((path / "oscar_config.json").read_text())
    config.update(changes)
    (path / "oscar_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_layers": None}, r"num_layers.*null.*positive integer"),
        ({"num_layers": 2.9}, r"num_layers.*2\.9.*positive integer"),
        ({"num_layers": [2]}, r"num_layers.*\[2\].*positive integer"),
        ({"num_layers": True}, r"num_layers.*true.*positive integer"),
        ({"num_kv_heads": 0}, r"num_kv_heads.*0.*positive integer"),
        ({"head_dim": "16"}, r"head_dim.*\"16\".*positive integer"),
        ({"format_version": True}, r"format_version true"),
        ({"method": ["oscar"]}, r"method.*one of"),
        ({"method": "fancy"}, r"method.*\"fancy\".*one of"),
        ({"model_id": 3}, r"model_id.*3.*string or null"),
        ({"windows": {"sink_tokens": -1, "recent_tokens": 256}}, r"windows.sink_tokens.*-1.*non-negative integer"),
        ({"windows": [64, 256]}, r"windows.*object"),
        ({"calibration": {"offset": "0"}}, r"calibration.offset.*\"0\".*integer"),
        ({"evaluation": "great"}, r"evaluation.*object"),
    ],
)
def test_config_fields_of_the_wrong_type_are_named(tmp_path, changes, message):
    _bundle().save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=r"oscar_config\.json.*" + message):
        OscarRotations.from_pretrained(tmp_path)


def test_a_config_declaring_a_billion_layers_is_refused_before_any_allocation(tmp_path):
    _bundle().save_pretrained(tmp_path)
    _edit_config(tmp_path, num_layers=10**9)
    with pytest.raises(ValueError, match=r"num_layers.*1000000000.*at most"):
        OscarRotations.from_pretrained(tmp_path)


def test_config_geometry_is_checked_against_the_tensor_shapes_before_loading(tmp_path, monkeypatch):
    import safetensors.torch

    _bundle(num_layers=2).save_pretrained(tmp_path)
    _edit_config(tmp_path, num_layers=3)

    def no_load(*args, **kwargs):
        raise AssertionError("tensors were loaded before the shapes were checked")

    monkeypatch.setattr(safetensors.torch, "load_file", no_load)
    with pytest.raises(ValueError, match=r"k_clip_ratios has shape \[2\].*num_layers 3"):
        OscarRotations.from_pretrained(tmp_path)


def test_declared_groups_must_match_the_rotations(tmp_path):
    _bundle(groups=1).save_pretrained(tmp_path)
    _edit_config(tmp_path, groups=2, grouping="head")
    with pytest.raises(ValueError, match=r"k_rotations holds 1 rotation\(s\) per layer.*declares groups 2"):
        OscarRotations.from_pretrained(tmp_path)


def test_unknown_tensors_are_refused_rather_than_ignored(tmp_path):
    _bundle().save_pretrained(tmp_path)
    path = tmp_path / "rotations.safetensors"
    tensors = load_file(str(path))
    tensors["k_new_thing"] = torch.zeros(2)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"k_new_thing.*newer oscar-hf"):
        OscarRotations.from_pretrained(tmp_path)


def test_a_naive_bundle_carrying_rotations_is_refused(tmp_path):
    _bundle().save_pretrained(tmp_path)
    _edit_config(tmp_path, method="naive")
    with pytest.raises(ValueError, match=r"naive.*carries k_rotations"):
        OscarRotations.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"naive.*carries k_rotations"):
        b = _bundle()
        OscarRotations("naive", 2, 2, 16, b.k_clip_ratios, b.v_clip_ratios, b.k_rotations, b.v_rotations)


@pytest.mark.parametrize(
    "eigenvalues, message",
    [
        (torch.full((2, 1, 16), float("nan")), "k_eigenvalues holds NaN or Inf"),
        (-torch.ones(2, 1, 16), "k_eigenvalues.*negative"),
        (torch.ones(2, 1, 8), r"k_eigenvalues has shape \(2, 1, 8\)"),
    ],
)
def test_eigenvalues_are_checked(eigenvalues, message):
    b = _bundle()
    with pytest.raises(ValueError, match=message):
        OscarRotations("oscar", 2, 2, 16, b.k_clip_ratios, b.v_clip_ratios, b.k_rotations, b.v_rotations,
                       eigenvalues, torch.ones(2, 1, 16))


def test_recorded_windows_are_exposed(tmp_path):
    b = _bundle()
    b.metadata["windows"] = {"sink_tokens": 32, "recent_tokens": 128}
    b.save_pretrained(tmp_path)
    assert OscarRotations.from_pretrained(tmp_path).windows == {"sink_tokens": 32, "recent_tokens": 128}
    assert OscarRotations.data_free("hadamard", 2, 2, 32).windows is None


def test_a_bundle_without_a_model_id_is_not_said_to_be_made_for_none(tmp_path):
    from transformers import Qwen3Config

    b = _bundle()
    b.metadata["model_id"] = None
    b.save_pretrained(tmp_path)
    config = Qwen3Config(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         hidden_size=64, intermediate_size=64, vocab_size=32)
    with pytest.raises(ValueError) as err:
        OscarRotations.from_pretrained(tmp_path, config=config)
    assert "None" not in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(ValueError, match="made for an unknown model"):
        OscarRotations.data_free("hadamard", 2, 2, 16).check_compatible(3, 2, 16)


@pytest.mark.parametrize("path", ["/no/such/bundle", "./no_such_bundle", "~/no_such_bundle_xyz", "a/b/c"])
def test_a_mistyped_local_path_is_reported_as_a_missing_directory(path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        OscarRotations.from_pretrained(path)


def test_a_file_given_as_bundle_directory_is_named(tmp_path):
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match="is a file"):
        OscarRotations.from_pretrained(tmp_path / "f.json")


def test_a_home_relative_bundle_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _bundle().save_pretrained(tmp_path / "b")
    assert OscarRotations.from_pretrained("~/b").num_layers == 2


def test_zoo_export_over_links_leaves_their_targets_alone(tmp_path):
    victim = tmp_path / "victim.pt"
    victim.write_bytes(b"precious")
    out = tmp_path / "zoo"
    out.mkdir()
    (out / K_FILENAME).symlink_to(victim)
    export_rotationzoo(_bundle(), out)
    assert victim.read_bytes() == b"precious" and not (out / K_FILENAME).is_symlink()
    assert torch.load(out / K_FILENAME, weights_only=True)["objective"] == "qqt_r_h_pbr"
