"""`calibrate(model, tokens)`: fit an OSCAR bundle from a loaded model and calibration token ids."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from oscar_hf.cache import model_geometry
from oscar_hf.quantization import hadamard_matrix
from oscar_hf.rotations import DEFAULT_K_CLIP, DEFAULT_V_CLIP, OscarRotations

from .fit import DEFAULT_CLIP_CANDIDATES, ClipSearch, feedback_factors, output_projection_gram, rotation_from_covariance
from .statistics import StatisticsCollector, capturing

GROUPINGS = ("layer", "head", "auto")


@dataclass
class CalibrationReport:
    """What a calibration run did, for the command's summary and the bundle's provenance."""

    fit_tokens: int
    heldout_tokens: int
    seconds: float
    grouping: str
    layer_grouping: list[str]
    layer_ids: list[int]
    k_clip: list[float]
    v_clip: list[float]
    # Held-back relative attention-output error ||O_q - O||^2 / ||O||^2, per full-attention layer.
    errors: dict[str, list[float]] = field(default_factory=dict)

    def table(self) -> str:
        head = f"{'layer':>5} {'group':>6} {'k_clip':>6} {'v_clip':>6} {'K err oscar':>12} {'K err hadam':>12} " \
               f"{'V err oscar':>12} {'V err hadam':>12}"
        rows = [head]
        for i, layer in enumerate(self.layer_ids):
            e = {k: v[i] for k, v in self.errors.items()}
            rows.append(
                f"{layer:>5} {self.layer_grouping[i]:>6} {self.k_clip[i]:>6.2f} {self.v_clip[i]:>6.2f} "
                f"{e.get('k_oscar', float('nan')):>12.3e} {e.get('k_hadamard', float('nan')):>12.3e} "
                f"{e.get('v_oscar', float('nan')):>12.3e} {e.get('v_hadamard', float('nan')):>12.3e}"
            )
        return "\n".join(rows)


def _batches(tokens: torch.Tensor, seq_len: int, batch_size: int):
    n = tokens.numel() // seq_len * seq_len
    seqs = tokens[:n].view(-1, seq_len)
    for i in range(0, seqs.shape[0], batch_size):
        yield seqs[i : i + batch_size]


@torch.no_grad()
def _run(model, tokens, seq_len, batch_size, progress, desc):
    device = model.device
    total = tokens.numel() // seq_len
    for batch in tqdm(
        _batches(tokens, seq_len, batch_size), total=-(-total // batch_size), desc=desc, disable=not progress
    ):
        model(input_ids=batch.to(device), use_cache=False, logits_to_keep=1)


def calibrate(
    model,
    tokens: torch.Tensor,
    *,
    seq_len: int = 2048,
    batch_size: int = 1,
    grouping: str = "layer",
    heldout_tokens: int | None = None,
    weight_tokens: int | None = None,
    fit_clip: bool = True,
    clip_candidates=DEFAULT_CLIP_CANDIDATES,
    sink_tokens: int = 64,
    progress: bool = True,
    metadata: dict | None = None,
    error_feedback: bool = True,
    rotation: str = "fitted",
) -> tuple[OscarRotations, CalibrationReport]:
    """Fit OSCAR rotations (and clip ratios) for `model` on the token ids `tokens` `[N]`.

    Pass 1 runs on the first `weight_tokens` fitting tokens (default: all, the exact two-pass recipe) to get the
    query covariance that weights the values; pass 2 runs on all fitting tokens (see `statistics`).
    The last `heldout_tokens` tokens (default: N/16, at most 4,096, whole sequences) are held back from the covariance
    fit and used to choose the clip ratios per layer and per K/V, by the attention-output error on those tokens
    (`ClipSearch`). `grouping`: `"layer"` (one rotation per layer, the reference), `"head"` (one per KV head), or
    `"auto"` (per layer, whichever gives the lower held-back error; a layer that keeps a shared rotation stores it for
    every head). With `error_feedback` (default) the bundle also carries error-feedback factors: keys are coded to
    minimise their error in the query covariance, values in the metric of the layer's `o_proj` (see
    `quantization.quantize_rows`); the rotated channels are reordered heaviest first. `rotation="hadamard"` keeps the
    data-free Hadamard rotation (and fits only the feedback and clips). Returns the bundle and a report.
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}.")
    start = time.perf_counter()
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    text_config, num_layers, num_kv_heads, head_dim, layer_types = model_geometry(model.config)
    layer_ids = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    if not layer_ids:
        raise ValueError("The model has no full-attention layers: there is nothing for OSCAR to quantize.")
    seq_len = min(seq_len, tokens.numel())
    if heldout_tokens is None:
        heldout_tokens = max(seq_len, min(4096, tokens.numel() // 16)) if fit_clip else 0
    heldout_tokens = heldout_tokens // seq_len * seq_len
    fit = tokens[: tokens.numel() - heldout_tokens]
    held = tokens[tokens.numel() - heldout_tokens :]
    if fit.numel() < seq_len:
        raise ValueError(f"Need at least {seq_len} fitting tokens (one sequence), got {fit.numel()}.")
    if fit_clip and held.numel() == 0:
        raise ValueError(
            f"Clip fitting needs held-back tokens: {tokens.numel()} tokens leave no whole held-back sequence of "
            f"{seq_len}. Pass more tokens, a shorter seq_len, or fit_clip=False."
        )

    model.eval()
    collector = StatisticsCollector(layer_ids, num_kv_heads, head_dim, device=model.device)
    with capturing(model, collector):
        weight_fit = fit if weight_tokens is None else fit[: max(seq_len, weight_tokens)]
        _run(model, weight_fit, seq_len, batch_size, progress, "pass 1/2: query covariance")
        collector.start_value_pass()
        _run(model, fit, seq_len, batch_size, progress, "pass 2/2: query + value covariance")

    q_cov, v_cov = collector.query_covariance().cpu(), collector.value_covariance().cpu()
    candidates = {}
    if grouping in ("layer", "auto"):
        rk, ek = rotation_from_covariance(q_cov.mean(1, keepdim=True))
        rv, ev = rotation_from_covariance(v_cov.mean(1, keepdim=True))
        candidates["layer"] = (rk, rv, ek, ev)
    if grouping in ("head", "auto"):
        candidates["head"] = (*rotation_from_covariance(q_cov), *rotation_from_covariance(v_cov))
        rk, ek, rv, ev = candidates["head"]
        candidates["head"] = (rk, rv, ek, ev)

    slots, d = len(layer_ids), head_dim
    hadamard = hadamard_matrix(d, torch.float32).expand(slots, 1, d, d)
    if rotation not in ("fitted", "hadamard"):
        raise ValueError(f"rotation must be 'fitted' or 'hadamard', got {rotation!r}.")
    if rotation == "hadamard":
        for name, (rk, rv, ek, ev) in candidates.items():
            candidates[name] = (hadamard.expand_as(rk).clone(), hadamard.expand_as(rv).clone(), ek, ev)
    variants = {name: (c[0], c[1]) for name, c in candidates.items()}
    variants["hadamard"] = (hadamard, hadamard)
    errors: dict[str, list[float]] = {}
    layer_choice = [grouping if grouping != "auto" else "layer"] * slots
    cands = tuple(sorted(set(clip_candidates) | {DEFAULT_K_CLIP, DEFAULT_V_CLIP}))
    if fit_clip:
        search = ClipSearch(variants, cands, sink_tokens=sink_tokens)
        collector.phase, collector.clip_search = "clip", search
        with capturing(model, collector):
            _run(model, held, seq_len, batch_size, progress, "held-back: clip ratios")
        if grouping == "auto":
            per_group = {}
            for name in ("layer", "head"):
                kc, vc = search.best(name)
                per_group[name] = search.relative_error(name, "k", kc) + search.relative_error(name, "v", vc)
            layer_choice = ["head" if per_group["head"][i] < per_group["layer"][i] else "layer" for i in range(slots)]
        k_clip = torch.empty(slots)
        v_clip = torch.empty(slots)
        for i, name in enumerate(layer_choice):
            kc, vc = search.best(name)
            k_clip[i], v_clip[i] = kc[i], vc[i]
            for kind, clip in (("k", kc), ("v", vc)):
                errors.setdefault(f"{kind}_oscar", []).append(float(search.relative_error(name, kind, clip)[i]))
                errors.setdefault(f"{kind}_oscar_default_clip", []).append(
                    float(search.relative_error(name, kind, DEFAULT_K_CLIP if kind == "k" else DEFAULT_V_CLIP)[i])
                )
        errors["k_hadamard"] = search.relative_error("hadamard", "k", DEFAULT_K_CLIP).tolist()
        errors["v_hadamard"] = search.relative_error("hadamard", "v", DEFAULT_V_CLIP).tolist()
    else:
        k_clip = torch.full((slots,), DEFAULT_K_CLIP)
        v_clip = torch.full((slots,), DEFAULT_V_CLIP)

    groups = 1 if all(c == "layer" for c in layer_choice) else num_kv_heads
    eye = torch.eye(d).expand(num_layers, groups, d, d).clone()
    k_rot, v_rot = eye.clone(), eye.clone()
    k_ev = torch.zeros(num_layers, groups, d)
    v_ev = torch.zeros(num_layers, groups, d)
    k_all = torch.ones(num_layers)
    v_all = torch.ones(num_layers)
    for i, layer in enumerate(layer_ids):
        rk, rv, ek, ev = candidates[layer_choice[i]]
        k_rot[layer], v_rot[layer] = rk[i].expand(groups, d, d), rv[i].expand(groups, d, d)
        k_ev[layer], v_ev[layer] = ek[i].expand(groups, d), ev[i].expand(groups, d)
        k_all[layer], v_all[layer] = k_clip[i], v_clip[i]

    k_fb = v_fb = None
    if error_feedback:
        k_fb, v_fb = torch.zeros_like(k_rot), torch.zeros_like(v_rot)
        for i, layer in enumerate(layer_ids):
            q_metric = q_cov[i] if groups > 1 else q_cov[i].mean(0, keepdim=True)
            k_rot[layer], k_fb[layer] = feedback_factors(k_rot[layer], q_metric)
            gram = output_projection_gram(model, layer, num_kv_heads, head_dim)
            if gram is None:  # no o_proj to weigh value errors with: plain rounding for V (identity factor)
                gram = torch.eye(d, dtype=torch.float64).expand(num_kv_heads, d, d)
            v_rot[layer], v_fb[layer] = feedback_factors(v_rot[layer], gram if groups > 1 else gram.mean(0, keepdim=True))
        for layer in set(range(num_layers)) - set(layer_ids):  # unquantized layers: identity factors
            k_fb[layer] = v_fb[layer] = torch.eye(d)

    seconds = time.perf_counter() - start
    report = CalibrationReport(
        fit_tokens=int(fit.numel() // seq_len * seq_len),
        heldout_tokens=int(held.numel()),
        seconds=seconds,
        grouping=grouping,
        layer_grouping=layer_choice,
        layer_ids=layer_ids,
        k_clip=k_clip.tolist(),
        v_clip=v_clip.tolist(),
        errors=errors,
    )
    meta = dict(metadata or {})
    calibration = dict(meta.pop("calibration", {}) or {})
    calibration.update(
        fit_tokens=report.fit_tokens,
        heldout_tokens=report.heldout_tokens,
        seq_len=seq_len,
        grouping_requested=grouping,
        layer_grouping=",".join(layer_choice),
        weight_tokens=int(min(fit.numel(), weight_tokens or fit.numel())) // seq_len * seq_len,
        clip_fit="held-back attention-output error" if fit_clip else "reference defaults",
        statistics="two passes, float64 (query covariance, then score-weighted value covariance)",
        error_feedback="K: query covariance, V: o_proj metric" if error_feedback else "none (plain rounding)",
        rotation=rotation,
    )
    meta["calibration"] = calibration
    meta.setdefault("model_id", getattr(text_config, "_name_or_path", None) or None)
    rotations = OscarRotations(
        method="oscar",
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        k_clip_ratios=k_all,
        v_clip_ratios=v_all,
        k_rotations=k_rot,
        v_rotations=v_rot,
        k_eigenvalues=k_ev,
        v_eigenvalues=v_ev,
        metadata=meta,
        k_feedback=k_fb,
        v_feedback=v_fb,
    )
    return rotations, report
