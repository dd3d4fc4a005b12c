"""GraphDecoder on a real model: greedy tokens against generate() with the same cache settings, and step times.

    python benchmarks/graph_decode_check.py .assets/oscar-ref-code-qwen3 --prompt-tokens 2048 --new-tokens 256

Both runs use `attn_implementation="oscar"` and the Triton kernels; the graph run captures one decode step and replays
it (demotions between replays). Prints the share of identical greedy tokens and the median step time of each path.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import oscar_hf  # noqa: F401  (registers the "oscar" attention)
from oscar_hf import OscarQuantizedCache, cache_keyword
from oscar_hf.graphs import GraphDecoder

EVAL_START = 1_048_576 + 300_000  # evaluation split of heldout_tokens.npy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    dev = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="oscar").to(dev)
    model.eval()
    tokens = np.load(f"{args.model}/heldout_tokens.npy", mmap_mode="r")
    ids = torch.stack(
        [torch.from_numpy(tokens[EVAL_START + i * 10_000 :][: args.prompt_tokens].astype(np.int64)) for i in range(args.batch)]
    ).to(dev)
    total = args.prompt_tokens + args.new_tokens
    kw = dict(method="hadamard", max_cache_len=total + 8)

    def timed(fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - t

    eager, t_eager = timed(
        lambda: model.generate(
            ids, attention_mask=torch.ones_like(ids), **{cache_keyword(model): OscarQuantizedCache(model.config, **kw)},
            max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    )
    dec = GraphDecoder(model, OscarQuantizedCache(model.config, **kw))
    graph, t_graph = timed(lambda: dec.generate(ids, args.new_tokens))  # includes warm-up and capture
    graph2, t_graph2 = timed(lambda: GraphDecoder(model, OscarQuantizedCache(model.config, **kw)).generate(ids, args.new_tokens))
    new_e, new_g = eager[:, args.prompt_tokens :], graph2[:, args.prompt_tokens :]
    same = (new_e == new_g).float().mean().item()
    first_diff = (new_e != new_g).nonzero()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"batch {args.batch}, prompt {args.prompt_tokens}, new {args.new_tokens}")
    print(f"same greedy tokens (graph vs generate): {same * 100:.1f}%  first difference at {first_diff[:1].tolist()}")
    print(f"graph run 1 == graph run 2: {torch.equal(graph, graph2)}")
    print(f"generate() eager total {t_eager:.2f} s; GraphDecoder total {t_graph2:.2f} s (first, with capture: {t_graph:.2f} s)")


if __name__ == "__main__":
    main()
