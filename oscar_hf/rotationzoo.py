"""Import and export of the public OSCAR RotationZoo `.pt` files (the SGLang and llama.cpp OSCAR forks read them).

Layout: one file per tensor kind, a dict
`{format_version: 1, objective: "qqt_r_h_pbr" (K) | "sst_r_h_pbr" (V), source_grouping: "layer",
  layers: {layer_id: {layer_id, rotation: float32 [D, D], eigenvalues: float32 [D]}}}`.

Convention: the zoo's rotation acts on row vectors exactly as ours does (`k @ R`): the OSCAR decode path rotates the
query as `q @ R_k` and un-rotates the output as `o @ R_v^T`, and its llama.cpp export stores `R^T` so that
`ggml_mul_mat(rot, K) = K @ R`. The matrices are `U . H . P_br` with U the `eigh` eigenvectors (columns, eigenvalues
ascending as stored), which is also our construction, so matrices are imported and exported unchanged.

The files are pickles: they are only ever read with `torch.load(..., weights_only=True)`, which refuses anything but
tensors and plain containers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .bundle import refuse_tensor_parallel_shard, replace_file
from .rotations import DEFAULT_K_CLIP, DEFAULT_V_CLIP, OscarRotations

ZOO_FORMAT_VERSION = 1
K_OBJECTIVE = "qqt_r_h_pbr"
V_OBJECTIVE = "sst_r_h_pbr"
K_FILENAME = f"k_rotation_{K_OBJECTIVE}.pt"
V_FILENAME = f"v_rotation_{V_OBJECTIVE}.pt"


def _load_zoo_file(path: Path, objective: str) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """`(rotations [L, groups, D, D], eigenvalues [L, groups, D] or None, source_grouping)` from one zoo file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights-only refusals all land here
        raise ValueError(
            f"{path} could not be read as a RotationZoo file with torch.load(weights_only=True) ({err}); it is "
            "corrupt, truncated, or holds objects other than tensors."
        ) from err
    if not isinstance(state, dict) or "layers" not in state:
        raise ValueError(f"{path} is not a RotationZoo file: expected a dict with a 'layers' entry.")
    if state.get("format_version") != ZOO_FORMAT_VERSION:
        raise ValueError(
            f"{path} has RotationZoo format_version {state.get('format_version')!r}; only {ZOO_FORMAT_VERSION} is "
            "supported."
        )
    if state.get("objective") != objective:
        raise ValueError(
            f"{path} has objective {state.get('objective')!r} but {objective!r} was expected "
            f"(K files are {K_OBJECTIVE!r}, V files {V_OBJECTIVE!r}): were the K and V files swapped?"
        )
    layers = state["layers"]
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path}: 'layers' must be a non-empty dict of layer_id -> entry.")
    ids = sorted(int(k) for k in layers)
    if ids != list(range(len(ids))):
        raise ValueError(f"{path}: layer ids must be 0..{len(ids) - 1}, got {ids}.")
    by_id = {int(k): v for k, v in layers.items()}
    rotations, eigenvalues = [], []
    for i in ids:
        entry = by_id[i]
        rot = entry.get("rotation") if isinstance(entry, dict) else None
        if not isinstance(rot, torch.Tensor) or rot.dim() not in (2, 3) or rot.shape[-1] != rot.shape[-2]:
            raise ValueError(f"{path}: layer {i} has no square 'rotation' tensor ([D, D] or [heads, D, D]).")
        rot = rot.float()
        rotations.append(rot if rot.dim() == 3 else rot.unsqueeze(0))
        ev = entry.get("eigenvalues")
        eigenvalues.append(None if ev is None else ev.float().reshape(rotations[-1].shape[0], -1))
    shapes = {tuple(r.shape) for r in rotations}
    if len(shapes) != 1:
        raise ValueError(f"{path}: layers have different rotation shapes {sorted(shapes)}.")
    ev = None if any(e is None for e in eigenvalues) else torch.stack(eigenvalues)
    return torch.stack(rotations), ev, str(state.get("source_grouping", "layer"))


