"""Tensor parallelism: a rank's shard of a bundle holds exactly its KV heads, a cache fed a rank's heads stores and
returns what the whole cache does for them, and under transformers' `tp_plan="auto"` (torchrun, gloo, CPU) every rank's
logits equal the one-process logits. Errors name the heads and the way out."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_config, tiny_model
from transformers import DynamicCache

from oscar_hf import OscarQuantizedCache, OscarRotations
from oscar_hf.quantization import error_feedback_factor
from oscar_hf.rotations import PER_HEAD_TENSORS
from oscar_hf.rotationzoo import export_rotationzoo

LAYERS, HEADS, QUERY_HEADS, D = 2, 4, 8, 32
SHARED = ("k_rotations", "v_rotations", "k_eigenvalues", "v_eigenvalues")  # one entry per layer in the mixed bundle


def per_head_bundle(shared_rotations: bool = False, seed: int = 0) -> OscarRotations:
    """A valid bundle carrying every per-head tensor (random rotations and metrics). With `shared_rotations` the
    rotations and eigenvalues are one per layer while the feedback, key means and tilt stay per head."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if shared_rotations else HEADS

    def orthogonal():
        return torch.linalg.qr(torch.randn(LAYERS, groups, D, D, generator=g, dtype=torch.float64))[0].float()

    def factor():
        a = torch.randn(LAYERS, HEADS, D, D, generator=g, dtype=torch.float64)
        return error_feedback_factor(a @ a.transpose(-1, -2) / D)

    tilt = 0.02 * torch.randn(LAYERS, HEADS, QUERY_HEADS // HEADS, D, D, generator=g)
    return OscarRotations(
        "oscar", LAYERS, HEADS, D, torch.linspace(0.9, 0.98, LAYERS), torch.full((LAYERS,), 0.92),
        orthogonal(), orthogonal(), torch.rand(LAYERS, groups, D, generator=g),
        torch.rand(LAYERS, groups, D, generator=g),
        metadata={"model_id": "tiny-qwen3"}, k_feedback=factor(), v_feedback=factor(),
        k_means=torch.randn(LAYERS, HEADS, D, generator=g),
        k_tilt_means=torch.randn(LAYERS, HEADS, QUERY_HEADS // HEADS, D, generator=g),
        k_tilt_maps=tilt + tilt.transpose(-1, -2),
    )


def tp_config():
    return tiny_config("qwen3", num_attention_heads=QUERY_HEADS, num_key_value_heads=HEADS, head_dim=D, layers=LAYERS)


# --- OscarRotations.tensor_parallel_shard ---------------------------------------------------------------------------


def test_every_tensor_field_but_the_clip_ratios_is_sharded_by_head():
    """A tensor field added to OscarRotations must be listed as per-head (or be per layer, as the clip ratios)."""
    fields = {f.name for f in dataclasses.fields(OscarRotations) if "Tensor" in str(f.type)}
    assert fields - set(PER_HEAD_TENSORS) == {"k_clip_ratios", "v_clip_ratios"}


@pytest.mark.parametrize("shared_rotations", [False, True])
@pytest.mark.parametrize("size", [2, 4])
def test_shards_concatenate_to_the_whole_bundle(size, shared_rotations):
    whole = per_head_bundle(shared_rotations)
    shards = [whole.tensor_parallel_shard(rank, size) for rank in range(size)]
    for rank, shard in enumerate(shards):
        assert shard.num_kv_heads == HEADS // size and (shard.num_layers, shard.head_dim) == (LAYERS, D)
        assert shard.tensor_parallel == {"rank": rank, "size": size, "num_kv_heads": HEADS}
        assert shard.metadata["model_id"] == "tiny-qwen3" and whole.tensor_parallel is None
        assert torch.equal(shard.k_clip_ratios, whole.k_clip_ratios)
        assert torch.equal(shard.v_clip_ratios, whole.v_clip_ratios)
    for name in PER_HEAD_TENSORS:
        original = getattr(whole, name)
        if shared_rotations and name in SHARED:
            assert all(torch.equal(getattr(s, name), original) for s in shards), name
        else:
            assert torch.equal(torch.cat([getattr(s, name) for s in shards], dim=1), original), name
    # one rank's heads, read the way the cache reads a layer
    assert torch.equal(shards[1].layer_key_tilt(1).maps, whole.k_tilt_maps[1, HEADS // size : 2 * HEADS // size])


def test_size_one_is_the_bundle_itself():
    whole = per_head_bundle()
    assert whole.tensor_parallel_shard(0, 1) is whole


@pytest.mark.parametrize(
    "rank, size, message",
    [
        (0, 3, r"Cannot split these rotations \(4 KV heads\) over 3 tensor-parallel ranks.*\[1, 2, 4\]"),
        (0, 8, r"\(4 KV heads\) over 8"),
        (2, 2, r"Rank 2 is outside a tensor-parallel group of 2 rank\(s\): ranks run from 0 to 1"),
        (-1, 2, r"Rank -1 is outside"),
        (0, 0, r"size must be at least 1, got 0"),
        (0, 2.0, r"size must be an integer, got 2\.0"),
        (True, 2, r"rank must be an integer, got True"),
    ],
)
def test_impossible_shards_are_refused_with_the_reason(rank, size, message):
    with pytest.raises(ValueError, match=message):
        per_head_bundle().tensor_parallel_shard(rank, size)


def test_a_shard_is_not_cut_again(tmp_path):
    shard = per_head_bundle().tensor_parallel_shard(1, 2)
    with pytest.raises(ValueError, match=r"from a shard .*rank 1 of 2, 2 of 4 KV heads.*whole bundle"):
        shard.tensor_parallel_shard(0, 2)


def test_a_shard_is_never_written(tmp_path):
    shard = per_head_bundle().tensor_parallel_shard(0, 2)
    with pytest.raises(ValueError, match=r"Cannot save the tensor-parallel shard of rank 0 of 2: it holds 2 of 4"):
        shard.save_pretrained(tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    with pytest.raises(ValueError, match=r"Cannot push the tensor-parallel shard"):
        shard.push_to_hub("org/never-created", endpoint="http://127.0.0.1:9")  # refused before any request
    with pytest.raises(ValueError, match=r"Cannot export the tensor-parallel shard"):
        export_rotationzoo(shard, tmp_path / "zoo")
    assert not (tmp_path / "zoo").exists()


def test_a_bundle_declaring_itself_a_shard_is_refused(tmp_path):
    import json

    per_head_bundle().save_pretrained(tmp_path)
    path = tmp_path / "oscar_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tensor_parallel": {"rank": 0, "size": 2}}))
    with pytest.raises(ValueError, match=r"oscar_config\.json declares `tensor_parallel`"):
        OscarRotations.from_pretrained(tmp_path)


# --- The cache of one rank, on one process ---------------------------------------------------------------------------


def feed(cache, keys, values, chunks=(13, 1, 1, 9, 1, 1, 1, 6, 1)):
    """Feed layer 0 the states in uneven chunks (a prefill, decode steps, a chunk); what each update returned."""
    returned, at = [], 0
    for n in chunks:
        returned.append(cache.update(keys[:, :, at : at + n], values[:, :, at : at + n], 0))
        at += n
    return returned


@pytest.mark.parametrize("max_cache_len", [None, 40])
@pytest.mark.parametrize("size", [2, 4])
@torch.no_grad()
def test_a_rank_cache_stores_and_returns_what_the_whole_cache_does_for_its_heads(size, max_cache_len):
    config = tp_config()
    config._attn_implementation = "sdpa"  # update() returns the dequantized, un-rotated history
    bundle = per_head_bundle()
    torch.manual_seed(0)
    keys, values = 3 * torch.randn(2, HEADS, 34, D), torch.randn(2, HEADS, 34, D)
    windows = dict(sink_tokens=4, recent_tokens=8, demote_block=4, max_cache_len=max_cache_len)
    whole = OscarQuantizedCache(config, rotations=bundle, **windows)
    expected = feed(whole, keys, values)
    assert whole.layers[0].body_len > 0 and (whole.tp_rank, whole.tp_size) == (0, 1)
    local = HEADS // size
    for rank in range(size):
        heads = slice(rank * local, (rank + 1) * local)
        cache = OscarQuantizedCache(config, rotations=bundle, tp_rank=rank, tp_size=size, **windows)
        got = feed(cache, keys[:, heads], values[:, heads])
        for (k, v), (k_all, v_all) in zip(got, expected):
            torch.testing.assert_close(k, k_all[:, heads], rtol=0, atol=1e-6)
            torch.testing.assert_close(v, v_all[:, heads], rtol=0, atol=1e-6)
        ours, theirs = cache.layers[0], whole.layers[0]
        assert ours.body_len == theirs.body_len
        assert torch.equal(ours.body_key_codes[:, :, : ours.body_len], theirs.body_key_codes[:, heads, : ours.body_len])
        assert torch.equal(ours.body_value_scale, theirs.body_value_scale[:, heads])
        assert cache.held_bytes() * size == whole.held_bytes()


def test_without_torch_distributed_local_heads_name_the_keywords_to_pass():
    cache = OscarQuantizedCache(tp_config(), rotations=per_head_bundle())
    states = torch.randn(1, HEADS // 2, 3, D)
    with pytest.raises(ValueError, match=r"Layer 0 received states with 2 KV heads, but .* has 4 and the bundle as "
                                         r"many.*torch.distributed.*not initialized.*`tp_rank=` and `tp_size=2`"):
        cache.update(states, states, 0)
    with pytest.raises(ValueError, match=r"`tp_size=2`"):
        cache.early_initialization(1, HEADS // 2, D, torch.float32, "cpu")


@pytest.mark.parametrize("heads, message", [(3, "3 cannot be a tensor-parallel share"),
                                            (8, "8 cannot be a tensor-parallel share")])
def test_heads_that_are_no_share_of_the_model_are_another_model(heads, message):
    cache = OscarQuantizedCache(tp_config(), rotations=per_head_bundle())
    states = torch.randn(1, heads, 3, D)
    with pytest.raises(ValueError, match=message + ".*another model"):
        cache.update(states, states, 0)


def test_states_that_do_not_fit_the_rank_given_are_refused():
    cache = OscarQuantizedCache(tp_config(), rotations=per_head_bundle(), tp_rank=1, tp_size=2)
    assert cache.rotations.num_kv_heads == 2 and cache.tp_rank == 1
    states = torch.randn(1, HEADS, 3, D)
    with pytest.raises(ValueError, match=r"received states with 4 KV heads, but this cache serves 2 KV heads \(tensor-"
                                         r"parallel rank 1 of 2: 2 of .*'s 4\): check `tp_rank` and `tp_size`"):
        cache.update(states, states, 0)
    cache.early_initialization(1, HEADS // 2, D, torch.float32, "cpu")  # the rank's heads are welcome
    assert cache.layers[0].is_initialized and cache.layers[0].num_heads == 2


def test_once_settled_on_the_whole_model_fewer_heads_are_refused():
    cache = OscarQuantizedCache(tp_config(), rotations=per_head_bundle())
    cache.update(torch.randn(1, HEADS, 3, D), torch.randn(1, HEADS, 3, D), 0)
    states = torch.randn(1, 2, 3, D)
    with pytest.raises(ValueError, match=r"Layer 1 received states with 2 KV heads, but this cache serves 4 KV heads "
                                         r"\(.*'s 4\): build one cache per model"):
        cache.update(states, states, 1)


def test_a_split_other_than_the_config_records_is_named():
    config = tp_config()
    config.distributed_config = {"tp_size": 4}
    cache = OscarQuantizedCache(config, rotations=per_head_bundle())
    states = torch.randn(1, 2, 3, D)
    with pytest.raises(ValueError, match=r"a split over 2 tensor-parallel ranks.*tp_size=4"):
        cache.update(states, states, 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp_rank=0), r"Pass `tp_rank` and `tp_size` together"),
    (dict(tp_size=2), r"Pass `tp_rank` and `tp_size` together"),
    (dict(tp_rank=0, tp_size=3), r"\(4 KV heads\) over 3 tensor-parallel ranks"),
    (dict(tp_rank=2, tp_size=2), r"Rank 2 is outside"),
])
def test_bad_tensor_parallel_keywords_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OscarQuantizedCache(tp_config(), rotations=per_head_bundle(), **kwargs)


def test_a_shard_passed_as_the_bundle_is_refused():
    shard = per_head_bundle().tensor_parallel_shard(0, 2)
    with pytest.raises(ValueError, match=r"`rotations` is the tensor-parallel shard of rank 0 of 2: pass the whole"):
        OscarQuantizedCache(tp_config(), rotations=shard)


# --- The real thing: torchrun, transformers' tp_plan="auto", gloo on the CPU ----------------------------------------


def step_logits(model, cache, ids, prefill):
    out = [model(input_ids=ids[:, :prefill], past_key_values=cache).logits]
    for pos in range(prefill, ids.shape[1]):
        out.append(model(input_ids=ids[:, pos : pos + 1], past_key_values=cache).logits)
    return torch.cat(out, dim=1)


@pytest.fixture(scope="module")
def tensor_parallel_run(tmp_path_factory):
    """Two torchrun ranks (gloo) run tests/tp_worker.py; returns the work folder and what each rank wrote."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    from tp_worker import PREFILL, WINDOWS

    work = tmp_path_factory.mktemp("tp")
    model = tiny_model("qwen3", num_attention_heads=QUERY_HEADS, num_key_value_heads=HEADS, head_dim=D, layers=LAYERS)
    model.save_pretrained(work / "model")
    per_head_bundle().save_pretrained(work / "bundle")
    ids = torch.randint(3, 128, (1, PREFILL + 12), generator=torch.Generator().manual_seed(0))
    torch.save(ids, work / "ids.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(REPO / "tests" / "tp_worker.py"), str(work / "model"), str(work / "bundle"), str(work)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = [torch.load(work / f"rank{r}.pt") for r in range(2)]
    return work, model, ids, ranks, PREFILL, WINDOWS


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@torch.no_grad()
def test_tp_plan_auto_ranks_give_the_one_process_logits(tensor_parallel_run, kind):
    work, model, ids, ranks, prefill, windows = tensor_parallel_run
    extra = {"max_cache_len": ids.shape[1]} if kind == "static" else {}
    cache = OscarQuantizedCache.from_pretrained(work / "bundle", config=model.config, **windows, **extra)
    expected = step_logits(model, cache, ids, prefill)
    exact = step_logits(model, DynamicCache(config=model.config), ids, prefill)
    assert cache.layers[0].body_len > 0
    whole = OscarRotations.from_pretrained(work / "bundle")
    for rank, seen in enumerate(ranks):
        # the cache found its rank and cut its shard by itself
        assert seen[f"{kind}_shard"] == (rank, 2, HEADS // 2, HEADS // 2)
        assert torch.equal(seen[f"{kind}_k_rotations"], whole.k_rotations[:, 2 * rank : 2 * rank + 2])
        assert seen[f"{kind}_body_len"] == cache.layers[0].body_len
        # the all-reduce sums in another order than one process: float32 rounding, far below the 2-bit error
        got = seen[f"{kind}_logits"]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        assert (expected - exact).abs().max() > 100 * (got - expected).abs().max()


def test_tensor_parallel_benchmark_dry_run(tmp_path):
    """benchmarks/multi_gpu_tp.py (issue 22's GPU script) on two gloo ranks: its checks pass with Hadamard rotations
    and a per-head bundle, each rank holds half the KV bytes, and the TP 1 / TP 2 timing and the held-context rows
    come out."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    model = tiny_model("qwen3", num_attention_heads=QUERY_HEADS, num_key_value_heads=HEADS, head_dim=D, layers=LAYERS)
    model.save_pretrained(tmp_path / "model")
    per_head_bundle().save_pretrained(tmp_path / "bundle")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(REPO / "benchmarks" / "multi_gpu_tp.py"), str(tmp_path / "model"), "--bundle", str(tmp_path / "bundle"),
         "--dtype", "float32", "--prompt-tokens", "400", "--new-tokens", "6", "--speed-context", "448",
         "--speed-tokens", "6", "--hold-context", "640", "--json", str(tmp_path / "tp.json")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "all checks passed" in done.stdout
    import json

    ranks = json.loads((tmp_path / "tp.json").read_text())["ranks"]
    names = [name for name, result, _ in ranks[1]["rows"] if result == "ok"]
    assert "greedy tokens TP 2 == one device (bundle)" in names and "KV bytes per rank = 1/2 (bundle)" in names
    timing = ranks[0]["result"]
    assert timing["tp1"]["ms"] > 0 and timing["tp2"]["ms"] > 0 and timing["tp2"]["kv_heads"] == HEADS // 2
    held = [r["result"]["hold"] for r in ranks]
    assert all(h["context"] == 640 and h["fits"] and h["all_ranks_fit"] and h["ms"] > 0 for h in held)
    assert "hold: context 640 tokens per sequence, TP 2: held by every rank" in done.stdout
