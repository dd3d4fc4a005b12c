"""`oscar-calibrate`: fit an OSCAR rotation bundle for a model and save (and optionally push) it."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from oscar_hf.cli_args import (
    check_output_dir,
    check_token_ids,
    int_at_least,
    non_negative_float,
    non_negative_int,
    positive_int,
    run_main,
    vocab_size,
)

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="oscar-calibrate",
        description="Fit OSCAR 2-bit KV-cache rotations and clip ratios for a model on calibration text.",
    )
    p.add_argument("--model", required=True, help="local path or Hub id of a transformers causal LM")
    p.add_argument("--revision", default=None, help="model revision (branch, tag or commit) on the Hub")
    p.add_argument("--data", required=True, help=".npy token ids, or .txt / .jsonl text (tokenized with the model's)")
    p.add_argument("--num-tokens", type=positive_int, required=True, help="calibration tokens to use (fit + held back)")
    p.add_argument("--offset", type=non_negative_int, default=0, help="first token of --data to use")
    p.add_argument("--output", required=True, help="directory to write the bundle into")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also push the bundle to this Hub repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--grouping", choices=("layer", "head", "auto"), default="head",
                   help="one rotation and feedback factor per KV head (default), per layer (the reference), or a "
                        "per-layer choice on held-back error")
    p.add_argument("--seq-len", type=positive_int, default=1024, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=positive_int, default=1, help="calibration sequences per forward")
    p.add_argument("--heldout-tokens", type=non_negative_int, default=None,
                   help="tokens held back from the fit to measure the bundle's error (and fit clips with "
                        "--clip-fit); default N/16, at most 4096")
    p.add_argument("--weight-tokens", type=int_at_least(-1, "a non-negative integer, or -1 for all"), default=16384,
                   help="--rotation fitted: tokens of pass 1 (the query covariance that weights the values); -1: all "
                        "fitting tokens (the exact two-pass recipe). Pass 2 always covers all fitting tokens.")
    p.add_argument("--clip-fit", action=argparse.BooleanOptionalAction, default=False,
                   help="choose clip ratios per layer and K/V on held-back tokens (default: 0.96 / 0.96 with error "
                        "feedback, the reference 0.96 / 0.92 without)")
    p.add_argument("--error-feedback", action=argparse.BooleanOptionalAction, default=True,
                   help="code K and V with error feedback in the query-covariance / o_proj metrics (default); "
                        "--no-error-feedback: plain rounding, as the reference recipe")
    p.add_argument("--center-keys", action=argparse.BooleanOptionalAction, default=False,
                   help="store keys minus their calibrated mean per KV head (softmax ignores the shift); "
                        "off by default")
    p.add_argument("--key-tilt", type=non_negative_float, default=None,
                   help="strength of the attention tilt of the key coding: each key is coded in the metric of the "
                        "queries that will attend to it (default 3 with per-head error feedback; 0: off)")
    p.add_argument("--rotation", choices=("fitted", "hadamard"), default="hadamard",
                   help="hadamard (default): the data-free rotation, the statistics go to the error feedback; "
                        "fitted: R = U.H.P_br from the covariances (the paper's recipe)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="auto",
                   help="model dtype (auto: float32 on CPU, the checkpoint's dtype on GPU)")
    p.add_argument("--device-map", default=None, help='e.g. "auto", "cuda", "cpu" (default: cuda if available)')
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 on success, 2 with a message for bad arguments or input (checked before the model loads)."""
    return run_main(build_parser(), argv, run)


def check_arguments(args) -> None:
    """What can be checked without the model config: paths and the Hub repo id."""
    if not os.path.isfile(args.data):
        raise FileNotFoundError(f"--data {args.data}: no such file.")
    if not args.data.lower().endswith((".npy", ".txt", ".jsonl")):
        raise ValueError(f"--data {args.data}: use .npy token ids, or .txt / .jsonl text.")
    check_output_dir(args.output, "--output")
    if args.push_to_hub:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as err:
            raise ValueError(f"--push-to-hub {args.push_to_hub!r} is not a Hub repository id ({err}).") from None


