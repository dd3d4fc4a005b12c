"""Quickstart: generate with a 2-bit OSCAR-family KV cache and compare it with an exact cache.

    python examples/quickstart.py                       # reference model if found, else a tiny random Qwen3
    python examples/quickstart.py --model PATH --rotations DIR_OR_HUB_ID --prompt-file FILE

Runs offline. Without `--rotations` the calibration-free Hadamard rotation is used. The default prompt is 1,024
tokens of held-out code (reference model) or random tokens (tiny model), long enough for the 2-bit body to be used.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from oscar_hf import OscarQuantizedCache, cache_keyword  # importing oscar_hf registers attn_implementation="oscar"

HERE = Path(__file__).resolve().parent
DEFAULT_REF = Path(os.environ.get("OSCAR_REF_MODEL", HERE.parent.parent / "shared" / "models" / "oscar-ref-code-qwen3"))
PROMPT = '''import os
import json


def load_config(path):
    """Load a JSON configuration file and return it as a dict."""
'''


def load_model(name: str | None):
    """`(model, tokenizer or None, description)`: `--model`, else the reference model, else a tiny random Qwen3."""
    path = name or (str(DEFAULT_REF) if (DEFAULT_REF / "config.json").exists() else None)
    if path is not None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="oscar")
        return model.eval(), AutoTokenizer.from_pretrained(path), path
    from transformers import Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        pad_token_id=0,
        eos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="oscar", dtype=torch.bfloat16)
    return model.eval(), None, "tiny random Qwen3 (no reference model found)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory or Hub id (default: the reference model, else tiny random)")
    parser.add_argument("--rotations", help="OSCAR rotation bundle (directory or Hub id); default: Hadamard")
    parser.add_argument("--prompt-file", help="text file to use as the prompt")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="length of the default prompt")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--sink-tokens", type=int, default=None,
                        help="exact leading tokens (default: the bundle's recorded window, else 64)")
    parser.add_argument("--recent-tokens", type=int, default=None,
                        help="exact newest tokens (default: the bundle's recorded window, else 256)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    model, tokenizer, description = load_model(args.model)
    model.to(args.device)
    print(f"model: {description}")
    heldout = Path(description) / "heldout_tokens.npy"
    if args.prompt_file:
        ids = tokenizer(Path(args.prompt_file).read_text(), return_tensors="pt").input_ids
    elif heldout.exists():
        import numpy as np

        # The evaluation part of the reference model's held-out code (tokens from 1,048,576 on), never calibrated on.
        start = 1_048_576 + 4096
        ids = torch.from_numpy(
            np.load(heldout, mmap_mode="r")[start : start + args.prompt_tokens].astype("int64")
        )[None]
    elif tokenizer is not None:
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    else:
        ids = torch.randint(
            1, model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)
        )
    ids = ids.to(args.device)

    windows = dict(sink_tokens=args.sink_tokens, recent_tokens=args.recent_tokens)
    if args.rotations:
        cache = OscarQuantizedCache.from_pretrained(args.rotations, config=model.config, **windows)
    else:
        cache = OscarQuantizedCache(model.config, method="hadamard", **windows)
    # `cache=` from transformers 5.24, `past_key_values=` before (and still accepted, with a warning, until 6.0).
    kw = cache_keyword(model)
    with torch.no_grad():
        out = model.generate(ids, **{kw: cache}, max_new_tokens=args.max_new_tokens, do_sample=False)
        new_tokens = out[:, ids.shape[1] :]
        # Agreement with an exact cache, teacher-forced on the tokens generated with the 2-bit cache.
        exact = model(out[:, :-1], **{kw: DynamicCache(config=model.config)}).logits[:, ids.shape[1] - 1 :]

    # Logits of the quantized run, recomputed step by step through a fresh cache of the same kind.
    if args.rotations:
        replay = OscarQuantizedCache.from_pretrained(args.rotations, config=model.config, **windows)
    else:
        replay = OscarQuantizedCache(model.config, method="hadamard", **windows)
    with torch.no_grad():
        steps = [model(ids, **{kw: replay}).logits[:, -1:]]
        for pos in range(ids.shape[1], out.shape[1] - 1):
            steps.append(model(out[:, pos : pos + 1], **{kw: replay}).logits)
    quant = torch.cat(steps, dim=1)
    p_log = torch.log_softmax(exact.float(), -1)
    q_log = torch.log_softmax(quant.float(), -1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1).mean().item()
    top1 = (p_log.argmax(-1) == q_log.argmax(-1)).float().mean().item()

    text = tokenizer.decode(new_tokens[0]) if tokenizer is not None else str(new_tokens[0].tolist())
    shown_prompt = tokenizer.decode(ids[0, -200:]) if tokenizer is not None else "..."
    print("-" * 60 + "\n" + shown_prompt + "\033[1m" + text + "\033[0m\n" + "-" * 60)
    seq = out.shape[1] - 1
    layers = cache.quantized_layers()
    exact_bytes = sum(2 * l.batch_size * l.num_heads * l.head_dim * seq * 2 for l in layers)
    print(f"cached tokens:        {cache.get_seq_length()} (sink {layers[0].sink_len}, 2-bit {layers[0].body_len}, "
          f"recent {layers[0].recent_len})")
    print(f"KV bytes BF16:        {exact_bytes:,}")
    print(f"KV bytes {cache.method:<12} {cache.held_bytes():,}")
    print(f"bits per element:     {cache.kv_bits_per_element():.3f}")
    print(f"agreement with BF16:  KL {kl:.4f} nats/token, top-1 {top1:.3f} over {quant.shape[1]} generated tokens")
    if cache.quantized_layers()[0].body_len == 0:
        print("note: the context fits in the exact windows; pass --max-new-tokens or smaller --recent-tokens to "
              "exercise the 2-bit body.")


if __name__ == "__main__":
    main()
