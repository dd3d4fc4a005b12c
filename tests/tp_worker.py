"""One rank of the tensor-parallel check in tests/test_tensor_parallel.py, started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_worker.py MODEL BUNDLE WORK

Loads MODEL with transformers' `tp_plan="auto"` (gloo on the CPU), builds `OscarQuantizedCache.from_pretrained(BUNDLE,
config=model.config)` as on one process (no rank passed: the cache finds it), runs `WORK/ids.pt` through a prefill and
teacher-forced decode steps with a dynamic and a static cache, and writes what it saw to `WORK/rank<r>.pt`.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist

from oscar_hf import OscarQuantizedCache
from oscar_hf.layer import OscarQuantizedLayer

# Small windows, so that most of the sequence is quantized; the test's one-process reference uses the same.
WINDOWS = dict(sink_tokens=4, recent_tokens=8, demote_block=4)
PREFILL = 24


def step_logits(model, cache, ids, prefill):
    """Prefill `ids[:, :prefill]`, then feed the rest one token per forward; the logits of every forward."""
    out = [model(input_ids=ids[:, :prefill], past_key_values=cache).logits]
    for pos in range(prefill, ids.shape[1]):
        out.append(model(input_ids=ids[:, pos : pos + 1], past_key_values=cache).logits)
    return torch.cat(out, dim=1)


def main(model_dir: str, bundle_dir: str, work: str) -> None:
    from transformers import AutoModelForCausalLM

    warnings.simplefilter("ignore", FutureWarning)  # tp_plan= moves to distributed_config= in later releases
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, tp_plan="auto", dtype=torch.float32, attn_implementation="oscar"
    ).eval()
    ids = torch.load(f"{work}/ids.pt")
    result = {}
    with torch.no_grad():
        for name, extra in (("dynamic", {}), ("static", {"max_cache_len": ids.shape[1]})):
            cache = OscarQuantizedCache.from_pretrained(bundle_dir, config=model.config, **WINDOWS, **extra)
            result[f"{name}_logits"] = step_logits(model, cache, ids, PREFILL)
            layer = cache.layers[0]
            assert isinstance(layer, OscarQuantizedLayer)
            result[f"{name}_shard"] = (cache.tp_rank, cache.tp_size, cache.rotations.num_kv_heads, layer.num_heads)
            result[f"{name}_body_len"] = layer.body_len
            result[f"{name}_k_rotations"] = cache.rotations.k_rotations
    torch.save(result, f"{work}/rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