def load_rotationzoo(
    k_path: str | os.PathLike,
    v_path: str | os.PathLike | None = None,
    *,
    num_kv_heads: int | None = None,
    k_clip_ratio: float = DEFAULT_K_CLIP,
    v_clip_ratio: float = DEFAULT_V_CLIP,
    model_id: str | None = None,
) -> OscarRotations:
    """Import a RotationZoo K/V pair as an `OscarRotations` (method `"oscar"`).

    `k_path` may be the directory holding both files. The zoo files do not record the KV-head count; pass
    `num_kv_heads` (the model's) so that the bundle checks against the model, else it is taken as the number of
    per-head rotations (1 for the usual per-layer files). Clip ratios default to the reference 0.96 / 0.92.
    """
    k_path = Path(k_path)
    if k_path.is_dir():
        k_path, v_path = k_path / K_FILENAME, k_path / V_FILENAME if v_path is None else Path(v_path)
    if v_path is None:
        raise ValueError("Pass the V rotation file too (or the directory holding both RotationZoo files).")
    k_rot, k_ev, k_group = _load_zoo_file(Path(k_path), K_OBJECTIVE)
    v_rot, v_ev, _ = _load_zoo_file(Path(v_path), V_OBJECTIVE)
    if k_rot.shape != v_rot.shape:
        raise ValueError(f"K rotations {tuple(k_rot.shape)} and V rotations {tuple(v_rot.shape)} do not match.")
    num_layers, groups, head_dim = k_rot.shape[0], k_rot.shape[1], k_rot.shape[-1]
    return OscarRotations(
        method="oscar",
        num_layers=num_layers,
        num_kv_heads=num_kv_heads or groups,
        head_dim=head_dim,
        k_clip_ratios=torch.tensor(k_clip_ratio),
        v_clip_ratios=torch.tensor(v_clip_ratio),
        k_rotations=k_rot,
        v_rotations=v_rot,
        k_eigenvalues=k_ev,
        v_eigenvalues=v_ev,
        metadata={
            "model_id": model_id,
            "calibration": {"source": "RotationZoo", "k_file": Path(k_path).name, "v_file": Path(v_path).name,
                            "source_grouping": k_group},
        },
    )


def export_rotationzoo(rotations: OscarRotations, directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write `rotations` as a RotationZoo K/V pair into `directory`; returns the two paths.

    Per-layer bundles give `[D, D]` rotations (`source_grouping: "layer"`); per-head bundles `[heads, D, D]`
    (`"head"`), which the OSCAR SGLang fork also reads. Clip ratios are not part of the zoo format.
    """
    if rotations.k_rotations is None:
        raise ValueError(f"method={rotations.method!r} has no rotations to export.")
    refuse_tensor_parallel_shard(rotations, "export")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    grouping = "layer" if rotations.groups == 1 else "head"
    paths = []
    for rot, ev, objective, name in (
        (rotations.k_rotations, rotations.k_eigenvalues, K_OBJECTIVE, K_FILENAME),
        (rotations.v_rotations, rotations.v_eigenvalues, V_OBJECTIVE, V_FILENAME),
    ):
        layers = {}
        for i in range(rotations.num_layers):
            r = rot[i].float().contiguous()
            entry = {"layer_id": i, "rotation": r[0].clone() if grouping == "layer" else r.clone()}
            if ev is not None:
                entry["eigenvalues"] = ev[i][0].float().clone() if grouping == "layer" else ev[i].float().clone()
            layers[i] = entry
        state = {"format_version": ZOO_FORMAT_VERSION, "objective": objective, "source_grouping": grouping,
                 "layers": layers}
        # replace_file replaces a link at the path instead of writing through it
        replace_file(out / name, lambda tmp, state=state: torch.save(state, tmp))
        paths.append(out / name)
    return paths[0], paths[1]
