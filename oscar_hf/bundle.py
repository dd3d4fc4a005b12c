"""The rotation bundle on disk and on the Hub: one format, three files.

```
rotations.safetensors   k_rotations, v_rotations [L, groups, D, D] float32 (absent for method "naive"),
                        k_clip_ratios, v_clip_ratios [L], k_eigenvalues, v_eigenvalues [L, groups, D] (oscar)
oscar_config.json       format_version, method, grouping, geometry (layers, KV heads, head_dim), model id and
                        revision, windows, calibration provenance, library version, optional evaluation results
README.md               a model card rendered from `hub_cards/rotation_bundle.md`
```

Nothing here unpickles: tensors come from safetensors and everything else from JSON. Loading checks the config against
`CONFIG_SCHEMA` (types and ranges; JSON `true` is not a number) and the tensor shapes in the safetensors header against
the config before any tensor is read. Every file is written to a temporary file in the bundle directory and renamed
over its target, so a link (a Hub snapshot is a folder of links into the cache's shared blobs) is replaced, never
written through. Downloads go through
`huggingface_hub.snapshot_download` (revisions, the local cache and `HF_HUB_OFFLINE=1` come with it) and uploads through
`HfApi.upload_folder`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
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
METHODS = ("naive", "hadamard", "oscar")
# Bounds far above any released model (Llama 3.1 405B: 126 layers, 8 KV heads, head_dim 128) and far below what would
# allocate gigabytes from a few bytes of JSON.
MAX_LAYERS = 1024
MAX_KV_HEADS = 1024
MAX_HEAD_DIM = 4096
# The metadata key that marks the shard of one tensor-parallel rank (`OscarRotations.tensor_parallel_shard`), which is
# never written: its shapes would read as a whole bundle for a model with fewer KV heads.
TENSOR_PARALLEL_KEY = "tensor_parallel"
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


def bundle_config(rot: BundleIO) -> dict[str, Any]:
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_file(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Create or replace `path` with what `write(temporary_path)` writes: a temporary file in the same directory,
    renamed over `path` once complete. A link at `path` is replaced, never written through: a bundle from
    `snapshot_download` is a folder of links into the Hub cache's shared blobs, and writing through one would change
    the cached file of every snapshot (or any other file the link points to). A reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make a shared bundle unreadable to others
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`Path(path).write_text(text)` through `replace_file`: replaces a link at `path` instead of writing through it."""
    return replace_file(path, lambda tmp: Path(tmp).write_text(text))


def refuse_tensor_parallel_shard(rot: BundleIO, action: str) -> None:
    """Raise when `rot` is the shard of one tensor-parallel rank: only whole bundles are written (see
    `OscarRotations.tensor_parallel_shard`)."""
    shard = rot.metadata.get(TENSOR_PARALLEL_KEY)
    if shard is not None:
        raise ValueError(
            f"Cannot {action} the tensor-parallel shard of rank {shard.get('rank')} of {shard.get('size')}: it holds "
            f"{rot.num_kv_heads} of {shard.get('num_kv_heads')} KV heads and would read as a whole bundle for a model "
            "with that many heads. Write the whole bundle; `OscarQuantizedCache` cuts each rank's shard from it."
        )


def save_bundle(rot: BundleIO, save_directory: str | os.PathLike, evaluation: dict | None = None) -> Path:
    """Write the three bundle files into `save_directory` (created if needed); returns the directory. The shard of a
    tensor-parallel rank is refused (`refuse_tensor_parallel_shard`)."""
    from safetensors.torch import save_file

    refuse_tensor_parallel_shard(rot, "save")
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
    header = {"format": LIBRARY_NAME, "format_version": str(FORMAT_VERSION)}
    replace_file(out / TENSORS_FILE, lambda tmp: save_file(tensors, tmp, metadata=header))
    write_text(out / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=False) + "\n")
    write_text(out / CARD_FILE, str(model_card(rot, config)))
    return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON `true` is not a count


def _int_rule(low: int, high: int | None = None, nullable: bool = False) -> tuple[Callable[[Any], bool], str]:
    what = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")
    if high is not None:
        what += f" (at most {high})"

    def check(v):
        return (nullable and v is None) or (_is_int(v) and v >= low and (high is None or v <= high))

    return check, what + (" or null" if nullable else "")


def _any_int_or_null(v) -> bool:
    return v is None or _is_int(v)


