"""Decode-mode KL of the default bundle with and without the key grid refit (`key_grid_refit=True`), on the CPU.

Same bundle, same tokens, float32 model, deterministic: the difference between the two rows is the refit alone (no
calibration-to-calibration noise). Run on validation segments (inside the calibration split, outside the bundle's
calibration tokens) to choose; the evaluation segments are for the device run that confirms.

    python benchmarks/research/key_grid_refit_cpu.py --model M --bundle DIR --starts 300000,500000 --steps 2048
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from oscar_hf import OscarQuantizedCache
from oscar_hf.evaluation import compare_runs, decode_mode_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--starts", default="300000,500000,700000,900000")
    ap.add_argument("--steps", type=int, default=2048)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokens = np.load(f"{args.model}/heldout_tokens.npy", mmap_mode="r")
    for start in (int(s) for s in args.starts.split(",")):
        ids = torch.as_tensor(np.asarray(tokens[start : start + args.prefix + args.steps + 1]).astype(np.int64))
        t0 = time.time()
        ref = decode_mode_run(model, ids, args.prefix)
        row = {}
        for name, refit in (("default", False), ("key refit", True)):
            cache = OscarQuantizedCache.from_pretrained(args.bundle, config=model.config, key_grid_refit=refit)
            m = compare_runs(ref, decode_mode_run(model, ids, args.prefix, cache=cache))
            row[name] = (m["kl_mean"], m["perplexity"])
        print(start, " ".join(f"{k}: KL {v[0]:.5f} ppl {v[1]:.4f}" for k, v in row.items()),
              f"({row['key refit'][0] / row['default'][0] - 1:+.1%}, {time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
