"""OscarQuantizedCache under transformers' tensor parallelism (`tp_plan="auto"`), one process per GPU (issue 22):

    torchrun --nproc-per-node 2 benchmarks/multi_gpu_tp.py .assets/oscar-ref-code-qwen3 [--bundle DIR]
    torchrun --nproc-per-node 4 benchmarks/multi_gpu_tp.py --random-8b-layers 36 --speed-context 131072 --no-check
    # CPU dry run (gloo), tiny random model:
    torchrun --nproc-per-node 2 benchmarks/multi_gpu_tp.py --random-tiny --speed-context 512 --dtype float32

Every rank loads the model with `tp_plan="auto"` and `attn_implementation="oscar"` and builds its cache exactly as on
one process (`OscarQuantizedCache(config, ...)` or `.from_pretrained(bundle, config=...)`): the cache sees the rank's
share of the KV heads and cuts its slice of the bundle by itself. Checks, printed by rank 0 and all required for exit
status 0:
- greedy `generate()` tokens with the TP model equal those of the same model on one device (each rank runs the
  one-device model too, on its own device), for Hadamard rotations and for `--bundle` when given; static caches, so on
  CUDA both runs are compiled by generate() itself;
- each rank's cache holds 1/N of the one-device cache's KV bytes and its share of the heads.
With `--speed-context C`: the context written through the caches' own write path (random states, as
`bench_e2e.py` does), then `generate()` decodes `--speed-tokens` tokens, compiled; ms per token from the streamer's
timestamps, for TP 1 (rank 0 alone, the other ranks waiting) and TP N, in one run. `--hold-context C` fills every
rank's cache to C tokens and decodes there (an out-of-memory is reported, not raised); `--largest` (CUDA) predicts the
largest context from the ranks' free memory and a small cache's bytes per token, then holds it, backing off 10% on
out-of-memory. NCCL multicast stays off
(keep the workplace's NVLS variables, e.g. NCCL_NVLS_ENABLE=0, set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e as be  # noqa: E402

import oscar_hf  # noqa: E402
from oscar_hf import OscarQuantizedCache, cache_keyword  # noqa: E402
from oscar_hf.layer import OscarQuantizedLayer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", help="model folder (e.g. .assets/oscar-ref-code-qwen3)")
    p.add_argument("--random-8b-layers", type=int, default=None,
                   help="instead of a model: a random Qwen3-8B-shaped model with this many layers (written by rank 0)")
    p.add_argument("--random-tiny", action="store_true", help="instead of a model: a tiny random model (CPU dry run)")
    p.add_argument("--bundle", default=None, help="a rotation bundle folder to check besides Hadamard rotations")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--no-check", action="store_true", help="skip the token checks (speed only)")
    p.add_argument("--speed-context", type=int, default=0, help="context for the decode timing (0: none)")
    p.add_argument("--speed-tokens", type=int, default=32)
    p.add_argument("--hold-context", type=int, default=0,
                   help="fill every rank's cache to this many tokens and decode at that context (0: no)")
    p.add_argument("--largest", action="store_true",
                   help="CUDA: the largest context the ranks' free memory holds (predicted from a small cache's "
                        "bytes per token, 64K steps, backing off 10%% on out-of-memory), filled and decoded")
    p.add_argument("--reserve-gib", type=float, default=6.0,
                   help="with --largest: memory left free per rank for activations, graphs and the allocator")
    p.add_argument("--json", default=None, help="rank 0 writes the results here")
    args = p.parse_args(argv)
    if sum(x is not None and x is not False for x in (args.model, args.random_8b_layers, args.random_tiny)) != 1:
        p.error("give a model folder, --random-8b-layers or --random-tiny (one of them)")
    for name in ("prompt_tokens", "new_tokens", "speed_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.speed_context < 0 or args.hold_context < 0 or (
            args.random_8b_layers is not None and args.random_8b_layers < 1):
        p.error("--speed-context and --hold-context must be >= 0 and --random-8b-layers >= 1")
    if args.largest and not torch.cuda.is_available():
        p.error("--largest reads the GPUs' free memory: it needs CUDA (use --hold-context for a dry run)")
    if args.model and not (Path(args.model) / "config.json").is_file():
        p.error(f"{args.model} is not a model folder (no config.json)")
    return args


def setup() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        raise SystemExit("Run under torchrun: torchrun --nproc-per-node N benchmarks/multi_gpu_tp.py ...")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():  # transformers' tensor parallelism reuses it
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def model_folder(args, rank: int, dtype) -> str:
    """The model to load: the folder given, or a random model rank 0 writes to a shared temporary folder."""
    if args.model:
        return args.model
    folder = Path(tempfile.gettempdir()) / f"oscar-tp-random-{'tiny' if args.random_tiny else args.random_8b_layers}"
    if rank == 0 and not (folder / "config.json").exists():
        config = be.make_config(args.random_tiny, 2 if args.random_tiny else args.random_8b_layers)
        be.build_model(config, "cpu", dtype).save_pretrained(folder)
    return str(folder)


def load(folder: str, dtype, *, tp: bool, device: torch.device):
    kw = dict(tp_plan="auto") if tp else dict(device_map={"": device})
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=oscar_hf.OSCAR_ATTENTION,
                                                **kw).eval()


def make_cache(model, bundle: str | None, max_cache_len: int) -> OscarQuantizedCache:
    if bundle:
        return OscarQuantizedCache.from_pretrained(bundle, config=model.config, max_cache_len=max_cache_len)
    return OscarQuantizedCache(model.config, method="hadamard", max_cache_len=max_cache_len)


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, new: int, bundle: str | None):
    cache = make_cache(model, bundle, prompt.shape[1] + new + 64)
    ids = prompt.to(model.device)
    out = model.generate(ids, **{cache_keyword(model): cache}, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    return out[:, prompt.shape[1]:].cpu(), cache


@torch.no_grad()
def decode_ms(model, context: int, new: int, dtype, tp_size: int) -> dict:
    """Fill a static cache with `context` random positions through its write path (the rank's share of the KV heads,
    as its attention hands them over), then time generate()."""
    cache = make_cache(model, None, context + new + 64)
    kv_heads = model.config.num_key_value_heads // tp_size
    for s in range(0, context, 8192):
        shape = (1, kv_heads, min(8192, context - s), model.config.head_dim)
        for idx in range(len(cache.layers)):
            k = torch.randn(shape, device=model.device, dtype=dtype).mul_(be.KV_SCALE)
            cache.update(k, torch.randn_like(k).mul_(be.KV_SCALE), idx)
    ids = torch.randint(0, model.config.vocab_size, (1, context + 1), device=model.device)
    clock = be.StepClock()
    t0 = time.perf_counter()
    model.generate(ids, **{cache_keyword(model): cache}, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                   streamer=clock, attention_mask=torch.ones_like(ids), pad_token_id=0)
    return dict(**clock.timings(warmup=3), total_s=time.perf_counter() - t0,
                kv_allocated_gib=cache.allocated_bytes() / 2**30, kv_heads=kv_heads)


def hold(model, context: int, new: int, dtype, tp_size: int) -> dict:
    """`decode_ms` at `context` with the peak memory; running out of memory on any rank is a result, agreed by all."""
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(model.device)
    try:
        row = dict(context=context, fits=True, **decode_ms(model, context, new, dtype, tp_size))
    except torch.cuda.OutOfMemoryError:
        row = dict(context=context, fits=False)
    if cuda:
        row["peak_gib"] = torch.cuda.max_memory_allocated(model.device) / 2**30
        torch.cuda.empty_cache()
    fits = torch.tensor([int(row["fits"])], device=model.device)
    dist.all_reduce(fits, op=dist.ReduceOp.MIN)
    row["all_ranks_fit"] = bool(fits.item())
    return row


def bytes_per_token(model, probe_tokens: int = 65536) -> float:
    """KV bytes a rank's static cache allocates per token of max_cache_len (the 2-bit body dominates; the exact
    windows are a fixed few MiB), from a cache of `probe_tokens` that saw one token per layer."""
    cache = make_cache(model, None, probe_tokens)
    heads = model.config.num_key_value_heads // dist.get_world_size()
    shape = (1, heads, 1, model.config.head_dim)
    for idx in range(len(cache.layers)):
        k = torch.zeros(shape, device=model.device, dtype=model.dtype)
        cache.update(k, k.clone(), idx)
    per_token = cache.allocated_bytes() / probe_tokens
    del cache
    torch.cuda.empty_cache()
    return per_token


def largest(model, new: int, dtype, tp_size: int, reserve_gib: float, tries: int = 3) -> dict:
    """The largest context, in 64K steps, that every rank fills and decodes; what was tried, in order."""
    step = 65536
    free = torch.tensor([torch.cuda.mem_get_info(model.device)[0]], device=model.device, dtype=torch.float64)
    dist.all_reduce(free, op=dist.ReduceOp.MIN)
    per_token = bytes_per_token(model)
    context = int((free.item() - reserve_gib * 2**30) / per_token) // step * step
    tried = []
    for _ in range(tries):
        if context < step:
            break
        row = hold(model, context, new, dtype, tp_size)
        tried.append({k: row.get(k) for k in ("context", "fits", "all_ranks_fit", "ms", "peak_gib")})
        if row["all_ranks_fit"]:
            return dict(row, predicted_from_free_gib=free.item() / 2**30, bytes_per_token=per_token, tried=tried)
        context = int(context * 0.9) // step * step
    return dict(context=None, fits=False, predicted_from_free_gib=free.item() / 2**30, bytes_per_token=per_token,
                tried=tried)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = setup()
    dtype = getattr(torch, args.dtype)
    folder = model_folder(args, rank, dtype)
    dist.barrier()  # (a random model is written by rank 0)
    tp_model = load(folder, dtype, tp=True, device=device)
    rows, ok, result = [], True, dict(world_size=world, model=folder, dtype=args.dtype,
                                      device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                      torch=torch.__version__, transformers=__import__("transformers").__version__)

    def check(name, passed, detail):
        nonlocal ok
        ok &= bool(passed)
        rows.append((name, "ok" if passed else "FAIL", detail))

    if not args.no_check:
        single = load(folder, dtype, tp=False, device=device)
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, single.config.vocab_size, (1, args.prompt_tokens), generator=gen)
        for name, bundle in (("hadamard", None), ("bundle", args.bundle)):
            if name == "bundle" and not bundle:
                continue
            ref, ref_cache = greedy(single, prompt, args.new_tokens, bundle)
            got, cache = greedy(tp_model, prompt, args.new_tokens, bundle)
            same = (ref == got).float().mean().item()
            layer = next(x for x in cache.layers if isinstance(x, OscarQuantizedLayer))
            check(f"greedy tokens TP {world} == one device ({name})", same == 1.0,
                  f"{same:.1%} of {ref.numel()} equal; rank {rank} holds {layer.num_heads} of "
                  f"{ref_cache.quantized_layers()[0].num_heads} KV heads; body {layer.body_len} tokens 2-bit")
            share = cache.allocated_bytes() / ref_cache.allocated_bytes()
            check(f"KV bytes per rank = 1/{world} ({name})", abs(share - 1 / world) < 1e-9,
                  f"{cache.allocated_bytes() / 2**20:.2f} MiB of {ref_cache.allocated_bytes() / 2**20:.2f} MiB")
        del single
    if args.speed_context:
        if rank == 0:
            single = load(folder, dtype, tp=False, device=device)
            result["tp1"] = decode_ms(single, args.speed_context, args.speed_tokens, dtype, 1)
            del single
            if device.type == "cuda":
                torch.cuda.empty_cache()
        dist.barrier()
        result[f"tp{world}"] = decode_ms(tp_model, args.speed_context, args.speed_tokens, dtype, world)
    if args.hold_context:
        result["hold"] = hold(tp_model, args.hold_context, args.speed_tokens, dtype, world)
    if args.largest:
        result["largest"] = largest(tp_model, args.speed_tokens, dtype, world, args.reserve_gib)
    gathered = [None] * world
    dist.all_gather_object(gathered, dict(rows=rows, ok=ok, result=result))
    if rank == 0:
        all_ok = all(g["ok"] for g in gathered)
        print(f"\n{result['device']} x {world}; torch {result['torch']}; transformers {result['transformers']}; "
              f"model {folder}; dtype {args.dtype}")
        print("\n| rank | check | result | detail |\n|---|---|---|---|")
        for r, g in enumerate(gathered):
            for name, res, detail in g["rows"]:
                print(f"| {r} | {name} | {res} | {detail} |")
        if args.speed_context:
            print(f"\ngenerate() at {args.speed_context} tokens, batch 1, ms per token (median gap)")
            print("| setting | ms/token | KV GiB allocated per rank | first gaps s |\n|---|---|---|---|")
            for key in ("tp1", f"tp{world}"):
                m = gathered[0]["result"].get(key)
                if m:
                    print(f"| {key.upper()} | {m['ms']:.2f} | {m['kv_allocated_gib']:.2f} | {m['first_gaps_s']} |")
        for key in ("hold", "largest"):
            m = gathered[0]["result"].get(key)
            if m:
                ms = f"{m['ms']:.2f} ms/token" if m.get("ms") else "-"
                print(f"\n{key}: context {m.get('context')} tokens per sequence, TP {world}: "
                      f"{'held by every rank' if m.get('all_ranks_fit') else 'did not fit'}; {ms}; "
                      f"peak {m.get('peak_gib') or 0:.1f} GiB on rank 0"
                      + (f"; tried {m['tried']}" if m.get("tried") else ""))
        if args.json:
            Path(args.json).write_text(json.dumps(dict(ranks=gathered, args=vars(args)), indent=1, default=str))
        print("\nall checks passed" if all_ok else "\nSOME CHECKS FAILED")
        ok = all_ok
    flag = torch.tensor([int(ok)])
    dist.broadcast(flag, 0)
    dist.destroy_process_group()
    return 0 if flag.item() else 1


if __name__ == "__main__":
    sys.exit(main())
