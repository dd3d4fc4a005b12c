"""`oscar-eval`: decode-mode quality of KV caches against the exact cache, as a JSON report, a plot and a model-card
table.

```
oscar-eval --model PATH --rotations DIR --tokens FILE.npy --methods bf16,naive,hadamard,oscar \\
    [--prefix-tokens 1024 --eval-tokens 2048 --start 1048576] --json OUT.json [--plot OUT.png] \\
    [--variant NAME=BASE[:KEY=VALUE,...]] [--retrieval 100] [--update-card]
```

Methods: `bf16` (the exact cache in the model dtype, the reference every other row is compared with; `exact` is an
alias), `naive`, `hadamard`, `oscar` (needs `--rotations`), `quanto-int2`, `quanto-int4` (transformers'
`QuantizedCache` with the optimum-quanto backend; skipped with the reason when it is not installed).

Variants are extra rows for ablations: `NAME=BASE[:KEY=VALUE,...]` where BASE is a method above or a rotation bundle
directory, and the KEY=VALUE overrides are keyword arguments of the cache (`OscarQuantizedCache`: sink_tokens,
recent_tokens, k_clip_ratio, v_clip_ratio, demote_block, key_grid_refit; quanto: residual_length, q_group_size,
axis_key, axis_value). Examples: `--variant per-head=/tmp/bundle_head`,
`--variant hadamard-noclip=hadamard:k_clip_ratio=1,v_clip_ratio=1`,
`--variant oscar-r128=oscar:recent_tokens=128`, `--variant refit=/tmp/bundle:key_grid_refit=True`.

Every 2-bit row uses the same exact windows unless its overrides say otherwise: `--sink-tokens` / `--recent-tokens`,
each defaulting to the window the `--rotations` bundle records (`OscarRotations.windows`, the ones it was made for),
else 64 / 256. The report's settings record the windows used and where they came from.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cache import OscarQuantizedCache, cache_windows
from ..cli_args import (
    check_token_ids,
    check_writable_file,
    load_token_array,
    non_negative_int,
    positive_int,
    run_main,
    vocab_size,
)
from ..rotations import OscarRotations
from .decode_mode import cache_kv_bits_per_element, cache_kv_bytes, compare_runs, decode_mode_run, smooth

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_LABELS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
EVAL_SPLIT_START = 1_048_576  # the reference model's convention: tokens before it may be used for calibration
OSCAR_METHODS = ("naive", "hadamard", "oscar")
QUANTO_METHODS = {"quanto-int2": 2, "quanto-int4": 4}
REFERENCE_ALIASES = ("bf16", "exact")
OSCAR_OVERRIDES = ("sink_tokens", "recent_tokens", "k_clip_ratio", "v_clip_ratio", "demote_block", "key_grid_refit")
QUANTO_OVERRIDES = ("residual_length", "q_group_size", "axis_key", "axis_value")
# transformers' QuantizedCache defaults, passed explicitly so the report records what ran on either release.
QUANTO_DEFAULTS = {"residual_length": 128, "q_group_size": 64, "axis_key": 0, "axis_value": 0}
# Columns of the Markdown / model-card table: (label, key in the per-method result).
TABLE_COLUMNS = (
    ("Perplexity", "perplexity"),
    ("KL mean", "kl_mean"),
    ("KL p99", "kl_p99"),
    ("Top-1 agree", "top1_agreement"),
    ("KV bits/elem", "kv_bits_per_element"),
    ("KV MiB", "kv_mib"),
)


@dataclass
class MethodSpec:
    """One row of the report: which cache to build and with which overrides."""

    name: str
    kind: str  # "exact", "oscar" or "quanto"
    base: str  # naive / hadamard / oscar / a bundle directory / quanto-intN
    overrides: dict = field(default_factory=dict)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="oscar-eval",
        description="Decode-mode quality of 2-bit KV caches against the exact cache: perplexity, KL(exact || method), "
        "top-1 agreement, KV bits per element and bytes; optional retrieval test, plot and model-card table.",
        epilog="Variants: NAME=BASE[:KEY=VALUE,...], BASE a method or a bundle directory, e.g. "
        "--variant hadamard-noclip=hadamard:k_clip_ratio=1,v_clip_ratio=1",
    )
    p.add_argument("--model", required=True, help="local path or Hub id of a transformers causal LM")
    p.add_argument("--rotations", default=None, help="rotation bundle (directory or Hub id) for the `oscar` row")
    p.add_argument("--tokens", required=True, help=".npy file of token ids (1-D, an integer dtype)")
    p.add_argument("--methods", default="bf16,naive,hadamard,oscar",
                   help="comma-separated rows: bf16 (exact reference), naive, hadamard, oscar, quanto-int2, "
                        "quanto-int4")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=BASE[:KEY=VALUE,...]",
                   help="an extra row (repeatable): a method or bundle directory with cache keyword overrides")
    p.add_argument("--start", type=non_negative_int, default=None,
                   help=f"first token used (default {EVAL_SPLIT_START:,}, the start of the reference evaluation split)")
    p.add_argument("--prefix-tokens", type=positive_int, default=1024,
                   help="tokens prefilled in one forward (exact attention)")
    p.add_argument("--eval-tokens", type=positive_int, default=2048, help="tokens then fed one decode step at a time")
    p.add_argument("--sink-tokens", type=non_negative_int, default=None,
                   help="exact leading tokens of the 2-bit caches (default: the --rotations bundle's recorded window, "
                        "else 64)")
    p.add_argument("--recent-tokens", type=non_negative_int, default=None,
                   help="exact newest tokens of the 2-bit caches (default: the --rotations bundle's recorded window, "
                        "else 256)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="model and exact-cache dtype")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    p.add_argument("--json", required=True, dest="json_out", help="where to write the JSON report")
    p.add_argument("--plot", default=None, help="PNG of KL against position (needs matplotlib)")
    p.add_argument("--smooth", type=positive_int, default=64, help="moving-average window of the plot, in steps")
    p.add_argument("--retrieval", type=non_negative_int, default=0, metavar="N",
                   help="also run N needle-retrieval cases (0: off)")
    p.add_argument("--retrieval-context", type=positive_int, default=3072, help="tokens per retrieval case")
    p.add_argument("--retrieval-chunk", type=non_negative_int, default=512,
                   help="feed retrieval cases in forwards of this many tokens (0: one forward, which for the 2-bit "
                        "caches is exact attention and tests nothing)")
    p.add_argument("--retrieval-value", default="hex8", help="needle values: hexN (N hex digits) or words")
    p.add_argument("--update-card", action="store_true",
                   help="write the results into the --rotations bundle directory (oscar_config.json and README.md)")
    p.add_argument("--allow-calibration-overlap", action="store_true",
                   help="evaluate even when the tokens overlap the bundle's recorded calibration range")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    return p


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_methods(methods: str, variants: list[str]) -> list[MethodSpec]:
    """The rows to run, in order: `--methods` then `--variant`s. Raises `ValueError` naming a bad entry."""
    specs: list[MethodSpec] = []
    for name in [m.strip() for m in methods.split(",") if m.strip()]:
        if name in REFERENCE_ALIASES:
            specs.append(MethodSpec(name, "exact", "exact"))
        elif name in OSCAR_METHODS:
            specs.append(MethodSpec(name, "oscar", name))
        elif name in QUANTO_METHODS:
            specs.append(MethodSpec(name, "quanto", name))
        else:
            raise ValueError(
                f"Unknown method {name!r} in --methods: use {', '.join(REFERENCE_ALIASES + OSCAR_METHODS)}, "
                f"{', '.join(QUANTO_METHODS)}, or add a row with --variant NAME=BASE[:KEY=VALUE,...]."
            )
    for text in variants:
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"--variant {text!r}: expected NAME=BASE[:KEY=VALUE,...].")
        base, overrides = rest, {}
        head, colon, tail = rest.rpartition(":")
        if colon and "=" in tail:  # a bundle path may itself hold ':'; overrides always hold '='
            base = head
            for item in tail.split(","):
                key, eq, value = item.partition("=")
                if not eq:
                    raise ValueError(f"--variant {text!r}: override {item!r} is not KEY=VALUE.")
                overrides[key.strip()] = _parse_value(value.strip())
        if base in QUANTO_METHODS:
            kind, allowed = "quanto", QUANTO_OVERRIDES
        elif base in OSCAR_METHODS or os.path.isdir(base):
            kind, allowed = "oscar", OSCAR_OVERRIDES
        else:
            raise ValueError(
                f"--variant {text!r}: base {base!r} is neither a method ({', '.join(OSCAR_METHODS)}, "
                f"{', '.join(QUANTO_METHODS)}) nor an existing bundle directory."
            )
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ValueError(f"--variant {text!r}: unknown overrides {unknown}; this base accepts {list(allowed)}.")
        specs.append(MethodSpec(name, kind, base, overrides))
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Row names must be unique; repeated: {duplicates}.")
    return specs


def quanto_unavailable_reason() -> str | None:
    """Why transformers' quanto cache cannot run here, or None when it can."""
    try:
        from transformers.utils import is_optimum_quanto_available
    except ImportError:  # pragma: no cover - very old transformers
        return "this transformers has no optimum-quanto integration"
    if not is_optimum_quanto_available():
        return "optimum-quanto is not installed (pip install 'oscar-hf[quanto]' or pip install optimum-quanto)"
    return None


