"""The Hub round trip with the real huggingface_hub client against a local in-memory Hub (tests/hub_server.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import LocalHub  # noqa: E402

from oscar_hf import OscarRotations  # noqa: E402
from oscar_hf.quantization import hadamard_matrix  # noqa: E402


def _random_bundle(num_layers=3, heads=2, d=32, groups=1, seed=0) -> OscarRotations:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(num_layers, groups, d, d, generator=g, dtype=torch.float64))
    v = q.flip(-1) @ hadamard_matrix(d)
    return OscarRotations(
        "oscar", num_layers, heads, d,
        torch.rand(num_layers, generator=g) * 0.1 + 0.9, torch.rand(num_layers, generator=g) * 0.1 + 0.85,
        q.float(), v.float(), torch.rand(num_layers, groups, d, generator=g),
        torch.rand(num_layers, groups, d, generator=g),
        metadata={"model_id": "org/base-model", "calibration": {"data": "x.npy", "num_tokens": 123}},
    )


@pytest.fixture
def hub(monkeypatch):
    with LocalHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        # HF_ENDPOINT is read when huggingface_hub is imported: patch the constants derived from it as well.
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        yield hub


def test_push_then_download_then_offline_load_gives_identical_bundle(hub, tmp_path, monkeypatch):
    original = _random_bundle()
    evaluation = {"metrics": ["kl_mean"], "results": {"oscar": {"kl_mean": 0.01}, "hadamard": {"kl_mean": 0.04}}}
    info = original.push_to_hub("org/rotations", token="hf_test", endpoint=hub.endpoint, evaluation=evaluation)
    sha = info.oid
    assert len(sha) == 40
    assert set(hub.state.repos["org/rotations"]["commits"][sha]) == {
        "rotations.safetensors", "oscar_config.json", "README.md"
    }
    assert not hub.state.unhandled

    cache_dir = tmp_path / "hf_cache"
    online = OscarRotations.from_pretrained(
        "org/rotations", cache_dir=cache_dir, token="hf_test", endpoint=hub.endpoint
    )
    for name in ("k_rotations", "v_rotations", "k_eigenvalues", "v_eigenvalues", "k_clip_ratios", "v_clip_ratios"):
        assert torch.equal(getattr(online, name), getattr(original, name)), name
    assert online.metadata["model_id"] == "org/base-model"
    assert online.metadata["evaluation"]["results"]["oscar"]["kl_mean"] == 0.01
    card = (next(cache_dir.rglob("README.md"))).read_text()
    assert "base_model: org/base-model" in card and "library_name: oscar-hf" in card and "| oscar | 0.01 |" in card

    # Offline: no request may reach the server, the cached snapshot must serve the same bundle.
    served = len(hub.state.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = OscarRotations.from_pretrained("org/rotations", cache_dir=cache_dir)
    assert len(hub.state.requests) == served
    assert torch.equal(offline.k_rotations, original.k_rotations)


def test_revision_pins_an_older_commit(hub, tmp_path):
    first = _random_bundle(seed=1)
    second = _random_bundle(seed=2)
    sha1 = first.push_to_hub("org/rot", token="hf_test", endpoint=hub.endpoint).oid
    second.push_to_hub("org/rot", token="hf_test", endpoint=hub.endpoint)
    latest = OscarRotations.from_pretrained("org/rot", cache_dir=tmp_path, endpoint=hub.endpoint, token="hf_test")
    pinned = OscarRotations.from_pretrained("org/rot", revision=sha1, cache_dir=tmp_path, endpoint=hub.endpoint,
                                            token="hf_test")
    assert torch.equal(latest.k_rotations, second.k_rotations)
    assert torch.equal(pinned.k_rotations, first.k_rotations)


def test_offline_without_cached_bundle_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Exception, match="(?i)offline|cache|local"):
        OscarRotations.from_pretrained("org/never-downloaded", cache_dir=tmp_path)


def test_saved_config_records_format_and_grouping(tmp_path):
    bundle = _random_bundle(groups=2)
    bundle.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "oscar_config.json").read_text())
    assert config["format_version"] == 1 and config["grouping"] == "head" and config["groups"] == 2
    assert (config["num_layers"], config["num_kv_heads"], config["head_dim"]) == (3, 2, 32)


def test_updating_the_card_of_a_downloaded_snapshot_leaves_the_hub_cache_blobs_alone(hub, tmp_path):
    from huggingface_hub import snapshot_download

    _random_bundle().push_to_hub("org/rot", token="hf_test", endpoint=hub.endpoint)
    cache_dir = tmp_path / "hf_cache"
    snapshot = Path(snapshot_download("org/rot", cache_dir=cache_dir, endpoint=hub.endpoint, token="hf_test"))
    assert (snapshot / "README.md").is_symlink()  # the layout this guards: links into blobs/
    blobs = {p: p.read_bytes() for p in cache_dir.rglob("blobs/*")}
    OscarRotations.attach_evaluation(snapshot, {"metrics": ["kl_mean"], "results": {"oscar": {"kl_mean": 0.25}}})
    assert {p: p.read_bytes() for p in cache_dir.rglob("blobs/*")} == blobs
    assert "| oscar | 0.25 |" in (snapshot / "README.md").read_text()


def test_the_advice_for_a_corrupt_cached_bundle_works(hub, tmp_path):
    original = _random_bundle()
    original.push_to_hub("org/rot", token="hf_test", endpoint=hub.endpoint)
    kwargs = {"cache_dir": tmp_path, "endpoint": hub.endpoint, "token": "hf_test"}
    OscarRotations.from_pretrained("org/rot", **kwargs)
    blob = next(tmp_path.rglob("rotations.safetensors")).resolve()
    blob.write_bytes(blob.read_bytes()[:100])
    with pytest.raises(
        ValueError, match=r"corrupt or truncated.*OscarRotations.from_pretrained\(repo_id, force_download=True\)"
    ):
        OscarRotations.from_pretrained("org/rot", **kwargs)
    again = OscarRotations.from_pretrained("org/rot", force_download=True, **kwargs)
    assert torch.equal(again.k_rotations, original.k_rotations)


def test_the_cache_forwards_force_download_and_endpoint_to_the_hub(hub, tmp_path):
    from transformers import Qwen3Config

    from oscar_hf import OscarQuantizedCache

    original = _random_bundle()
    original.push_to_hub("org/rot", token="hf_test", endpoint=hub.endpoint)
    config = Qwen3Config(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_size=64)
    kwargs = {"cache_dir": tmp_path, "endpoint": hub.endpoint, "token": "hf_test"}
    OscarQuantizedCache.from_pretrained("org/rot", config, **kwargs)
    blob = next(tmp_path.rglob("rotations.safetensors")).resolve()
    blob.write_bytes(blob.read_bytes()[:100])
    cache = OscarQuantizedCache.from_pretrained("org/rot", config, force_download=True, **kwargs)
    assert torch.equal(cache.rotations.k_rotations, original.k_rotations)
