"""The rotation bundle on disk and on the Hub: one format, three files.

```
rotations.safetensors   k_rotations, v_rotations [L, groups, D, D] float32 (absent for method "naive"),
                        k_clip_ratios, v_clip_ratios [L], k_eigenvalues, v_eigenvalues [L, groups, D] (oscar)
oscar_config.json       format_version, method, grouping, geometry (layers, KV heads, head_dim), model id and
                        revision, windows, calibration provenance, library version, optional evaluation results
README.md               a model card rendered from `hub_cards/rotation_bundle.md`
```

Nothing here unpickles: tensors come from safetensors and everything else from JSON. Downloads go through
`huggingface_hub.snapshot_download` (revisions, the local cache and `HF_HUB_OFFLINE=1` come with it) and uploads through
`HfApi.upload_folder`.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .geometry import model_geometry, model_name

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
TENSORS_FILE = "rotations.safetensors"
CONFIG_FILE = "oscar_config.json"
CARD_FILE = "README.md"
BUNDLE_FILES = (TENSORS_FILE, CONFIG_FILE, CARD_FILE)
LIBRARY_NAME = "oscar-hf"
# Keys of oscar_config.json that describe the tensors; everything else is provenance kept in `metadata`.
_STRUCTURAL_KEYS = ("format_version", "library", "method", "num_layers", "num_kv_heads", "head_dim", "groups")


def _library_version() -> str:
    try:
        from importlib.metadata import version

        return version("oscar-hf")
    except Exception:  # pragma: no cover - running from a source tree that is not installed
        return "unknown"


def grouping_name(groups: int, num_kv_heads: int) -> str:
    """`"layer"` (one rotation shared by the KV heads of a layer) or `"head"` (one per KV head)."""
    return "layer" if groups == 1 else "head"


def bundle_config(rot: "BundleIO") -> dict[str, Any]:
    """The content of `oscar_config.json` for a bundle."""
    meta = dict(rot.metadata)
    config = {
        "format_version": FORMAT_VERSION,
        "library": LIBRARY_NAME,
        "library_version": meta.pop("library_version", None) or _library_version(),
        "method": rot.method,
        "grouping": grouping_name(rot.groups, rot.num_kv_heads) if rot.k_rotations is not None else None,
        "groups": rot.groups if rot.k_rotations is not None else 0,
        "num_layers": rot.num_layers,
        "num_kv_heads": rot.num_kv_heads,
        "head_dim": rot.head_dim,
        "model_id": meta.pop("model_id", None),
        "model_revision": meta.pop("model_revision", None),
        "windows": meta.pop("windows", {"sink_tokens": 64, "recent_tokens": 256}),
        "calibration": meta.pop("calibration", None),
    }
    meta.pop("grouping", None)
    config.update(meta)  # evaluation results and any other provenance
    return config


def save_bundle(rot: "BundleIO", save_directory: str | os.PathLike, evaluation: dict | None = None) -> Path:
    """Write the three bundle files into `save_directory` (created if needed); returns the directory."""
    from safetensors.torch import save_file

    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"k_clip_ratios": rot.k_clip_ratios, "v_clip_ratios": rot.v_clip_ratios}
    for name in ("k_rotations", "v_rotations", "k_eigenvalues", "v_eigenvalues", "k_feedback", "v_feedback", "k_means",
                 "k_tilt_means", "k_tilt_maps"):
        value = getattr(rot, name)
        if value is not None:
            tensors[name] = value
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    config = bundle_config(rot)
    if evaluation is not None:
        config["evaluation"] = evaluation
    save_file(tensors, str(out / TENSORS_FILE), metadata={"format": LIBRARY_NAME, "format_version": str(FORMAT_VERSION)})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    (out / CARD_FILE).write_text(str(model_card(rot, config)))
    return out


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is corrupt or truncated.") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}.")
    version = config.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(
            f"{path} has format_version {version!r}, which this oscar-hf ({_library_version()}) does not read "
            f"(supported: {list(SUPPORTED_FORMAT_VERSIONS)}). Upgrade oscar-hf, or re-create the bundle."
        )
    for key in ("method", "num_layers", "num_kv_heads", "head_dim"):
        if key not in config:
            raise ValueError(f"{path} lacks the required key {key!r}.")
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}); it is corrupt or truncated. Delete it and download "
            "the bundle again (`from_pretrained(..., force_download=True)`)."
        ) from err


def load_bundle(directory: str | os.PathLike, cls: type) -> "BundleIO":
    """Read a bundle directory written by `save_bundle` into `cls` (`OscarRotations`); raises `ValueError` naming the
    file and the problem."""
    root = Path(directory)
    for name in (TENSORS_FILE, CONFIG_FILE):
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"{root} is not an oscar-hf rotation bundle: {name} is missing (a bundle holds {TENSORS_FILE} and "
                f"{CONFIG_FILE}; create one with `oscar-calibrate` or `OscarRotations.save_pretrained`)."
            )
    config = _read_config(root / CONFIG_FILE)
    tensors = _read_tensors(root / TENSORS_FILE)
    missing = [n for n in ("k_clip_ratios", "v_clip_ratios") if n not in tensors]
    if config["method"] != "naive":
        missing += [n for n in ("k_rotations", "v_rotations") if n not in tensors]
    if missing:
        raise ValueError(f"{root / TENSORS_FILE} lacks the tensors {missing}.")
    metadata = {k: v for k, v in config.items() if k not in _STRUCTURAL_KEYS}
    try:
        return cls(
            method=config["method"],
            num_layers=int(config["num_layers"]),
            num_kv_heads=int(config["num_kv_heads"]),
            head_dim=int(config["head_dim"]),
            k_clip_ratios=tensors["k_clip_ratios"],
            v_clip_ratios=tensors["v_clip_ratios"],
            k_rotations=tensors.get("k_rotations"),
            v_rotations=tensors.get("v_rotations"),
            k_eigenvalues=tensors.get("k_eigenvalues"),
            v_eigenvalues=tensors.get("v_eigenvalues"),
            metadata=metadata,
            k_feedback=tensors.get("k_feedback"),
            v_feedback=tensors.get("v_feedback"),
            k_means=tensors.get("k_means"),
            k_tilt_means=tensors.get("k_tilt_means"),
            k_tilt_maps=tensors.get("k_tilt_maps"),
        )
    except ValueError as err:
        raise ValueError(f"Invalid rotation bundle {root}: {err}") from err


def resolve_bundle_dir(
    repo_id_or_dir: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> Path:
    """A local directory holding the bundle: `repo_id_or_dir` itself when it is a directory, else a Hub snapshot."""
    if os.path.isdir(repo_id_or_dir):
        return Path(repo_id_or_dir)
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        repo_id=str(repo_id_or_dir),
        revision=revision,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
        token=token,
        endpoint=endpoint,
        allow_patterns=list(BUNDLE_FILES),
    )
    return Path(path)


def _card_template() -> str:
    return resources.files("oscar_hf.hub_cards").joinpath("rotation_bundle.md").read_text()


def model_card(rot: "BundleIO", config: dict[str, Any] | None = None):
    """A `huggingface_hub.ModelCard` for the bundle: YAML metadata, usage, calibration details and, when the config
    holds an `evaluation` entry, a quality table."""
    from huggingface_hub import ModelCard, ModelCardData

    config = config or bundle_config(rot)
    model_id = config.get("model_id")
    card_data = ModelCardData(
        base_model=model_id if model_id and not os.path.isdir(str(model_id)) else None,
        library_name=LIBRARY_NAME,
        tags=["oscar", "kv-cache", "quantization", "int2", "rotation"],
        license="apache-2.0",
    )
    k = rot.k_clip_ratios.tolist()
    v = rot.v_clip_ratios.tolist()
    clip_rows = [(i, k[i], v[i]) for i in range(rot.num_layers)]
    evaluation = config.get("evaluation")
    return ModelCard.from_template(
        card_data,
        template_str=_card_template(),
        config=config,
        clip_rows=clip_rows,
        evaluation=evaluation,
        model_id=model_id or "unknown model",
    )


class BundleIO:
    """`save_pretrained` / `from_pretrained` / `push_to_hub` / `model_card` of a rotation bundle, for `OscarRotations`
    to inherit (as `huggingface_hub.ModelHubMixin` gives models theirs): the bundle format lives in this module only."""

    def save_pretrained(self, save_directory, evaluation: dict | None = None) -> Path:
        """Write `rotations.safetensors`, `oscar_config.json` and a `README.md` model card into `save_directory`.

        `evaluation`, if given, is stored in the config and fills the card's quality table:
        `{"metrics": ["kl_mean", ...], "results": {"oscar": {"kl_mean": ...}, "hadamard": {...}}, "description": str}`.
        """
        return save_bundle(self, save_directory, evaluation=evaluation)

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir,
        revision: str | None = None,
        *,
        cache_dir=None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        endpoint: str | None = None,
        config=None,
    ):
        """Load a bundle from a local directory or a Hub repository (`revision`: branch, tag or commit).

        Hub downloads go through the local cache, so `HF_HUB_OFFLINE=1` works once a bundle has been fetched. With
        `config` (a model config), the bundle is also checked against the model's layers, KV heads and head_dim.
        """
        directory = resolve_bundle_dir(
            repo_id_or_dir,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            endpoint=endpoint,
        )
        rotations = load_bundle(directory, cls)
        if config is not None:
            geometry = model_geometry(config)
            rotations.check_compatible(
                geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, model_name=model_name(geometry.text_config)
            )
        return rotations

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str = "Upload OSCAR rotation bundle",
        create_pr: bool = False,
        endpoint: str | None = None,
        evaluation: dict | None = None,
    ):
        """Create `repo_id` if needed and upload the bundle (the files of `save_pretrained`) in one commit; returns
        the `CommitInfo`."""
        from huggingface_hub import HfApi

        api = HfApi(endpoint=endpoint, token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            save_bundle(self, tmp, evaluation=evaluation)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
            )

    def model_card(self):
        """The `huggingface_hub.ModelCard` that `save_pretrained` writes as README.md."""
        return model_card(self)

    @classmethod
    def attach_evaluation(cls, directory: str | os.PathLike, evaluation: dict) -> Path:
        """Store `evaluation` (the format `model_card` reads: description, metrics, results) in a local bundle's
        oscar_config.json and re-render its README.md; the tensors are left untouched. Returns the directory."""
        root = Path(directory)
        rot = load_bundle(root, cls)  # validates the bundle before anything is rewritten
        config = _read_config(root / CONFIG_FILE)
        config["evaluation"] = evaluation
        (root / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        (root / CARD_FILE).write_text(str(model_card(rot, config)))
        return root
