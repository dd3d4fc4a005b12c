"""`OscarRotations`: the per-layer K and V rotations and clip ratios that a cache quantizes with.

The three methods differ only in this data: `naive` carries no rotation and no clipping, `hadamard` carries the
data-free normalised Hadamard matrix, `oscar` carries rotations fitted offline on calibration text. Rotations are
stored as `[num_layers, groups, head_dim, head_dim]` float32 where `groups` is 1 (one rotation per layer, the
reference recipe) or `num_kv_heads` (one per KV head). A row vector `k` is stored as `k @ R`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .bundle import METHODS, NESTED_SCHEMA, TENSOR_PARALLEL_KEY, BundleIO, _check_schema
from .quantization import KeyTilt, hadamard_rotation

# The reference recipe's clip quantiles: values beyond them are outliers worth sacrificing at 4 levels.
DEFAULT_K_CLIP = 0.96
DEFAULT_V_CLIP = 0.92
ORTHOGONALITY_TOLERANCE = 1e-3
# Eigenvalues are spectra of covariances (positive semi-definite): below -tolerance x the largest is not rounding.
EIGENVALUE_TOLERANCE = 1e-4
# The tensors whose second dimension may run over the KV heads (`[num_layers, 1 or num_kv_heads, ...]`; the key tilt's
# always does). A tensor-parallel shard keeps its rank's heads of each; the clip ratios are per layer.
PER_HEAD_TENSORS = (
    "k_rotations", "v_rotations", "k_eigenvalues", "v_eigenvalues", "k_feedback", "v_feedback", "k_means",
    "k_tilt_means", "k_tilt_maps",
)


@dataclass
class OscarRotations(BundleIO):
    """Rotations and clip ratios for every decoder layer of one model.

    Attributes:
        method: `"naive"`, `"hadamard"` or `"oscar"`.
        k_rotations, v_rotations: `[num_layers, groups, head_dim, head_dim]` float32, or `None` for no rotation.
        k_clip_ratios, v_clip_ratios: `[num_layers]` float32 quantiles in (0, 1].
        num_kv_heads: KV heads of the model the rotations were made for.
        k_eigenvalues, v_eigenvalues: `[num_layers, groups, head_dim]` spectra of the fitted covariances (oscar only).
        k_feedback, v_feedback: optional `[num_layers, groups, head_dim, head_dim]` error-feedback factors
            (`quantization.error_feedback_factor` of the metric the errors are weighed in, in the rotated space);
            with them the cache picks 2-bit codes with error feedback. Same storage format, same decode path.
        k_means: optional `[num_layers, groups, head_dim]` mean key (original, unrotated space) that the cache
            subtracts from every stored key. Subtracting one vector from all keys shifts every score of a query by
            the same amount, which softmax ignores, so attention is unchanged while the rows to quantize lose their
            common offset (a smaller range, a finer 2-bit grid).
        k_tilt_means, k_tilt_maps: optional `[num_layers, kv_heads, G, head_dim]` and
            `[num_layers, kv_heads, G, head_dim, head_dim]` (G query heads per KV head, rotated space, coding order):
            the attention tilt of the key coding (`quantization.KeyTilt`). With them `k_feedback` is the factor of
            the tilt's base metric and every key is coded in the metric of the queries that will attend to it.
        metadata: free-form provenance (model id, revision, calibration data, token count, windows, ...);
            `metadata["tensor_parallel"]` marks the shard of one tensor-parallel rank (`tensor_parallel_shard`).
        bundle_path: the directory the bundle was loaded from (`None` when built in memory); errors name it.

    Bundle I/O (`save_pretrained`, `from_pretrained`, `push_to_hub`, `model_card`) comes from `bundle.BundleIO`.
    """

    method: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    k_clip_ratios: torch.Tensor
    v_clip_ratios: torch.Tensor
    k_rotations: torch.Tensor | None = None
    v_rotations: torch.Tensor | None = None
    k_eigenvalues: torch.Tensor | None = None
    v_eigenvalues: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    k_feedback: torch.Tensor | None = None
    v_feedback: torch.Tensor | None = None
    k_means: torch.Tensor | None = None
    k_tilt_means: torch.Tensor | None = None
    k_tilt_maps: torch.Tensor | None = None
    bundle_path: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self._validate_geometry()  # before anything is sized by it
        self.k_clip_ratios = torch.as_tensor(self.k_clip_ratios, dtype=torch.float32).reshape(-1)
        self.v_clip_ratios = torch.as_tensor(self.v_clip_ratios, dtype=torch.float32).reshape(-1)
        if self.k_clip_ratios.numel() == 1:
            self.k_clip_ratios = self.k_clip_ratios.expand(self.num_layers).clone()
        if self.v_clip_ratios.numel() == 1:
            self.v_clip_ratios = self.v_clip_ratios.expand(self.num_layers).clone()
        self.validate()

    @classmethod
    def data_free(
        cls,
        method: str,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        k_clip_ratio: float | None = None,
        v_clip_ratio: float | None = None,
    ) -> OscarRotations:
        """The calibration-free baselines: `naive` (no rotation, no clip) or `hadamard` (QuaRot-style rotation,
        clipped at the reference quantiles unless told otherwise, so that only the rotation differs from oscar)."""
        if method == "naive":
            k_clip = 1.0 if k_clip_ratio is None else k_clip_ratio
            v_clip = 1.0 if v_clip_ratio is None else v_clip_ratio
            return cls("naive", num_layers, num_kv_heads, head_dim, torch.tensor(k_clip), torch.tensor(v_clip))
        if method == "hadamard":
            h = hadamard_rotation(head_dim, torch.float32).expand(num_layers, 1, head_dim, head_dim).clone()
            k_clip = DEFAULT_K_CLIP if k_clip_ratio is None else k_clip_ratio
            v_clip = DEFAULT_V_CLIP if v_clip_ratio is None else v_clip_ratio
            return cls(
                "hadamard", num_layers, num_kv_heads, head_dim, torch.tensor(k_clip), torch.tensor(v_clip), h, h.clone()
            )
        if method == "oscar":
            raise ValueError(
                "method='oscar' needs fitted rotations: pass `rotations=OscarRotations.from_pretrained(...)`, use "
                "`OscarQuantizedCache.from_pretrained(...)`, or fit them with `oscar-calibrate`. "
                "For a calibration-free baseline use method='hadamard' or method='naive'."
            )
        raise ValueError(f"Unknown method {method!r}: expected one of {METHODS}.")

    @property
    def windows(self) -> dict[str, int] | None:
        """The exact windows recorded with the bundle, `{"sink_tokens": int, "recent_tokens": int}`, or `None` when it
        records none (checked as `oscar_config.json` is: non-negative integers)."""
        windows = self.metadata.get("windows")
        if windows is None:
            return None
        where = f"The windows of {self._description()}"
        if not isinstance(windows, dict):
            raise ValueError(f"{where}: `windows` is {windows!r}; expected an object {{sink_tokens, recent_tokens}}.")
        _check_schema(windows, NESTED_SCHEMA["windows"], where, prefix="windows.")
        return {"sink_tokens": windows["sink_tokens"], "recent_tokens": windows["recent_tokens"]}

    @property
    def tensor_parallel(self) -> dict[str, int] | None:
        """`{"rank", "size", "num_kv_heads"}` when this is the shard of one tensor-parallel rank
        (`tensor_parallel_shard`; `num_kv_heads` counts the whole bundle's heads), else `None`."""
        return self.metadata.get(TENSOR_PARALLEL_KEY)

    def tensor_parallel_shard(self, rank: int, size: int) -> OscarRotations:
        """The bundle of rank `rank` of a tensor-parallel group of `size` ranks: only the KV heads that rank computes.

        transformers' tensor parallelism (`tp_plan="auto"`) splits `k_proj` and `v_proj` by output columns, so rank
        `r` holds KV heads `[r * H / size, (r + 1) * H / size)` of the model's `H` (and the query heads that read
        them), and its cache receives only those. The shard keeps these heads of every tensor that has one entry per
        head (`PER_HEAD_TENSORS`: rotations, eigenvalues, error-feedback factors, key means, the key tilt); tensors
        shared by a layer's heads (second dimension 1) and the per-layer clip ratios are kept whole. Its
        `num_kv_heads` is `H / size` and `tensor_parallel` records the rank, the size and `H`. `size=1` returns this
        bundle itself.

        A shard refuses to be written (`save_pretrained`, `push_to_hub`, `rotationzoo.export_rotationzoo`): on disk
        its tensors would read as a whole bundle for a model with `H / size` KV heads, which a cache for such a model
        would accept and quantize with the wrong heads' rotations. Cutting it again from the whole bundle costs a
        few slices, so only whole bundles are stored and shared; `OscarQuantizedCache` cuts the shard itself.
        """
        for name, value in (("size", size), ("rank", rank)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"The tensor-parallel {name} must be an integer, got {value!r}.")
        if size < 1:
            raise ValueError(f"The tensor-parallel size must be at least 1, got {size}.")
        if not 0 <= rank < size:
            raise ValueError(
                f"Rank {rank} is outside a tensor-parallel group of {size} rank(s): ranks run from 0 to {size - 1}."
            )
        tp = self.tensor_parallel
        if tp is not None:
            raise ValueError(
                f"Cannot cut a tensor-parallel shard from a shard ({self._description()}: rank {tp['rank']} of "
                f"{tp['size']}, {self.num_kv_heads} of {tp['num_kv_heads']} KV heads). Cut every shard from the whole "
                "bundle."
            )
        heads = self.num_kv_heads
        if heads % size:
            raise ValueError(
                f"Cannot split {self._description()} ({heads} KV heads) over {size} tensor-parallel ranks: "
                "transformers splits k_proj and v_proj by whole heads, so the tensor-parallel size must divide "
                f"num_key_value_heads. Sizes that divide {heads}: {[n for n in range(1, heads + 1) if heads % n == 0]}."
            )
        if size == 1:
            return self
        local = heads // size
        start, stop = rank * local, (rank + 1) * local
        sliced = {}
        for name in PER_HEAD_TENSORS:
            value = getattr(self, name)
            # heads > 1 here, so a second dimension of 1 is a tensor shared by the layer's heads
            if value is not None and value.shape[1] == heads:
                sliced[name] = value[:, start:stop].clone()
        metadata = {**self.metadata, TENSOR_PARALLEL_KEY: {"rank": rank, "size": size, "num_kv_heads": heads}}
        return dataclasses.replace(self, num_kv_heads=local, metadata=metadata, **sliced)

    def _description(self) -> str:
        return f"the rotation bundle {self.bundle_path}" if self.bundle_path else "these rotations"

    @property
    def groups(self) -> int:
        """1 when one rotation serves every KV head of a layer, `num_kv_heads` for one rotation per head."""
        return 1 if self.k_rotations is None else self.k_rotations.shape[1]

    def validate(self) -> None:
        """Raise a `ValueError` naming the first problem: wrong shapes, non-finite or non-orthogonal rotations, or
        clip ratios outside (0, 1]."""
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}: expected one of {METHODS}.")
        self._validate_geometry()
        for name in ("k_clip_ratios", "v_clip_ratios"):
            ratios = getattr(self, name)
            if ratios.numel() != self.num_layers:
                raise ValueError(f"{name} has {ratios.numel()} entries for {self.num_layers} layers.")
            if not torch.isfinite(ratios).all() or (ratios <= 0).any() or (ratios > 1).any():
                raise ValueError(f"{name} must lie in (0, 1], got {ratios.tolist()}.")
        if (self.k_rotations is None) != (self.v_rotations is None):
            raise ValueError("K and V rotations must both be given or both be absent.")
        if self.method == "naive" and self.k_rotations is not None:
            raise ValueError(
                "method 'naive' quantizes without rotation, but this bundle carries k_rotations and v_rotations: the "
                "method and the tensors disagree. Use method 'hadamard' or 'oscar' for rotated bundles, or drop the "
                "rotations."
            )
        self._validate_coding_tensors()
        if self.k_rotations is None:
            if self.method != "naive":
                raise ValueError(f"method={self.method!r} needs rotation matrices; only 'naive' has none.")
            for name in ("k_eigenvalues", "v_eigenvalues"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} describe fitted rotations, but these rotations carry none.")
            return
        for name in ("k_rotations", "v_rotations"):
            r = getattr(self, name)
            expected_groups = (1, self.num_kv_heads)
            if r.dim() != 4 or r.shape[0] != self.num_layers or r.shape[1] not in expected_groups or r.shape[2:] != (
                self.head_dim,
                self.head_dim,
            ):
                raise ValueError(
                    f"{name} has shape {tuple(r.shape)}; expected [{self.num_layers}, 1 or {self.num_kv_heads}, "
                    f"{self.head_dim}, {self.head_dim}] (layers, groups, head_dim, head_dim)."
                )
            if not torch.isfinite(r).all():
                bad = sorted({int(i) for i in torch.nonzero(~torch.isfinite(r))[:, 0]})
                raise ValueError(f"{name} holds NaN or Inf values (layers {bad}).")
            r64 = r.double()
            eye = torch.eye(self.head_dim, dtype=torch.float64)
            err = (r64.transpose(-1, -2) @ r64 - eye).abs().amax(dim=(-1, -2))
            if (err > ORTHOGONALITY_TOLERANCE).any():
                layer = int(torch.nonzero(err > ORTHOGONALITY_TOLERANCE)[0, 0])
                raise ValueError(
                    f"{name} of layer {layer} is not orthogonal (max |R^T R - I| = {err.max().item():.3g} > "
                    f"{ORTHOGONALITY_TOLERANCE}); the cache would return wrong attention outputs."
                )
        self._validate_eigenvalues()

    def _validate_geometry(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

    def _validate_eigenvalues(self) -> None:
        """The spectra stored beside fitted rotations: `[num_layers, groups, head_dim]`, finite, non-negative."""
        for name in ("k_eigenvalues", "v_eigenvalues"):
            ev = getattr(self, name)
            if ev is None:
                continue
            rotations = self.k_rotations if name == "k_eigenvalues" else self.v_rotations
            expected = (self.num_layers, rotations.shape[1], self.head_dim)
            if tuple(ev.shape) != expected:
                raise ValueError(
                    f"{name} has shape {tuple(ev.shape)}; expected {expected} (layers, groups of the rotations, "
                    "head_dim)."
                )
            if not torch.isfinite(ev).all():
                raise ValueError(f"{name} holds NaN or Inf values.")
            floor = -EIGENVALUE_TOLERANCE * ev.abs().amax(dim=-1, keepdim=True)
            if (ev < floor).any():
                layer = int(torch.nonzero(ev < floor)[0, 0])
                raise ValueError(
                    f"{name} of layer {layer} holds negative values (min {ev[layer].min().item():.3g}): they are not "
                    "the spectrum of a covariance. Re-create the bundle with `oscar-calibrate`."
                )

    def _validate_coding_tensors(self) -> None:
        """The optional tensors that change how rows are coded: error-feedback factors and mean keys."""
        for name in ("k_feedback", "v_feedback"):
            f = getattr(self, name)
            if f is None:
                continue
            if self.k_rotations is None:
                raise ValueError(f"{name} needs rotations: error feedback works in the rotated space.")
            if f.dim() != 4 or f.shape[0] != self.num_layers or f.shape[1] not in (1, self.num_kv_heads) or f.shape[
                2:
            ] != (self.head_dim, self.head_dim):
                raise ValueError(
                    f"{name} has shape {tuple(f.shape)}; expected [{self.num_layers}, 1 or {self.num_kv_heads}, "
                    f"{self.head_dim}, {self.head_dim}]."
                )
            if not torch.isfinite(f).all():
                raise ValueError(f"{name} holds NaN or Inf values.")
            diag = f.diagonal(dim1=-2, dim2=-1)
            if (diag <= 0).any() or (f.tril(-1) != 0).any():
                raise ValueError(f"{name} must be upper-triangular with a positive diagonal (a Cholesky factor).")
        m = self.k_means
        if m is not None:
            if m.dim() != 3 or m.shape[0] != self.num_layers or m.shape[1] not in (1, self.num_kv_heads) or (
                m.shape[2] != self.head_dim
            ):
                raise ValueError(
                    f"k_means has shape {tuple(m.shape)}; expected [{self.num_layers}, 1 or {self.num_kv_heads}, "
                    f"{self.head_dim}]."
                )
            if not torch.isfinite(m).all():
                raise ValueError("k_means holds NaN or Inf values.")
        means, maps = self.k_tilt_means, self.k_tilt_maps
        if (means is None) != (maps is None):
            raise ValueError("k_tilt_means and k_tilt_maps must both be given or both be absent.")
        if means is not None:
            if self.k_feedback is None:
                raise ValueError("A key tilt (k_tilt_means, k_tilt_maps) refines error feedback: it needs k_feedback.")
            lead = (self.num_layers, self.num_kv_heads)
            if means.dim() != 4 or tuple(means.shape[:2]) != lead or means.shape[3] != self.head_dim:
                raise ValueError(
                    f"k_tilt_means has shape {tuple(means.shape)}; expected [{self.num_layers}, {self.num_kv_heads}, "
                    f"query heads per KV head, {self.head_dim}]."
                )
            if maps.shape != (*means.shape, self.head_dim):
                raise ValueError(
                    f"k_tilt_maps has shape {tuple(maps.shape)}; expected {(*means.shape, self.head_dim)} "
                    "(one head_dim x head_dim map per entry of k_tilt_means)."
                )
            if not (torch.isfinite(means).all() and torch.isfinite(maps).all()):
                raise ValueError("k_tilt_means / k_tilt_maps hold NaN or Inf values.")

    def layer_key_mean(self, layer_idx: int) -> torch.Tensor | None:
        """The mean key `[groups, head_dim]` the cache subtracts in this layer, or `None`."""
        return None if self.k_means is None else self.k_means[layer_idx]

    def layer_key_tilt(self, layer_idx: int) -> KeyTilt | None:
        """The attention tilt of this layer's key coding (`quantization.KeyTilt`), or `None`."""
        if self.k_tilt_means is None:
            return None
        return KeyTilt(self.k_tilt_means[layer_idx], self.k_tilt_maps[layer_idx])

    def layer_feedback(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(K factor, V factor)` for one layer, each `[groups, head_dim, head_dim]` or `None`."""
        pick = lambda f: None if f is None else f[layer_idx]  # noqa: E731
        return pick(self.k_feedback), pick(self.v_feedback)

    def check_compatible(self, num_layers: int, num_kv_heads: int, head_dim: int, model_name: str = "the model"):
        """Raise a `ValueError` when these rotations were made for a model of another shape."""
        mismatches = [
            f"{what}: bundle {ours}, {model_name} {theirs}"
            for what, ours, theirs in (
                ("layers", self.num_layers, num_layers),
                ("KV heads", self.num_kv_heads, num_kv_heads),
                ("head_dim", self.head_dim, head_dim),
            )
            if ours != theirs
        ]
        if mismatches:
            # Bundles store `"model_id": null` when the model had no name: never say "made for None".
            source = self.metadata.get("model_id") or "an unknown model"
            where = f" (bundle {self.bundle_path})" if self.bundle_path else ""
            raise ValueError(
                f"These rotations{where} were made for {source} and do not fit {model_name} ("
                + "; ".join(mismatches)
                + "). Calibrate rotations for this model with `oscar-calibrate`."
            )

    def layer_rotations(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(R_K, R_V)` for one layer, each `[groups, head_dim, head_dim]` or `None` (no rotation)."""
        if self.k_rotations is None:
            return None, None
        return self.k_rotations[layer_idx], self.v_rotations[layer_idx]
