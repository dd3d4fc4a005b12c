"""Calibrate OSCAR rotations for a model, check them in decode mode, save and (optionally) share them on the Hub.

    python examples/calibrate_and_share.py --model /path/or/hub-id --data tokens.npy --num-tokens 65536 \
        --output ./my-bundle [--push-to-hub org/name]

The same as `oscar-calibrate`, from Python, with a small decode-mode comparison attached to the model card.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

import oscar_hf  # noqa: F401  (registers attn_implementation="oscar")
from oscar_hf import OscarQuantizedCache, OscarRotations
from oscar_hf.calibrate.core import calibrate
from oscar_hf.calibrate.data import load_calibration_tokens
from oscar_hf.evaluation import evaluate_caches


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help=".npy token ids")
    p.add_argument("--num-tokens", type=int, default=65536)
    p.add_argument("--eval-offset", type=int, default=None, help="first evaluation token (default: after calibration)")
    p.add_argument("--output", required=True)
    p.add_argument("--push-to-hub", default=None)
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=device)
    tokens = load_calibration_tokens(args.data, num_tokens=args.num_tokens)
    rotations, report = calibrate(model, tokens, seq_len=1024, weight_tokens=16384,
                                  metadata={"model_id": args.model, "calibration": {"data": args.data}})
    print(report.table())

    # Decode-mode check on tokens the calibration did not see: prefill 1024, then 256 teacher-forced steps.
    model.set_attn_implementation("oscar")
    start = args.eval_offset if args.eval_offset is not None else args.num_tokens
    eval_tokens = load_calibration_tokens(args.data, num_tokens=1024 + 257, offset=start)
    results = evaluate_caches(model, eval_tokens, 1024, {
        "hadamard": lambda: OscarQuantizedCache(config=model.config, method="hadamard"),
        "oscar": lambda: OscarQuantizedCache(config=model.config, rotations=rotations),
    })
    table = {
        name: {k: round(v, 5) for k, v in r.items() if k in ("kl_mean", "top1_agreement")}
        for name, r in results.items()
    }
    print(table)
    evaluation = {"metrics": ["kl_mean", "top1_agreement"], "results": table,
                  "description": "Decode mode, prefill 1,024 tokens then 256 teacher-forced steps; KL(bf16 || method)."}
    rotations.save_pretrained(args.output, evaluation=evaluation)
    assert OscarRotations.from_pretrained(args.output, config=model.config).method == "oscar"
    if args.push_to_hub:
        rotations.push_to_hub(args.push_to_hub, evaluation=evaluation)
        print(f"pushed to {args.push_to_hub}")


if __name__ == "__main__":
    main()
