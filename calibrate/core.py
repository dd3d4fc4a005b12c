"""`calibrate(model, tokens)`: fit an OSCAR bundle from a loaded model and calibration token ids.

```python
from oscar_hf.calibrate.core import calibrate
rotations, report = calibrate(model, token_ids, grouping="layer")
rotations.save_pretrained("./bundle")
```
The package `oscar_hf.calibrate` (the repository's `calibrate/` folder) is a namespace package without an
`__init__.py`, so that the folder can never stand in for an installed distribution called `calibrate`; import from its
modules: `core` (this), `data` (`load_calibration_tokens`), `fit` (`rotation_from_covariance`), `statistics`, `cli`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from oscar_hf.geometry import model_geometry
from oscar_hf.quantization import hadamard_matrix
from oscar_hf.rotations import DEFAULT_K_CLIP, DEFAULT_V_CLIP, OscarRotations

from .fit import (
    DEFAULT_CLIP_CANDIDATES,
    ClipSearch,
    feedback_factors,
    key_tilt_tensors,
    output_projection_gram,
    rotation_from_covariance,
)
from .statistics import StatisticsCollector, capturing

GROUPINGS = ("layer", "head", "auto")
# Strength t of the key coding's attention tilt (`quantization.KeyTilt`): the Gaussian model says 1; on the reference
# model 1.5-4 measured alike and better than 1, and 3 had the lowest KL on four validation segments of the
# calibration split (benchmarks/RESULTS.md), so it is the default.
DEFAULT_KEY_TILT = 3.0
# Value clip ratio of the default coding (error feedback): with the feedback in the o_proj metric a wider value grid
# than the published 0.92 measured better on the reference model (RESULTS: lower KL and perplexity on both segments).
FEEDBACK_V_CLIP = 0.96


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


def plan_calibration(
    num_tokens: int,
    *,
    seq_len: int = 2048,
    batch_size: int = 1,
    grouping: str = "head",
    heldout_tokens: int | None = None,
    weight_tokens: int | None = None,
    fit_clip: bool = False,
    error_feedback: bool = True,
    rotation: str = "hadamard",
    key_tilt: float | None = None,
) -> tuple[int, int, float]:
    """Check the settings of `calibrate` for `num_tokens` tokens without a model; returns the sequence length, the
    held-back token count (whole sequences) and the key tilt that `calibrate` will use. Raises a `ValueError` naming
    the setting (and its command-line option), so that `oscar-calibrate` refuses bad settings before loading a model.
    """
    for name, option, value, low in (
        ("num_tokens", "--num-tokens", num_tokens, 1),
        ("seq_len", "--seq-len", seq_len, 1),
        ("batch_size", "--batch-size", batch_size, 1),
        ("heldout_tokens", "--heldout-tokens", 0 if heldout_tokens is None else heldout_tokens, 0),
        ("weight_tokens", "--weight-tokens", 0 if weight_tokens is None else weight_tokens, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} ({option}) must be an integer >= {low}, got {value!r}.")
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}.")
    if rotation not in ("fitted", "hadamard"):
        raise ValueError(f"rotation must be 'fitted' or 'hadamard', got {rotation!r}.")
    if key_tilt is None:
        key_tilt = DEFAULT_KEY_TILT if grouping == "head" and error_feedback else 0.0
    if not math.isfinite(key_tilt) or key_tilt < 0 or (key_tilt > 0 and (grouping != "head" or not error_feedback)):
        raise ValueError(
            f"key_tilt={key_tilt}: the key tilt is a non-negative strength and refines per-KV-head error feedback "
            "(grouping='head', error_feedback=True); pass key_tilt=0 (--key-tilt 0) otherwise."
        )
    seq_len = min(seq_len, num_tokens)
    if heldout_tokens is None:
        # At least one sequence when there is room for a fitting one too (the summary's error needs it).
        heldout_tokens = max(seq_len, min(4096, num_tokens // 16)) if num_tokens >= 2 * seq_len else 0
    heldout_tokens = heldout_tokens // seq_len * seq_len
    if num_tokens - heldout_tokens < seq_len:
        raise ValueError(
            f"Need at least {seq_len} fitting tokens (one sequence), got {max(0, num_tokens - heldout_tokens)} "
            f"({num_tokens} tokens less {heldout_tokens} held back): pass more tokens or fewer held back."
        )
    if fit_clip and heldout_tokens == 0:
        raise ValueError(
            f"Clip fitting needs held-back tokens: {num_tokens} tokens leave no whole held-back sequence of "
            f"{seq_len}. Pass more tokens, a shorter seq_len, or fit_clip=False."
        )
    return seq_len, heldout_tokens, float(key_tilt)


def calibrate(
    model,
    tokens: torch.Tensor,
    *,
    seq_len: int = 2048,
    batch_size: int = 1,
    grouping: str = "head",
    heldout_tokens: int | None = None,
    weight_tokens: int | None = None,
    fit_clip: bool = False,
    clip_candidates=DEFAULT_CLIP_CANDIDATES,
    sink_tokens: int = 64,
    progress: bool = True,
    metadata: dict | None = None,
    error_feedback: bool = True,
    rotation: str = "hadamard",
    center_keys: bool = False,
    key_tilt: float | None = None,
) -> tuple[OscarRotations, CalibrationReport]:
    """Fit an OSCAR bundle for `model` on the token ids `tokens` `[N]`.

    The default is what measured best on the reference model (benchmarks/RESULTS.md): the data-free Hadamard
    rotation, with the covariance statistics spent on *error-feedback coding* per KV head -- keys coded to minimise
    their error in the query covariance of the heads that read them, values in the metric of the layer's `o_proj`
    (`quantization.quantize_rows`), the rotated channels reordered heaviest first -- with clip ratios 0.96 for keys
    (the reference's) and `FEEDBACK_V_CLIP` for values (the reference's 0.92 without error feedback).
    `center_keys` also stores each KV head's mean key, which the cache subtracts from every key (exact under
    softmax, see `OscarRotations.k_means`): it lowers the held-back key error by ~11% on the reference model but left
    its decode KL unchanged, so it is off by default.
    `key_tilt` (default `DEFAULT_KEY_TILT` with per-head feedback, else 0 = off) codes every key in the metric of the
    queries that will attend to it rather than of all queries (`quantization.KeyTilt`; needs `grouping="head"` and
    error feedback): the statistics then also hold each query head's mean and covariance.
    `rotation="fitted"` builds the paper's `R = U . H . P_br` from the covariances instead (two passes: the value
    covariance is weighted by the query covariance, see `statistics`; pass 1 runs on the first `weight_tokens`
    fitting tokens, default all). `grouping`: `"head"` (one rotation and feedback factor per KV head), `"layer"` (one
    per layer, the reference), or `"auto"` (per layer, whichever gives the lower held-back error).

    The last `heldout_tokens` tokens (default N/16, at most 4,096, whole sequences) are held back from the fit. On
    them the bundle's attention-output error is measured against plain Hadamard quantization (the command's
    summary), and with `fit_clip` the clip ratios are chosen per layer and per K/V among `clip_candidates` by that
    error (`ClipSearch`, with the bundle's own coding). Returns the bundle and a report.
    """
    seq_len, heldout_tokens, key_tilt = plan_calibration(
        tokens.numel() if hasattr(tokens, "numel") else len(tokens), seq_len=seq_len, batch_size=batch_size,
        grouping=grouping, heldout_tokens=heldout_tokens, weight_tokens=weight_tokens, fit_clip=fit_clip,
        error_feedback=error_feedback, rotation=rotation, key_tilt=key_tilt,
    )
    start = time.perf_counter()
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    text_config, num_layers, num_kv_heads, head_dim, layer_types, _ = model_geometry(model.config)
    layer_ids = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    if not layer_ids:
        raise ValueError("The model has no full-attention layers: there is nothing for OSCAR to quantize.")
    fit = tokens[: tokens.numel() - heldout_tokens]
    held = tokens[tokens.numel() - heldout_tokens :]

    model.eval()
    collector = StatisticsCollector(layer_ids, num_kv_heads, head_dim, device=model.device)
    with capturing(model, collector):
        if rotation == "fitted":
            weight_fit = fit if weight_tokens is None else fit[: max(seq_len, weight_tokens)]
            _run(model, weight_fit, seq_len, batch_size, progress, "pass 1/2: query covariance")
            collector.start_value_pass()
            _run(model, fit, seq_len, batch_size, progress, "pass 2/2: query + value covariance")
        else:  # only the query covariance is needed (the feedback metric of the keys): one pass
            _run(model, fit, seq_len, batch_size, progress, "query covariance")

    q_cov = collector.query_covariance().cpu()
    key_mean = collector.key_mean().float().cpu() if center_keys else None  # [slots, kv_heads, D]
    slots, d = len(layer_ids), head_dim
    hadamard = hadamard_matrix(d, torch.float32).expand(slots, 1, d, d)
    v_cov = collector.value_covariance().cpu() if rotation == "fitted" else None
    candidates = {}  # grouping -> (R_K, R_V, K eigenvalues, V eigenvalues), each [slots, groups, ...]
    for name in ("layer", "head"):
        if grouping not in (name, "auto"):
            continue
        qc = q_cov.mean(1, keepdim=True) if name == "layer" else q_cov
        rk, ek = rotation_from_covariance(qc)
        if rotation == "fitted":
            rv, ev = rotation_from_covariance(v_cov.mean(1, keepdim=True) if name == "layer" else v_cov)
        else:
            rk, rv, ev = hadamard.expand_as(rk).clone(), hadamard.expand_as(rk).clone(), torch.zeros_like(ek)
        candidates[name] = (rk, rv, ek, ev)

    # Error feedback reorders each rotation's channels (heaviest first) and gives the factors the coder uses.
    feedback = {}
    tilt = None  # (means [slots, kv_heads, G, D], maps [slots, kv_heads, G, D, D]) for grouping "head"
    if key_tilt > 0:
        q_mean, q_head_cov = (t.cpu() for t in collector.query_head_moments())
        group = q_mean.shape[1] // num_kv_heads
        tilt = (torch.zeros(slots, num_kv_heads, group, d), torch.zeros(slots, num_kv_heads, group, d, d))
    if error_feedback:
        grams = []  # per layer [kv_heads, D, D]: the o_proj metric of the values
        for layer in layer_ids:
            gram = output_projection_gram(model, layer, num_kv_heads, head_dim)
            if gram is None:  # no o_proj to weigh value errors with: plain rounding for V (identity factor)
                gram = torch.eye(d, dtype=torch.float64).expand(num_kv_heads, d, d)
            grams.append(gram)
        for name, (rk, rv, _ek, _ev) in candidates.items():
            k_fb, v_fb = torch.empty_like(rk), torch.empty_like(rv)
            for i in range(slots):
                q_metric = q_cov[i] if name == "head" else q_cov[i].mean(0, keepdim=True)
                rk[i], k_fb[i] = feedback_factors(rk[i], q_metric)
                if tilt is not None and name == "head":  # the tilt's factor is that of the centred metric S
                    k_fb[i], tilt[0][i], tilt[1][i] = key_tilt_tensors(
                        rk[i], q_mean[i], q_head_cov[i], key_tilt * collector.scaling,
                        None if key_mean is None else key_mean[i],
                    )
                v_metric = grams[i] if name == "head" else grams[i].mean(0, keepdim=True)
                rv[i], v_fb[i] = feedback_factors(rv[i], v_metric)
            feedback[name] = (k_fb, v_fb)

    errors: dict[str, list[float]] = {}
    layer_choice = [grouping if grouping != "auto" else "layer"] * slots
    k_clip = torch.full((slots,), DEFAULT_K_CLIP)
    v_default = FEEDBACK_V_CLIP if error_feedback else DEFAULT_V_CLIP
    v_clip = torch.full((slots,), v_default)
    if held.numel():
        if fit_clip:
            k_cands = v_cands = tuple(sorted(set(clip_candidates) | {DEFAULT_K_CLIP, DEFAULT_V_CLIP, v_default}))
        else:  # the bundle's clips, and the reference ones that plain Hadamard is scored at
            k_cands, v_cands = (DEFAULT_K_CLIP,), tuple(sorted({DEFAULT_V_CLIP, v_default}))
        variants = {
            name: (c[0], c[1], *feedback.get(name, (None, None)), key_mean, tilt if name == "head" else None)
            for name, c in candidates.items()
        }
        variants["hadamard"] = (hadamard, hadamard, None, None, None, None)
        search = ClipSearch(variants, k_cands, v_cands, sink_tokens=sink_tokens)
        collector.phase, collector.clip_search = "clip", search
        with capturing(model, collector):
            _run(model, held, seq_len, batch_size, progress, "held-back: " + ("clip ratios" if fit_clip else "error"))
        chosen = {name: search.best(name) if fit_clip else (k_clip, v_clip) for name in candidates}
        if grouping == "auto":
            per_group = {
                name: search.relative_error(name, "k", kc) + search.relative_error(name, "v", vc)
                for name, (kc, vc) in chosen.items()
            }
            layer_choice = ["head" if per_group["head"][i] < per_group["layer"][i] else "layer" for i in range(slots)]
        for i, name in enumerate(layer_choice):
            kc, vc = chosen[name]
            k_clip[i], v_clip[i] = kc[i], vc[i]
            for kind, clip in (("k", kc), ("v", vc)):
                errors.setdefault(f"{kind}_oscar", []).append(float(search.relative_error(name, kind, clip)[i]))
                if fit_clip:
                    default = DEFAULT_K_CLIP if kind == "k" else v_default
                    errors.setdefault(f"{kind}_oscar_default_clip", []).append(
                        float(search.relative_error(name, kind, default)[i]))
        errors["k_hadamard"] = search.relative_error("hadamard", "k", DEFAULT_K_CLIP).tolist()
        errors["v_hadamard"] = search.relative_error("hadamard", "v", DEFAULT_V_CLIP).tolist()

    groups = 1 if all(c == "layer" for c in layer_choice) else num_kv_heads
    eye = torch.eye(d).expand(num_layers, groups, d, d).clone()
    k_rot, v_rot = eye.clone(), eye.clone()
    k_fb = eye.clone() if error_feedback else None  # unquantized layers keep identity factors
    v_fb = eye.clone() if error_feedback else None
    k_ev = torch.zeros(num_layers, groups, d)
    v_ev = torch.zeros(num_layers, groups, d)
    k_all = torch.ones(num_layers)
    v_all = torch.ones(num_layers)
    for i, layer in enumerate(layer_ids):
        name = layer_choice[i]
        rk, rv, ek, ev = candidates[name]
        k_rot[layer], v_rot[layer] = rk[i].expand(groups, d, d), rv[i].expand(groups, d, d)
        k_ev[layer], v_ev[layer] = ek[i].expand(groups, d), ev[i].expand(groups, d)
        k_all[layer], v_all[layer] = k_clip[i], v_clip[i]
        if error_feedback:
            k_fb[layer], v_fb[layer] = (
                feedback[name][0][i].expand(groups, d, d),
                feedback[name][1][i].expand(groups, d, d),
            )

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
        weight_tokens=int(min(fit.numel(), weight_tokens or fit.numel())) // seq_len * seq_len if rotation == "fitted"
        else 0,
        clip_fit="held-back attention-output error" if fit_clip else "reference defaults",
        statistics="two passes, float64 (query covariance, then score-weighted value covariance)"
        if rotation == "fitted" else "one pass, float64 (query covariance)",
        error_feedback="K: query covariance, V: o_proj metric" if error_feedback else "none (plain rounding)",
        rotation=rotation,
        key_centering="mean key per KV head subtracted" if center_keys else "none",
        key_tilt=float(key_tilt),
    )
    meta["calibration"] = calibration
    meta.setdefault("model_id", getattr(text_config, "_name_or_path", None) or None)
    k_means = None
    if center_keys:
        k_means = torch.zeros(num_layers, num_kv_heads, d)
        for i, layer in enumerate(layer_ids):
            k_means[layer] = key_mean[i]
    k_tilt_means = k_tilt_maps = None
    if tilt is not None:  # layers that are not quantized keep a zero tilt (no change to their metric)
        group = tilt[0].shape[2]
        k_tilt_means = torch.zeros(num_layers, num_kv_heads, group, d)
        k_tilt_maps = torch.zeros(num_layers, num_kv_heads, group, d, d)
        for i, layer in enumerate(layer_ids):
            k_tilt_means[layer], k_tilt_maps[layer] = tilt[0][i], tilt[1][i]
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
        k_means=k_means,
        k_tilt_means=k_tilt_means,
        k_tilt_maps=k_tilt_maps,
    )
    return rotations, report