def calibration_overlap(bundle_config: dict, tokens_path: str, begin: int, end: int, num_tokens: int | None = None,
                        bundle: str = "the bundle") -> str | None:
    """A message when `[begin, end)` of `tokens_path` overlaps the calibration range recorded in a bundle's config
    (or its metadata). `num_tokens`, the length of the token file, resolves a negative recorded offset, which bundles
    made before oscar-calibrate refused one hold (Python slicing counted it from the end)."""
    calibration = bundle_config.get("calibration") or {}
    data, offset, count = calibration.get("data"), calibration.get("offset"), calibration.get("num_tokens")
    if data is None or offset is None or count is None:
        return None
    same_file = os.path.basename(str(data)) == os.path.basename(tokens_path)
    if os.path.exists(str(data)) and os.path.exists(tokens_path):
        same_file = os.path.samefile(str(data), tokens_path)
    if not same_file:
        return None
    cal_begin = int(offset)
    if cal_begin < 0:
        if num_tokens is None:
            return (f"{bundle} records a negative calibration offset ({cal_begin}) and the length of {tokens_path} is "
                    "unknown, so the overlap with the evaluation tokens cannot be checked.")
        cal_begin += num_tokens
    cal_end = cal_begin + int(count)
    if begin < cal_end and cal_begin < end:
        return (
            f"The evaluation tokens [{begin:,}, {end:,}) of {tokens_path} overlap the calibration tokens "
            f"[{cal_begin:,}, {cal_end:,}) recorded in {bundle}: the numbers would flatter the fitted rotations. "
            f"Pass --start {cal_end} (or later), or --allow-calibration-overlap to measure anyway."
        )
    return None


