"""Calibration time on a GPU for a Qwen3-8B-shaped random-weight model (speed does not depend on weight values).

    python benchmarks/bench_calibrate.py                       # 36 layers, 32 q / 8 kv heads, head_dim 128, 32K tokens
    python benchmarks/bench_calibrate.py --rotation fitted --grouping layer --clip-fit   # the paper's recipe + clip fit

Reports the seconds of `oscar_hf.calibrate.core.calibrate` (both statistics passes, the eigendecompositions and the clip
search on held-back tokens) and of each phase's forward passes, plus peak GPU memory. Target: under 2 minutes for
32K tokens on one H100.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import oscar_hf  # noqa: F401
from oscar_hf.calibrate.core import calibrate


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grouping", default="head", choices=("layer", "head", "auto"))
    p.add_argument("--rotation", default="hadamard", choices=("hadamard", "fitted"))
    p.add_argument("--clip-fit", action="store_true")
    p.add_argument("--no-error-feedback", action="store_true")
    p.add_argument("--key-tilt", type=float, default=None, help="default: calibrate()'s (2 with per-head feedback)")
    p.add_argument("--weight-tokens", type=int, default=-1, help="-1: exact two passes over all fitting tokens")
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("This benchmark needs a CUDA GPU.")
    config = Qwen3Config(  # Qwen3-8B geometry
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=args.layers, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build the 8B model directly in bf16 (no float32 copy)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    tokens = torch.randint(0, config.vocab_size, (args.tokens,))
    # Warm-up (CUDA context, kernels) on one short sequence, not timed.
    calibrate(model, tokens[: 2 * args.seq_len], seq_len=args.seq_len, heldout_tokens=args.seq_len, progress=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    rot, report = calibrate(
        model, tokens, seq_len=args.seq_len, batch_size=args.batch_size, grouping=args.grouping,
        weight_tokens=None if args.weight_tokens < 0 else args.weight_tokens, progress=True,
        rotation=args.rotation, fit_clip=args.clip_fit, error_feedback=not args.no_error_feedback,
        key_tilt=args.key_tilt,
    )
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "device": torch.cuda.get_device_name(),
        "tokens": args.tokens,
        "fit_tokens": report.fit_tokens,
        "heldout_tokens": report.heldout_tokens,
        "layers": args.layers,
        "grouping": args.grouping,
        "rotation": args.rotation,
        "clip_fit": args.clip_fit,
        "error_feedback": not args.no_error_feedback,
        "key_tilt": rot.metadata["calibration"]["key_tilt"],
        "seconds": round(seconds, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "target_seconds": 120,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
