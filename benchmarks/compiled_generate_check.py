"""generate() with a static OscarQuantizedCache on a real model: compiled (generate()'s own torch.compile, CUDA graphs)
against eager, same tokens, one compilation, and the time of each.

    python benchmarks/compiled_generate_check.py .assets/oscar-ref-code-qwen3 --prompt-tokens 2048 --new-tokens 256
    python benchmarks/compiled_generate_check.py .assets/oscar-ref-code-qwen3 --batch 3 --padded   # left padding
    python benchmarks/compiled_generate_check.py .assets/oscar-ref-code-qwen3 --backend cudagraphs  # exact check

Both runs use `attn_implementation="oscar"`, the Triton kernels and a cache built with `max_cache_len`; the eager run
passes `disable_compile=True`. By default the compiled run is generate()'s own compilation (inductor,
mode="reduce-overhead"), whose fused kernels for the model's own ops (norms, MLP) may move near-tied greedy tokens;
`--backend cudagraphs` captures the same step in CUDA graphs without inductor, where every token must match.
Prints the share of identical greedy tokens, how many graphs dynamo compiled (1 means
no recompilation across the demotions), and the wall time of each run (the first compiled run includes compilation).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import oscar_hf  # noqa: F401  (registers the "oscar" attention)
from oscar_hf import OscarQuantizedCache, cache_keyword

EVAL_START = 1_048_576 + 300_000  # evaluation split of heldout_tokens.npy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--padded", action="store_true", help="left-pad sequence i by i * prompt/4 tokens")
    p.add_argument("--method", default="hadamard", choices=("hadamard", "naive"))
    p.add_argument("--backend", default=None, help="a torch.compile backend for generate()'s compile_config "
                   "(default: generate()'s own, inductor with CUDA graphs)")
    args = p.parse_args()
    dev = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="oscar").to(dev)
    model.eval()
    tokens = np.load(f"{args.model}/heldout_tokens.npy", mmap_mode="r")
    ids = torch.stack(
        [
            torch.from_numpy(tokens[EVAL_START + i * 10_000 :][: args.prompt_tokens].astype(np.int64))
            for i in range(args.batch)
        ]
    ).to(dev)
    mask = torch.ones_like(ids)
    if args.padded:
        for i in range(args.batch):
            pad = i * args.prompt_tokens // 4
            ids[i, :pad], mask[i, :pad] = 0, 0
    kw = dict(method=args.method, max_cache_len=args.prompt_tokens + args.new_tokens + 8)

    def run(**extra):
        cache = OscarQuantizedCache(model.config, **kw)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **{cache_keyword(model): cache}, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, **extra)
        torch.cuda.synchronize()
        return out, time.perf_counter() - t, cache

    eager, t_eager, _ = run(disable_compile=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    extra = {}
    if args.backend:
        from transformers import CompileConfig

        extra["compile_config"] = CompileConfig(backend=args.backend, mode=None)
    compiled, t_first, cache = run(**extra)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled2, t_second, _ = run(**extra)
    graphs_after = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    new_e, new_c = eager[:, args.prompt_tokens :], compiled2[:, args.prompt_tokens :]
    same = (new_e == new_c).float().mean().item()
    first_diff = (new_e != new_c).nonzero()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers "
          f"{__import__('transformers').__version__}")
    print(f"compiled with: {args.backend or 'generate() default (inductor, reduce-overhead)'}")
    print(f"batch {args.batch}{' (left-padded)' if args.padded else ''}, prompt {args.prompt_tokens}, "
          f"new {args.new_tokens}; cache compileable: {cache.is_compileable}; layer 0 {cache.quantized_layers()[0]}")
    print(f"same greedy tokens (compiled vs eager generate): {same * 100:.1f}%  first difference at "
          f"{first_diff[:1].tolist()}")
    print(f"compiled run 1 == compiled run 2: {torch.equal(compiled, compiled2)}")
    print(f"dynamo graphs compiled: {graphs} in the first compiled run, {graphs_after} after the second "
          "(the same number: no recompilation)")
    print(f"generate() eager {t_eager:.2f} s; compiled {t_second:.2f} s (first, with compilation: {t_first:.2f} s)")


if __name__ == "__main__":
    main()
