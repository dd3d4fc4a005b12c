"""Which KV heads a cache serves under tensor parallelism, and how it finds out.

Under transformers' tensor parallelism (`from_pretrained(..., tp_plan="auto")` under `torchrun`) `k_proj` and `v_proj`
are split by output columns: rank `r` of a group of `N` computes KV heads `[r * H / N, (r + 1) * H / N)` of the model's
`H`, and its attention hands the cache only those. The config keeps the whole model's head count, and transformers'
own caches size themselves from the states of their first update; `OscarQuantizedCache` learns of the split the same
way, when a quantized layer's first states carry `H / N` heads. `N` follows from the two counts. The rank is the
process's coordinate on the `tp` dimension of transformers' device mesh, its innermost one (`("pp", "dp_replicate",
"fsdp", "tp")` in transformers 5.25, a 1-D `tp` mesh in 5.17), so `torch.distributed.get_rank() % N`. A device mesh
laid out otherwise needs the rank passed explicitly (`tp_rank=mesh["tp"].get_local_rank()`).
"""

from __future__ import annotations


def configured_tp_size(config) -> int | None:
    """The tensor-parallel size transformers records on a distributed model's config (`config.distributed_config`,
    set by `from_pretrained(..., tp_plan=...)` or `distributed_config=`), or `None`."""
    distributed = getattr(config, "distributed_config", None)
    size = distributed.get("tp_size") if isinstance(distributed, dict) else getattr(distributed, "tp_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 1 else None


def rank_in_group(size: int) -> int | None:
    """This process's rank in its tensor-parallel group of `size` ranks, or `None` when torch.distributed is not
    initialized (see the module docstring for why `get_rank() % size`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world % size:
        raise ValueError(
            f"The states suggest a tensor-parallel group of {size} ranks, but torch.distributed runs {world} "
            f"processes, not a multiple of {size}. Pass `tp_rank=` and `tp_size=` to OscarQuantizedCache."
        )
    return dist.get_rank() % size


def _heads(n: int) -> str:
    return f"{n} KV head" + ("" if n == 1 else "s")


def infer_shard(layer_idx: int, heads: int, model_heads: int, tp_size_in_config: int | None,
                model_name: str) -> tuple[int, int]:
    """`(rank, size)` of the tensor-parallel shard whose states carry `heads` of the model's `model_heads` KV heads;
    a `ValueError` naming the problem and the way out when they are not such a shard or the rank cannot be known."""
    received = f"Layer {layer_idx} received states with {_heads(heads)}, but {model_name} has {model_heads}"
    if heads > model_heads or model_heads % heads:
        raise ValueError(
            f"{received}, of which {heads} cannot be a tensor-parallel share. The cache is being used with another "
            "model: build one from that model's config."
        )
    size = model_heads // heads
    if tp_size_in_config is not None and tp_size_in_config not in (1, size):
        raise ValueError(
            f"{received} (a split over {size} tensor-parallel ranks), while its config records tp_size="
            f"{tp_size_in_config} (config.distributed_config). If this split is intended, pass `tp_rank=` and "
            f"`tp_size={size}` to OscarQuantizedCache."
        )
    rank = rank_in_group(size)
    if rank is None:
        raise ValueError(
            f"{received} and the bundle as many. Under tensor parallelism (each of {size} ranks holding {heads}) the "
            "cache takes its rank from torch.distributed, which is not initialized here: pass `tp_rank=` and "
            f"`tp_size={size}` to OscarQuantizedCache (or OscarQuantizedCache.from_pretrained). Without tensor "
            "parallelism the cache is being used with another model: build one from that model's config."
        )
    return rank, size


def heads_mismatch(layer_idx: int, heads: int, local_heads: int, rank: int, size: int, model_heads: int,
                   model_name: str, explicit: bool) -> ValueError:
    """The error for states whose head count differs from the one a cache already serves."""
    serves = (
        f"tensor-parallel rank {rank} of {size}: {local_heads} of {model_name}'s {model_heads}"
        if size > 1 else f"{model_name}'s {model_heads}"
    )
    way_out = (
        f"check `tp_rank` and `tp_size` (given: {rank}, {size}) against the model's split"
        if explicit else "build one cache per model (and per rank) from that model's config"
    )
    return ValueError(
        f"Layer {layer_idx} received states with {_heads(heads)}, but this cache serves {_heads(local_heads)} "
        f"({serves}): {way_out}."
    )