class CacheFactory:
    """Builds a fresh cache for one row; `describe()` is what the report records about it."""

    def __init__(self, spec: MethodSpec, model, args, bundles: dict):
        self.spec, self.model, self.args = spec, model, args
        self.rotations = None
        source = bundle_source(spec, args)
        if source is not None:
            self.rotations = bundles[source]
            self.source = source
        if spec.kind == "oscar":
            self.kwargs = {"sink_tokens": args.sink_tokens, "recent_tokens": args.recent_tokens, **spec.overrides}
        elif spec.kind == "quanto":
            self.kwargs = {"nbits": QUANTO_METHODS[spec.base], **QUANTO_DEFAULTS, **spec.overrides}
        else:
            self.kwargs = {}

    def __call__(self):
        if self.spec.kind == "exact":
            from transformers import DynamicCache

            return DynamicCache(config=self.model.config)
        if self.spec.kind == "quanto":
            from transformers import QuantizedCache

            return QuantizedCache(backend="quanto", config=self.model.config, **self.kwargs)
        if self.rotations is not None:
            return OscarQuantizedCache(self.model.config, rotations=self.rotations, **self.kwargs)
        return OscarQuantizedCache(self.model.config, method=self.spec.base, **self.kwargs)

    def describe(self) -> dict:
        if self.spec.kind == "exact":
            return {"type": "DynamicCache", "dtype": self.args.dtype}
        if self.spec.kind == "quanto":
            return {"type": "transformers.QuantizedCache", "backend": "quanto", **self.kwargs,
                    "note": "per-token groups of q_group_size channels (axis 0), scale and shift in the model dtype; "
                            "the newest tokens (up to residual_length) stay exact, no sink; the whole history is "
                            "re-quantized at every flush"}
        info = {"type": "OscarQuantizedCache", "method": self.rotations.method if self.rotations else self.spec.base,
                **self.kwargs}
        if self.rotations is not None:
            info["rotations"] = str(self.source)
            info["grouping"] = "layer" if self.rotations.groups == 1 else "head"
        return info