def run(args) -> int:
    check_arguments(args)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import oscar_hf  # noqa: F401  (registers the attention functions)

    from .core import calibrate, plan_calibration
    from .data import load_calibration_tokens

    # Everything the run needs is checked before the model's weights load: the config, the tokens and the settings.
    config = AutoConfig.from_pretrained(args.model, revision=args.revision)
    if args.center_keys:
        from oscar_hf.cache_checks import refuse_key_centering_under_softcap
        from oscar_hf.geometry import model_name

        text_config = config.get_text_config()
        refuse_key_centering_under_softcap(text_config, True, model_name(text_config), where="--center-keys")
    tokenizer = None
    if not args.data.lower().endswith(".npy"):
        tokenizer = AutoTokenizer.from_pretrained(args.model, revision=args.revision)
    tokens = load_calibration_tokens(args.data, tokenizer, num_tokens=args.num_tokens, offset=args.offset)
    check_token_ids(tokens.numpy(), vocab_size(config), f"--data {args.data} (tokens {args.offset:,} onwards)")
    settings = {
        "seq_len": args.seq_len, "batch_size": args.batch_size, "grouping": args.grouping,
        "heldout_tokens": args.heldout_tokens, "weight_tokens": None if args.weight_tokens < 0 else args.weight_tokens,
        "fit_clip": args.clip_fit, "error_feedback": args.error_feedback, "rotation": args.rotation,
        "key_tilt": args.key_tilt,
    }
    plan_calibration(int(tokens.numel()), **settings)

    if args.threads:
        torch.set_num_threads(args.threads)
    device_map = args.device_map or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    if dtype is None:
        dtype = torch.float32 if device_map == "cpu" else "auto"
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.model, revision=args.revision, dtype=dtype, device_map=device_map, attn_implementation="sdpa"
    )
    metadata = {
        "model_id": args.model,
        "model_revision": args.revision or getattr(model.config, "_commit_hash", None),
        "calibration": {"data": args.data, "offset": args.offset, "num_tokens": int(tokens.numel())},
    }
    rotations, report = calibrate(
        model, tokens, **settings, center_keys=args.center_keys, progress=not args.no_progress, metadata=metadata
    )
    rotations.metadata["calibration"]["seconds"] = round(report.seconds, 1)
    rotations.save_pretrained(args.output)
    total = time.perf_counter() - t0
    print(f"oscar-calibrate: {args.model}")
    print(f"  tokens: {report.fit_tokens} fitted + {report.heldout_tokens} held back (of {tokens.numel()} requested)")
    print(f"  time: {report.seconds:.1f} s calibration, {total:.1f} s total (device {model.device})")
    print(f"  grouping: {report.grouping} -> per layer {','.join(report.layer_grouping)}")
    calibration = rotations.metadata["calibration"]
    print(f"  coding: error feedback {calibration['error_feedback']}; key attention tilt "
          f"{calibration['key_tilt'] or 'off'}")
    if report.errors:
        print("  held-back attention-output error ||O_q - O||^2/||O||^2 (oscar: this bundle; hadamard: plain rounding, "
              "0.96/0.92):")
    print("\n".join("    " + line for line in report.table().splitlines()))
    if report.errors:
        for kind in ("k", "v"):
            ours, base = sum(report.errors[f"{kind}_oscar"]), sum(report.errors[f"{kind}_hadamard"])
            if ours <= 0 or base <= 0:  # no held-back query saw a quantized key (too few tokens)
                verdict = "not comparable"
            else:
                verdict = f"{base / ours:.2f}x lower" if base >= ours else f"{ours / base:.2f}x higher"
            print(f"  {kind.upper()} error, sum over layers: oscar {ours:.3e} vs hadamard {base:.3e} ({verdict})")
        if rotations.v_feedback is not None:
            print("  (values are coded for their error after o_proj, which this raw attention-output error does not "
                  "weigh; the decode-mode KL of oscar-eval is the end-to-end measure)")
    print(f"  bundle written to {args.output}")
    if args.push_to_hub:
        info = rotations.push_to_hub(args.push_to_hub, private=args.private or None)
        print(f"  pushed to {args.push_to_hub}: {getattr(info, 'commit_url', info)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