_STRING_OR_NULL = (lambda v: v is None or isinstance(v, str), "a string or null")
_OBJECT_OR_NULL = (lambda v: v is None or isinstance(v, dict), "an object or null")
# oscar_config.json, key -> (required, check, what the check wants). Keys not listed are free-form provenance.
CONFIG_SCHEMA: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "format_version": (True, lambda v: _is_int(v) and v in SUPPORTED_FORMAT_VERSIONS,
                       f"one of {list(SUPPORTED_FORMAT_VERSIONS)}"),
    "library": (False, *_STRING_OR_NULL),
    "library_version": (False, *_STRING_OR_NULL),
    "method": (True, lambda v: isinstance(v, str) and v in METHODS, f"one of {list(METHODS)}"),
    "grouping": (False, lambda v: v in (None, "layer", "head"), '"layer", "head" or null'),
    "groups": (False, *_int_rule(0, MAX_KV_HEADS)),
    "num_layers": (True, *_int_rule(1, MAX_LAYERS)),
    "num_kv_heads": (True, *_int_rule(1, MAX_KV_HEADS)),
    "head_dim": (True, *_int_rule(1, MAX_HEAD_DIM)),
    "model_id": (False, *_STRING_OR_NULL),
    "model_revision": (False, *_STRING_OR_NULL),
    "windows": (False, *_OBJECT_OR_NULL),
    "calibration": (False, *_OBJECT_OR_NULL),
    "evaluation": (False, *_OBJECT_OR_NULL),
}
# Nested objects: what the cache and the calibration-overlap guard of oscar-eval read from them.
NESTED_SCHEMA: dict[str, dict[str, tuple[bool, Callable[[Any], bool], str]]] = {
    "windows": {"sink_tokens": (True, *_int_rule(0)), "recent_tokens": (True, *_int_rule(0))},
    "calibration": {
        "data": (False, *_STRING_OR_NULL),
        "offset": (False, _any_int_or_null, "an integer or null"),
        "num_tokens": (False, *_int_rule(0, nullable=True)),
    },
}


def _check_schema(config: dict, schema: dict, where: str, prefix: str = "") -> None:
    for key, (required, check, what) in schema.items():
        if key not in config:
            if required:
                raise ValueError(f"{where} lacks the required key {prefix + key!r} ({what}).")
            continue
        value = config[key]
        if not check(value):
            raise ValueError(
                f"{where}: `{prefix + key}` is {json.dumps(value)}; expected {what}. The file was edited by hand or "
                "written by another tool: re-create the bundle with `oscar-calibrate` or `save_pretrained`."
            )


def check_config(config: Any, where: str = CONFIG_FILE) -> dict[str, Any]:
    """Check the content of an oscar_config.json against `CONFIG_SCHEMA` (types, ranges, nested `windows` and
    `calibration`); raises a `ValueError` naming `where`, the key and what it should hold. Returns `config`."""
    if not isinstance(config, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(config).__name__}.")
    version = config.get("format_version")
    if "format_version" in config and not (_is_int(version) and version in SUPPORTED_FORMAT_VERSIONS):
        raise ValueError(
            f"{where} has format_version {json.dumps(version)}, which this oscar-hf ({_library_version()}) does not "
            f"read (supported: {list(SUPPORTED_FORMAT_VERSIONS)}). Upgrade oscar-hf, or re-create the bundle."
        )
    _check_schema(config, CONFIG_SCHEMA, where)
    if TENSOR_PARALLEL_KEY in config:
        raise ValueError(
            f"{where} declares `{TENSOR_PARALLEL_KEY}`: it describes the shard of one tensor-parallel rank, which "
            "oscar-hf never writes (its shapes would read as a whole bundle for a model with fewer KV heads). Use "
            "the whole bundle; `OscarQuantizedCache` cuts each rank's shard from it."
        )
    for key, schema in NESTED_SCHEMA.items():
        if isinstance(config.get(key), dict):
            _check_schema(config[key], schema, where, prefix=f"{key}.")
    return config


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is corrupt or truncated.") from err
    return check_config(config, str(path))


def _corrupt(path: Path, err: Exception) -> ValueError:
    return ValueError(
        f"{path} is not a readable safetensors file ({err}); it is corrupt or truncated. If the bundle came from the "
        "Hub, download it again with `OscarRotations.from_pretrained(repo_id, force_download=True)`; if it is a local "
        "directory, re-create it (`oscar-calibrate` or `save_pretrained`)."
    )