def bundle_source(spec: MethodSpec, args) -> str | None:
    """The bundle (directory or Hub id) a row quantizes with, or None for the data-free and non-OSCAR rows."""
    if spec.kind != "oscar" or spec.base in ("naive", "hadamard"):
        return None
    if spec.base != "oscar":
        return spec.base  # a bundle directory given with --variant
    if args.rotations is None:
        raise ValueError(f"Row {spec.name!r} needs fitted rotations: pass --rotations DIR (see oscar-calibrate).")
    return args.rotations


def table_rows(results: dict) -> dict[str, dict]:
    """`{row: {column label: value}}` for the Markdown table and the model card."""
    rows = {}
    for name, r in results.items():
        row = {label: r.get(key) for label, key in TABLE_COLUMNS}
        if "retrieval_exact_match" in r:
            row["Retrieval EM"] = r["retrieval_exact_match"]
        rows[name] = row
    return rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: dict[str, dict]) -> str:
    """A Markdown table (rows: methods, columns: metrics) in the same number format as the model card."""
    columns = list(dict.fromkeys(label for row in rows.values() for label in row))
    lines = ["| Method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def plot_kl(path: str, kl_per_step: dict[str, torch.Tensor], first_position: int, window: int, title: str) -> None:
    """KL(exact || method) against the context position, one smoothed line per method, log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib (or drop --plot)."
        ) from err
    fig, ax = plt.subplots(figsize=(8, 4.5))
    lowest = math.inf
    for name, kl in kl_per_step.items():
        # Step 0 is predicted by the prefill, which attends over the exact prompt: its KL is 0 and off a log axis.
        curve = smooth(torch.as_tensor(kl)[1:], window).numpy()
        positions = np.arange(first_position + 1, first_position + 1 + len(curve))
        ax.plot(positions, curve.clip(min=1e-12), label=name, linewidth=1.2)
        positive = curve[curve > 0]
        if positive.size:
            lowest = min(lowest, float(positive.min()))
    ax.set_yscale("log")
    if math.isfinite(lowest):
        ax.set_ylim(bottom=lowest / 2)
    ax.set_xlabel("context position (tokens)")
    ax.set_ylabel(f"KL(exact || method), {window}-step moving average")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def card_evaluation(report: dict) -> dict:
    """The `evaluation` entry of a bundle's oscar_config.json, in the format the model-card template reads."""
    s = report["settings"]
    rows = table_rows({k: v for k, v in report["results"].items()})
    metrics = list(dict.fromkeys(label for row in rows.values() for label in row))
    description = (
        f"Decode mode on `{os.path.basename(s['tokens'])}` tokens [{s['start']:,}, {s['end']:,}): prefill "
        f"{s['prefix_tokens']:,} tokens, then {s['eval_tokens']:,} tokens fed one decode step at a time, each step "
        f"compared with the exact {s['dtype']} cache (KL(exact || method), lower is better). 2-bit windows: sink "
        f"{s['sink_tokens']}, recent {s['recent_tokens']}. Measured {s['date']} on {s['device']}."
    )
    if report.get("retrieval"):
        r = report["retrieval"]["settings"]
        description += (
            f" Retrieval EM: exact match of the greedy answer over {r['cases']} needle cases of "
            f"~{r['context_tokens']:,} "
            f"tokens, fed in {r['chunk_tokens']}-token chunks."
        )
    return {"description": description, "metrics": metrics, "results": rows, "settings": s}


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 on success, 2 with a message for bad arguments or input (checked before the model loads)."""
    return run_main(build_parser(), argv, run)


def check_arguments(args, specs: list[MethodSpec]):
    """Everything that can be checked before the model's weights load: paths, the token file and its ids, every
    bundle (downloaded if a Hub id) against the model config, the calibration-overlap guard for each bundle, and a
    trial cache for every OSCAR row (its keyword overrides). Returns `(tokens, start, end, bundles)`."""
    from transformers import AutoConfig

    if args.update_card and not (args.rotations and os.path.isdir(os.path.expanduser(args.rotations))):
        raise ValueError("--update-card writes into the bundle directory: pass --rotations as a local directory.")
    check_writable_file(args.json_out, "--json")
    if args.plot:
        check_writable_file(args.plot, "--plot")
        try:
            import matplotlib  # noqa: F401
        except ImportError as err:
            raise RuntimeError(
                "--plot needs matplotlib, which is not installed: pip install 'oscar-hf[eval]' (or drop --plot)."
            ) from err
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as err:
            raise ValueError(f"--device {args.device!r}: {err}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available here; pass --device cpu.")
    if args.retrieval:
        import random

        from .retrieval import make_value

        make_value(random.Random(0), args.retrieval_value)

    tokens = load_token_array(args.tokens, "--tokens")
    start = EVAL_SPLIT_START if args.start is None else args.start
    end = start + args.prefix_tokens + args.eval_tokens
    if end > len(tokens):
        raise ValueError(
            f"{args.tokens} holds {len(tokens):,} tokens; [{start:,}, {end:,}) does not fit. Pass a smaller --start "
            f"(it defaults to {EVAL_SPLIT_START:,}, the reference model's evaluation split) or fewer tokens."
        )
    # The retrieval cases are drawn from everything after --start.
    checked_end = len(tokens) if args.retrieval else end
    config = AutoConfig.from_pretrained(args.model)
    check_token_ids(
        tokens[start:checked_end], vocab_size(config), f"--tokens {args.tokens} [{start:,}, {checked_end:,})"
    )

    bundles: dict[str, OscarRotations] = {}
    sources = [bundle_source(spec, args) for spec in specs] + ([args.rotations] if args.update_card else [])
    for source in dict.fromkeys(s for s in sources if s is not None):
        rotations = OscarRotations.from_pretrained(source, config=config)  # a Hub id is downloaded here
        bundles[source] = rotations
        overlap = calibration_overlap(rotations.metadata, args.tokens, start, checked_end, num_tokens=len(tokens),
                                      bundle=f"the bundle {source}")
        if overlap and not args.allow_calibration_overlap:
            raise ValueError(overlap)
        if overlap:
            print(f"oscar-eval: WARNING: {overlap}", file=sys.stderr)
    resolve_windows(args, bundles, config)
    for spec in specs:  # the cache checks its own keyword arguments; it allocates nothing before the first update
        if spec.kind == "oscar":
            source = bundle_source(spec, args)
            kwargs = {"sink_tokens": args.sink_tokens, "recent_tokens": args.recent_tokens, **spec.overrides}
            try:
                if source is None:
                    OscarQuantizedCache(config, method=spec.base, **kwargs)
                else:
                    OscarQuantizedCache(config, rotations=bundles[source], **kwargs)
            except (TypeError, ValueError) as err:
                raise ValueError(f"Row {spec.name!r}: {err}") from None
    return tokens, start, end, bundles


def resolve_windows(args, bundles: dict, config) -> None:
    """Set `args.sink_tokens` / `args.recent_tokens` to the windows every 2-bit row uses: each flag given, else the
    window the `--rotations` bundle records, else the cache's default. `args.windows_from` names the source of each."""
    names = ("sink_tokens", "recent_tokens")
    rotations = None
    if args.rotations is not None and any(getattr(args, name) is None for name in names):
        rotations = bundles.get(args.rotations) or OscarRotations.from_pretrained(args.rotations, config=config)
    windows = cache_windows(rotations, args.sink_tokens, args.recent_tokens)
    fallback = f"the bundle {args.rotations}" if rotations is not None and rotations.windows else "the default"
    args.windows_from = {
        name: "--" + name.replace("_", "-") if getattr(args, name) is not None else fallback for name in names
    }
    args.sink_tokens, args.recent_tokens = windows["sink_tokens"], windows["recent_tokens"]


def run(args) -> int:
    specs = parse_methods(args.methods, args.variant)
    for spec in specs:  # the exact row is named after the dtype it really runs in
        if spec.kind == "exact" and spec.name in REFERENCE_ALIASES:
            spec.name = DTYPE_LABELS[args.dtype]
    tokens, start, end, bundles = check_arguments(args, specs)

    from transformers import AutoModelForCausalLM

    import oscar_hf  # noqa: F401  (registers attn_implementation="oscar")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=DTYPES[args.dtype], attn_implementation="oscar"
    ).to(device).eval()
    progress = not args.no_progress

    reason = quanto_unavailable_reason()
    skipped = {}
    factories = {}
    for spec in specs:
        if spec.kind == "quanto" and reason:
            skipped[spec.name] = reason
            print(f"oscar-eval: skipping {spec.name}: {reason}", file=sys.stderr)
            continue
        factories[spec.name] = CacheFactory(spec, model, args, bundles)
    reference_name = next((s.name for s in specs if s.kind == "exact"), DTYPE_LABELS[args.dtype])

    settings = {
        "model": args.model, "rotations": args.rotations, "tokens": args.tokens, "start": start, "end": end,
        "prefix_tokens": args.prefix_tokens, "eval_tokens": args.eval_tokens, "dtype": args.dtype,
        "device": str(model.device) + (f" ({torch.cuda.get_device_name(model.device)})" if model.device.type == "cuda"
                                       else ""),
        "sink_tokens": args.sink_tokens, "recent_tokens": args.recent_tokens, "windows_from": args.windows_from,
        "reference": reference_name,
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "command": "oscar-eval " + " ".join(getattr(args, "argv", [])),
    }
    eval_ids = torch.from_numpy(np.asarray(tokens[start:end]).astype(np.int64))

    t0 = time.perf_counter()
    reference = decode_mode_run(model, eval_ids, args.prefix_tokens, progress=progress, desc=reference_name)
    results, kl_curves = {}, {}
    ref_seconds = time.perf_counter() - t0
    for spec in specs:
        if spec.name in skipped:
            continue
        factory = factories[spec.name]
        t0 = time.perf_counter()
        run_ = reference if spec.kind == "exact" else decode_mode_run(
            model, eval_ids, args.prefix_tokens, cache=factory(), progress=progress, desc=spec.name)
        metrics = compare_runs(reference, run_)
        kl = metrics.pop("kl_per_step")
        kv_bytes = cache_kv_bytes(run_.cache)
        metrics.update(
            kv_bits_per_element=cache_kv_bits_per_element(run_.cache), kv_bytes=kv_bytes, kv_mib=kv_bytes / 2**20,
            seconds=round(ref_seconds if spec.kind == "exact" else time.perf_counter() - t0, 1),
            cache=factory.describe(),
        )
        results[spec.name] = metrics
        if spec.kind != "exact":
            kl_curves[spec.name] = kl
        print(f"  {spec.name:>14}: ppl {metrics['perplexity']:.4f}  KL {metrics['kl_mean']:.5f} "
              f"(p99 {metrics['kl_p99']:.4f})  top-1 {metrics['top1_agreement']:.4f}  "
              f"{metrics['kv_bits_per_element']:.3f} bits/elem", file=sys.stderr)

    report = {"format": "oscar-eval/1", "settings": settings, "results": results, "skipped": skipped}
    if args.retrieval:
        report["retrieval"] = run_retrieval_rows(args, model, tokens[start:], factories, skipped, progress, results)
    report["kl_per_step"] = {"first_position": args.prefix_tokens,
                             **{k: [round(float(x), 7) for x in v] for k, v in kl_curves.items()}}
    table = markdown_table(table_rows(results))
    report["table_markdown"] = table

    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")
    if args.plot and kl_curves:
        title = (f"{os.path.basename(str(args.model).rstrip('/'))}: decode mode, prefill {args.prefix_tokens}, "
                 f"tokens [{start:,}, {end:,}), windows {args.sink_tokens}/{args.recent_tokens}")
        plot_kl(args.plot, kl_curves, args.prefix_tokens, args.smooth, title)
    if args.update_card:
        OscarRotations.attach_evaluation(os.path.expanduser(args.rotations), card_evaluation(report))
    print(table)
    for name, why in skipped.items():
        print(f"\n{name}: skipped ({why})")
    if args.retrieval:
        r = report["retrieval"]["settings"]
        print(f"\nRetrieval: {r['cases']} cases of {r['min_tokens']}-{r['max_tokens']} tokens, needle depth "
              f"{r['min_depth']:.2f}-{r['max_depth']:.2f}, fed {r['feeding']}.")
    print(f"\nwrote {args.json_out}" + (f", {args.plot}" if args.plot and kl_curves else "")
          + (f", {args.rotations}/README.md" if args.update_card else ""))
    return 0


