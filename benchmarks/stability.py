"""Long-run stability: one sequence decoded for many steps through an OscarQuantizedCache.

    python benchmarks/stability.py .assets/oscar-ref-code-qwen3 --steps 20000 --baseline --json stability.json
    python benchmarks/stability.py .assets/oscar-ref-code-qwen3 --steps 20000 --compile   # compiled static cache
    python benchmarks/stability.py ../shared/models/oscar-ref-code-qwen3 --steps 300 --every 100 --device cpu  # dry run

A prompt of held-out tokens, then `--steps` single-token decode steps in one sequence (greedy, or teacher-forced on
held-out tokens with `--teacher-forced`), every step through the model's `"oscar"` attention. Every `--every` steps it
records: time per step over the window, held bytes per cached token (must settle to a constant: 2.25 bits per
element for the body plus the fixed exact windows), allocated bytes per token (the body's spare capacity), the
segment lengths, and whether any logit was NaN/Inf. The reference model was trained on 4K-token sequences, so
beyond that its predictions degrade (RoPE extrapolation) whatever the cache; what this measures is the cache: no
non-finite values, no memory drift, and a per-step time that grows only as attention over a longer context does.
`--baseline` also times a DynamicCache decode step at each checkpoint's context length (prefilled with the same
tokens), which is that context's own cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import oscar_hf
from oscar_hf import OscarQuantizedCache, cache_keyword


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def held_out(path: str, n: int, offset: int) -> torch.Tensor | None:
    file = Path(path) / "heldout_tokens.npy"
    if not file.exists():
        return None
    ids = np.load(file, mmap_mode="r", allow_pickle=False)
    if offset + n > ids.shape[0]:
        raise ValueError(f"{file} holds {ids.shape[0]} tokens; offset {offset} + {n} needed.")
    return torch.from_numpy(np.asarray(ids[offset : offset + n], dtype=np.int64))


@torch.no_grad()
def baseline_step_ms(model, tokens: torch.Tensor, device, repeats: int = 20) -> float:
    """Mean time of a DynamicCache decode step after prefilling `tokens` (SDPA over the exact context)."""
    cache = DynamicCache(config=model.config)
    model(input_ids=tokens[None, :-1].to(device), **{cache_keyword(model): cache}, logits_to_keep=1)
    step = tokens[None, -1:].to(device)
    model(input_ids=step, **{cache_keyword(model): cache})  # warm-up
    cache.crop(-1)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        model(input_ids=step, **{cache_keyword(model): cache})
        cache.crop(-1)
    sync(device)
    return 1e3 * (time.perf_counter() - start) / repeats


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="model path (the reference model, e.g. .assets/oscar-ref-code-qwen3)")
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--every", type=int, default=1000, help="steps per recorded window")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--method", default="hadamard", choices=("hadamard", "naive"))
    p.add_argument("--rotations", default=None, help="an OSCAR bundle directory (overrides --method)")
    p.add_argument("--teacher-forced", action="store_true", help="feed held-out tokens instead of greedy ones")
    p.add_argument("--baseline", action="store_true", help="time a DynamicCache step at each checkpoint's length")
    p.add_argument("--compile", action="store_true",
                   help="a static cache (max_cache_len) and the decode step compiled as generate() compiles it "
                   "(torch.compile(mode='reduce-overhead') on CUDA: one captured step replayed across demotions)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, args.dtype), attn_implementation=oscar_hf.OSCAR_ATTENTION
    ).to(device).eval()
    needed = args.prompt_tokens + args.steps + 1
    tokens = held_out(args.model, needed, 1_048_576)  # the evaluation part of the held-out set
    if tokens is None:
        if args.teacher_forced:
            p.error("--teacher-forced needs heldout_tokens.npy in the model directory")
        tokens = torch.randint(0, model.config.vocab_size, (needed,), generator=torch.Generator().manual_seed(0))
    # Compiled decoding needs static buffers: capacity for the whole run.
    sizing = {"max_cache_len": needed} if args.compile else {}
    if args.rotations:
        cache = OscarQuantizedCache.from_pretrained(args.rotations, config=model.config, **sizing)
    else:
        cache = OscarQuantizedCache(model.config, method=args.method, **sizing)

    prompt = tokens[None, : args.prompt_tokens].to(device)
    logits = model(input_ids=prompt, **{cache_keyword(model): cache}).logits[:, -1]
    position = [args.prompt_tokens]
    step_fn = model.forward
    if args.compile:
        # (On the CPU, a dry run: dynamo traces the step, no inductor code generation.)
        step_fn = torch.compile(model.forward, **({"mode": "reduce-overhead"} if device.type == "cuda"
                                                   else {"backend": "eager"}))

    def forward(ids):
        if args.compile and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        pos = torch.full_like(ids, position[0])
        position[0] += 1
        # Cloned: a replayed CUDA graph overwrites its output at the next step.
        return step_fn(input_ids=ids, position_ids=pos, **{cache_keyword(model): cache}).logits[:, -1].clone()
    context = tokens[: args.prompt_tokens].tolist()
    bad = torch.zeros((), dtype=torch.bool, device=device)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    rows, generated = [], []
    layer = cache.quantized_layers()[0]
    kv_rows = 2 * layer.batch_size * layer.num_heads * len(cache.quantized_layers())
    sync(device)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        if args.teacher_forced:
            nxt = tokens[args.prompt_tokens + step - 1].view(1, 1).to(device)
            nll += torch.nn.functional.cross_entropy(logits.float(), nxt.view(1)).double()
        else:
            nxt = logits.argmax(-1, keepdim=True)
        generated.append(nxt)
        logits = forward(nxt)
        bad |= ~torch.isfinite(logits).all()
        if step % args.every == 0 or step == args.steps:
            sync(device)
            elapsed = time.perf_counter() - start
            window = step - (rows[-1]["step"] if rows else 0)
            context += torch.cat(generated).view(-1).tolist()
            generated = []
            length = cache.get_seq_length()
            row = {
                "step": step,
                "context": length,
                "ms_per_step": 1e3 * elapsed / window,
                "held_bytes_per_token": cache.held_bytes() / length,
                "allocated_bytes_per_token": cache.allocated_bytes() / length,
                "held_bits_per_element": cache.kv_bits_per_element(),
                "sink_body_recent": (layer.sink_len, layer.body_len, layer.recent_len),
                "non_finite": bool(bad),
            }
            if args.teacher_forced:
                row["nll"] = nll.item() / window
                nll.zero_()
            if device.type == "cuda":
                row["cuda_allocated_mib"] = torch.cuda.memory_allocated(device) / 2**20
            if args.baseline:
                row["dynamic_cache_ms_per_step"] = baseline_step_ms(model, torch.tensor(context[-length - 1 :]), device)
            rows.append(row)
            print(json.dumps(row), flush=True)
            sync(device)
            start = time.perf_counter()

    body_row_bytes = layer.head_dim // 4 + 4  # codes + fp16 scale and offset, per (token, head) row
    first, last = rows[0], rows[-1]
    marginal = (
        last["held_bytes_per_token"] * last["context"] - first["held_bytes_per_token"] * first["context"]
    ) / max(
        1, last["context"] - first["context"]
    )
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{device_name}, torch {torch.__version__}, {args.dtype}, method {args.rotations or args.method}, "
          f"{'teacher-forced' if args.teacher_forced else 'greedy'}{', compiled' if args.compile else ''}, "
          f"prompt {args.prompt_tokens}, {args.steps} steps")
    head = "| step | context | ms/step | DynamicCache ms/step | held B/token | alloc B/token | bits/elem | non-finite |"
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    for r in rows:
        base = f"{r['dynamic_cache_ms_per_step']:.2f}" if "dynamic_cache_ms_per_step" in r else "-"
        print(f"| {r['step']} | {r['context']} | {r['ms_per_step']:.2f} | {base} | {r['held_bytes_per_token']:.1f} | "
              f"{r['allocated_bytes_per_token']:.1f} | {r['held_bits_per_element']:.3f} | {r['non_finite']} |")
    print(f"\nmarginal held bytes per new token {marginal:.1f} (2-bit body rows alone: {kv_rows * body_row_bytes} B; "
          "the exact windows' share of it shrinks with the distance between checkpoints)")
    # Stable: nothing non-finite, the exact windows bounded (so memory per token falls towards the 2-bit rate instead
    # of drifting up), and spare capacity within the body's growth factor.
    windows_bounded = all(
        r["sink_body_recent"][0] <= layer.sink_tokens and r["sink_body_recent"][2] <= layer.recent_capacity
        for r in rows
    )
    # (A static cache allocates the whole run up front: its spare capacity shrinks as it fills, by design. The undo
    # rings, exact copies of the newest demoted rows for `crop`, are a fixed size per layer, like the windows.)
    ring_bytes = sum(2 * q.undo_keys.numel() * q.undo_keys.element_size() for q in cache.quantized_layers())
    spare_ok = args.compile or (
        last["allocated_bytes_per_token"] - ring_bytes / last["context"] <= 2 * last["held_bytes_per_token"]
    )
    ok = not any(r["non_finite"] for r in rows) and windows_bounded and spare_ok
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device_name, "rows": rows}, indent=1))
    print("stable" if ok else "UNSTABLE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