def _read_tensor_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """`{name: (dtype, shape)}` from the safetensors header, without reading any tensor data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 (a safe_open handle)
            return {name: (piece.get_dtype(), list(piece.get_shape())) for name, piece in slices.items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _corrupt(path, err) from err


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _check_tensor_header(path: Path, header: dict[str, tuple[str, list[int]]], config: dict[str, Any]) -> None:
    """Every tensor of the file is one this version knows, of a float dtype and of the shape that the config's
    geometry implies; checked on the header before anything is loaded."""
    layers, heads, dim = config["num_layers"], config["num_kv_heads"], config["head_dim"]
    groups = (1, heads)
    rotation, vector = (layers, groups, dim, dim), (layers, groups, dim)
    shapes = {
        "k_clip_ratios": [(layers,), (1,), ()],
        "v_clip_ratios": [(layers,), (1,), ()],
        "k_rotations": [rotation], "v_rotations": [rotation], "k_feedback": [rotation], "v_feedback": [rotation],
        "k_eigenvalues": [vector], "v_eigenvalues": [vector], "k_means": [vector],
        "k_tilt_means": [(layers, heads, None, dim)], "k_tilt_maps": [(layers, heads, None, dim, dim)],
    }
    unknown = sorted(set(header) - set(shapes))
    if unknown:
        raise ValueError(
            f"{path} holds tensors this oscar-hf ({_library_version()}) does not know: {unknown}. Ignoring them could "
            "quantize differently from what the bundle means: it was written by a newer oscar-hf (upgrade) or by "
            "another tool."
        )
    missing = [n for n in ("k_clip_ratios", "v_clip_ratios") if n not in header]
    if config["method"] != "naive":
        missing += [n for n in ("k_rotations", "v_rotations") if n not in header]
    if missing:
        raise ValueError(f"{path} lacks the tensors {missing} (method {config['method']!r}).")

    def fits(shape, pattern):
        return len(shape) == len(pattern) and all(
            p is None and s >= 1 or (s in p if isinstance(p, tuple) else s == p) for s, p in zip(shape, pattern)
        )

    def show(pattern):
        return "[" + ", ".join("any" if p is None else " or ".join(map(str, p)) if isinstance(p, tuple) else str(p)
                               for p in pattern) + "]"

    for name, (dtype, shape) in header.items():
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{path}: {name} is {dtype}; bundle tensors are floating point ({', '.join(_FLOAT_DTYPES)})."
            )
        if not any(fits(shape, pattern) for pattern in shapes[name]):
            raise ValueError(
                f"{path}: {name} has shape {list(shape)}, but {CONFIG_FILE} declares num_layers {layers}, num_kv_heads "
                f"{heads}, head_dim {dim} (expected {' or '.join(show(p) for p in shapes[name])}). The two files come "
                "from different bundles: re-create or download the bundle again."
            )
    declared = config.get("groups")
    if declared and "k_rotations" in header and header["k_rotations"][1][1] != declared:
        raise ValueError(
            f"{path}: k_rotations holds {header['k_rotations'][1][1]} rotation(s) per layer, "
            f"but {CONFIG_FILE} declares "
            f"groups {declared}. The two files come from different bundles: re-create or download the bundle again."
        )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _corrupt(path, err) from err


def load_bundle(directory: str | os.PathLike, cls: type) -> BundleIO:
    """Read a bundle directory written by `save_bundle` into `cls` (`OscarRotations`); raises `ValueError` naming the
    file and the problem.

    Order: the config is checked against `CONFIG_SCHEMA`, then the tensor shapes in the safetensors header against
    the config's geometry, and only then are tensors loaded (so a few bytes of JSON or header cannot allocate
    gigabytes) and the values checked (`OscarRotations.validate`).
    """
    root = Path(directory)
    for name in (TENSORS_FILE, CONFIG_FILE):
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"{root} is not an oscar-hf rotation bundle: {name} is missing (a bundle holds {TENSORS_FILE} and "
                f"{CONFIG_FILE}; create one with `oscar-calibrate` or `OscarRotations.save_pretrained`)."
            )
    config = _read_config(root / CONFIG_FILE)
    _check_tensor_header(root / TENSORS_FILE, _read_tensor_header(root / TENSORS_FILE), config)
    tensors = _read_tensors(root / TENSORS_FILE)
    metadata = {k: v for k, v in config.items() if k not in _STRUCTURAL_KEYS}
    try:
        return cls(
            method=config["method"],
            num_layers=config["num_layers"],
            num_kv_heads=config["num_kv_heads"],
            head_dim=config["head_dim"],
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
            bundle_path=str(root),
        )
    except ValueError as err:
        raise ValueError(f"Invalid rotation bundle {root}: {err}") from err


def _looks_local(text: str) -> bool:
    """Whether `text` is meant as a local path rather than a Hub id `namespace/name`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if os.path.isabs(text) or text.startswith((".", "~")):
        return True
    if os.sep in text or (os.altsep and os.altsep in text):
        try:
            validate_repo_id(text)
        except HFValidationError:
            return True
    return False


def resolve_bundle_dir(
    repo_id_or_dir: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> Path:
    """A local directory holding the bundle: `repo_id_or_dir` itself when it is a directory (`~` expanded), else a Hub
    snapshot. A path that looks local (absolute, starting with `.` or `~`, or not a valid Hub id) and does not exist
    raises `FileNotFoundError` instead of being looked up on the Hub; an existing file raises `NotADirectoryError`."""
    text = os.path.expanduser(os.fspath(repo_id_or_dir))
    if os.path.isdir(text):
        return Path(text)
    if os.path.exists(text):
        raise NotADirectoryError(
            f"{text} is a file, not a bundle directory: pass the directory that holds {TENSORS_FILE} and {CONFIG_FILE}."
        )
    if not isinstance(repo_id_or_dir, str) or _looks_local(os.fspath(repo_id_or_dir)):
        raise FileNotFoundError(
            f"{text}: no such directory. Check the path; a Hub repository id has the form 'namespace/name', with no "
            "leading '/', '.' or '~'."
        )
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


def model_card(rot: BundleIO, config: dict[str, Any] | None = None):
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
                geometry.num_layers, geometry.num_kv_heads, geometry.head_dim,
                model_name=model_name(geometry.text_config)
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

        refuse_tensor_parallel_shard(self, "push")  # before the repository is created
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
        write_text(root / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=False) + "\n")
        write_text(root / CARD_FILE, str(model_card(rot, config)))
        return root