def run_retrieval_rows(args, model, tokens, factories, skipped, progress, results) -> dict:
    """Run the needle cases for every row; adds `retrieval_exact_match` to `results` and returns the report part."""
    from transformers import AutoTokenizer

    from .retrieval import build_cases, case_summary, run_retrieval

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    cases = build_cases(tokenizer, tokens, args.retrieval, context_tokens=args.retrieval_context,
                        value_style=args.retrieval_value)
    chunk = args.retrieval_chunk or None
    feeding = (f"in {chunk}-token chunks (the first prefills, later ones attend over the stored cache), then greedy "
               "decode" if chunk
               else "in one forward (prefill: exact attention for the 2-bit caches), then greedy decode")
    out = {"settings": {**case_summary(cases), "context_tokens": args.retrieval_context, "chunk_tokens": chunk,
                        "feeding": feeding, "value_style": args.retrieval_value}, "results": {}}
    for name, factory in factories.items():
        t0 = time.perf_counter()
        r = run_retrieval(
            model, tokenizer, cases, factory, chunk_tokens=chunk, progress=progress, desc=f"needle {name}"
        )
        r["seconds"] = round(time.perf_counter() - t0, 1)
        out["results"][name] = r
        if name in results:
            results[name]["retrieval_exact_match"] = r["exact_match"]
        print(f"  {name:>14}: retrieval exact match {r['correct']}/{r['cases']}", file=sys.stderr)
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
