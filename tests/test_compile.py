"""Compiled decoding without a GPU: a static `OscarQuantizedCache` (`max_cache_len`) must compile its decode step once
(no recompilation as segments fill and tokens are demoted) and give exactly the tokens of the same cache run eagerly,
through `torch.compile` directly and through `generate()`'s own compilation (`compile_config`)."""

import logging

import pytest
import torch
from conftest import tiny_model
from torch._dynamo.backends.registry import lookup_backend, register_backend
from torch._dynamo.testing import CompileCounter
from transformers import CompileConfig
from transformers.generation.streamers import BaseStreamer

from oscar_hf import OscarQuantizedCache, cache_keyword

WINDOWS = dict(method="hadamard", sink_tokens=4, recent_tokens=8, demote_block=4)


def static_cache(model, max_cache_len=96, **kw):
    return OscarQuantizedCache(model.config, **{**WINDOWS, **kw}, max_cache_len=max_cache_len)


def decode(model, cache, prompt, steps, step):
    """Prefill eagerly, then `steps` greedy steps through `step(ids, positions, cache)`."""
    out = model(input_ids=prompt, **{cache_keyword(model): cache})
    token = out.logits[:, -1:].argmax(-1)
    tokens = [token]
    for t in range(steps):
        positions = torch.full_like(token, prompt.shape[1] + t)
        token = step(token, positions, cache)[:, -1:].argmax(-1)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@torch.no_grad()
def test_decode_step_compiles_once_across_demotions_and_equals_eager(family):
    torch._dynamo.reset()
    model = tiny_model(family)
    prompt = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))

    def step(ids, positions, cache):
        return model(input_ids=ids, position_ids=positions, **{cache_keyword(model): cache}).logits

    eager_cache, compiled_cache = static_cache(model), static_cache(model)
    expected = decode(model, eager_cache, prompt, 24, step)
    counter = CompileCounter()
    got = decode(model, compiled_cache, prompt, 24, torch.compile(step, backend=counter, fullgraph=True))
    assert torch.equal(got, expected)
    assert counter.frame_count == 1
    layer = compiled_cache.layers[0]
    # 24 steps of one token past a 20-token prompt: a demotion every 4 steps, the first ones after the prompt's.
    assert layer.body_len - 4 * ((20 - 4 - 8) // 4) >= 3 * 4
    assert layer.lengths.tolist()[:3] == eager_cache.layers[0].lengths.tolist()[:3]


@torch.no_grad()
def test_a_step_whose_keywords_differ_from_the_prefill_compiles_once():
    """The attention checks' cached verdict must not be guarded on: a compiled step passing a keyword the eager prefill
    did not (here `cache_position`) compiled twice while the trace rewrote the verdict it was guarded on."""
    torch._dynamo.reset()
    model = tiny_model("qwen3")
    cache = static_cache(model)
    prompt = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    model(input_ids=prompt, **{cache_keyword(model): cache})
    counter = CompileCounter()

    def step(ids, positions):
        return model(input_ids=ids, position_ids=positions, cache_position=positions[0],
                     **{cache_keyword(model): cache}).logits

    step = torch.compile(step, backend=counter, fullgraph=True)
    token = torch.full((1, 1), int(prompt[0, -1]))  # (a fresh tensor: a slice would keep the prompt's strides)
    for t in range(6):
        token = step(token, torch.full_like(token, 20 + t))[:, -1:].argmax(-1)
    assert counter.frame_count == 1


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.chunks.append(None)


class Counter:
    """Graphs compiled through the `"oscar_test_counting"` backend (`aot_eager` behind a count). generate() deep-copies
    its compile config, so the backend is passed by name and counts here."""

    frame_count = 0


@register_backend(name="oscar_test_counting")
def _counting_backend(gm, example_inputs):
    Counter.frame_count += 1
    return lookup_backend("aot_eager")(gm, example_inputs)


def compile_config(counter=None):
    """A compile config that compiles on the CPU too (`_compile_all_devices`, a class attribute in transformers)."""
    config = CompileConfig(backend="oscar_test_counting", mode=None, fullgraph=True)
    config._compile_all_devices = True
    return config


def new_counter():
    Counter.frame_count = 0
    return Counter


def generate_both(model, ids, caplog, **kwargs):
    """generate() eagerly and with a compile_config, each on a fresh static cache: (eager, compiled, counter)."""
    eager = model.generate(ids, past_key_values=static_cache(model), disable_compile=True, **kwargs)
    counter = new_counter()
    torch._dynamo.reset()
    if hasattr(model, "_compiled_call"):
        del model._compiled_call
    with caplog.at_level(logging.WARNING):
        compiled = model.generate(ids, past_key_values=static_cache(model), compile_config=compile_config(counter),
                                  **kwargs)
    assert "unable to meet the criteria" not in caplog.text
    return eager, compiled, counter


GREEDY = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False)


@torch.no_grad()
def test_generate_with_compile_config_takes_the_compiled_path_and_equals_eager(caplog):
    model = tiny_model("qwen3")
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    eager, compiled, counter = generate_both(model, ids, caplog, **GREEDY)
    assert counter.frame_count == 1  # compiled, and not again across the 7 demotions of the 30 steps
    assert torch.equal(compiled, eager)


@torch.no_grad()
def test_generate_compiled_sampling_streamer_eos_and_padding_equal_eager(caplog):
    model = tiny_model("qwen3")
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128, (1, 24), generator=gen)

    # Sampling with a fixed seed, tokens streamed.
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        streamer = Collect()
        runs.append((streamer, dict(max_new_tokens=20, do_sample=True, top_k=20, streamer=streamer)))
    torch.manual_seed(7)
    eager = model.generate(ids, past_key_values=static_cache(model), disable_compile=True, **runs[0][1])
    counter = new_counter()
    torch._dynamo.reset()
    torch.manual_seed(7)
    compiled = model.generate(ids, past_key_values=static_cache(model), compile_config=compile_config(counter),
                              **runs[1][1])
    assert counter.frame_count == 1 and torch.equal(compiled, eager)
    streamed = [torch.cat([c.reshape(1, -1) for c in s.chunks[:-1]], dim=1) for s, _ in runs]
    assert torch.equal(streamed[0], streamed[1]) and torch.equal(streamed[1], compiled)

    # EOS: the 12th greedy token ends generation, eagerly and compiled alike.
    greedy = model.generate(ids, past_key_values=static_cache(model), disable_compile=True, max_new_tokens=20,
                            do_sample=False)
    eos = int(greedy[0, ids.shape[1] + 11])
    first = int((greedy[0, ids.shape[1]:] == eos).nonzero()[0])
    eager, compiled, _ = generate_both(model, ids, caplog, max_new_tokens=20, do_sample=False, eos_token_id=eos)
    assert torch.equal(compiled, eager) and compiled.shape[1] == ids.shape[1] + first + 1

    # A left-padded batch: the static mask (max_cache_len columns) reaches the kernel's mask path.
    prompts = [torch.randint(3, 128, (n,), generator=gen) for n in (24, 15, 7)]
    padded = torch.zeros(3, 24, dtype=torch.long)
    mask = torch.zeros(3, 24, dtype=torch.long)
    for row, p in enumerate(prompts):
        padded[row, 24 - len(p):], mask[row, 24 - len(p):] = p, 1
    eager, compiled, counter = generate_both(model, padded, caplog, attention_mask=mask, pad_token_id=0, **GREEDY)
    assert torch.equal(compiled, eager)
    assert counter.frame_count == 1


@torch.no_grad()
def test_static_cache_equals_dynamic_cache_eagerly():
    """The op path (static) and the host path (dynamic) are one algorithm: same tokens."""
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(3))
    dynamic = OscarQuantizedCache(model.config, **WINDOWS)
    static = static_cache(model)
    a = model.generate(ids, past_key_values=dynamic, **GREEDY)
    b = model.generate(ids, past_key_values=static, **GREEDY)
    assert torch.equal(a, b)
    assert dynamic.layers[0].lengths.tolist() == static.layers[0].lengths.tolist()[:4]
    assert not dynamic.is_compileable and static.is_compileable


@torch.no_grad()
def test_static_cache_reset_keeps_addresses_and_early_initialization():
    model = tiny_model("qwen3")
    cache = static_cache(model, max_cache_len=80)
    cache.early_initialization(2, 2, 32, torch.float32, torch.device("cpu"))
    layer = cache.layers[0]
    pointers = [t.data_ptr() for t in layer.segment_tensors()] + [layer.lengths.data_ptr()]
    ids = torch.randint(3, 128, (2, 30))
    first = model.generate(ids, past_key_values=cache, **GREEDY)
    assert layer.body_len > 0
    cache.reset()
    assert not layer.lengths.any() and cache.get_seq_length() == 0
    assert [t.data_ptr() for t in layer.segment_tensors()] + [layer.lengths.data_ptr()] == pointers
    assert torch.equal(model.generate(ids, past_key_values=cache, **GREEDY), first)
    assert layer.get_mask_sizes(1) == (80, 0)


def test_compileable_only_when_static_with_the_oscar_attention():
    model = tiny_model("qwen3")
    assert static_cache(model).is_compileable
    assert not OscarQuantizedCache(model.config, **WINDOWS).is_compileable
    assert not static_cache(model, check_finite=True).is_compileable
    sdpa = tiny_model("qwen3", attn_implementation="sdpa")
    assert not static_cache(sdpa).is_compileable
    gemma = tiny_model("gemma2")  # sliding-window layers grow: eager
    assert not OscarQuantizedCache(gemma.config, **WINDOWS, max_cache_len=64).is_compileable


@pytest.mark.parametrize("max_cache_len", [None, 160])
def test_generate_prefill_chunk_size_feeds_the_prompt_through_the_cache(max_cache_len):
    """`generate(prefill_chunk_size=...)` (transformers' chunked prefill): later chunks attend over the 2-bit history,
    as a manual chunk-by-chunk forward does (long chunks take the host-driven path of a static layer too)."""
    model = tiny_model("qwen3")
    ids = torch.randint(3, model.config.vocab_size, (1, 100))
    kw = dict(method="hadamard", sink_tokens=8, recent_tokens=16, demote_block=4, max_cache_len=max_cache_len)
    cache = OscarQuantizedCache(model.config, **kw)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=1, do_sample=False, eos_token_id=None,
                         pad_token_id=0, prefill_chunk_size=32, disable_compile=True)
    manual = OscarQuantizedCache(model.config, **kw)
    with torch.no_grad():
        for start in range(0, 100, 32):
            logits = model(ids[:, start : start + 32], **{cache_keyword(model): manual}).logits[0, -1]
    assert out[0, 100].item() == logits.argmax().item()
    assert manual.layers[0].body_len > 0  # the prompt's middle was quantized before the last chunks attended to it
    one_shot = OscarQuantizedCache(model.config, **kw)
    with torch.no_grad():
        exact_logits = model(ids, **{cache_keyword(model): one_shot}).logits[0, -1]
    assert not torch.allclose(logits, exact_logits)  # chunks read the quantized history, not the exact prompt


@torch.no_grad()
def test_a_full_static_cache_raises_instead_of_overwriting():
    model = tiny_model("qwen3")
    cache = static_cache(model, max_cache_len=32)
    ids = torch.randint(3, 128, (1, 20))
    with pytest.raises(ValueError, match="max_cache_len"):
        model.generate(ids, past_key_values=cache, max_new_tokens=40, min_new_tokens=40, do_sample=False,
                       disable_compile=True)


# ---------------------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton paths of the ops)")


@register_backend(name="oscar_test_cudagraphs")
def _counting_cudagraphs(gm, example_inputs):
    Counter.frame_count += 1
    return lookup_backend("cudagraphs")(gm, example_inputs)


def cuda_model(family="qwen3"):
    # head_dim 64: the smallest the Triton decode kernel takes; bf16 as the kernels require.
    return tiny_model(family, head_dim=64).to("cuda", torch.bfloat16)


@cuda
@torch.no_grad()
def test_cuda_graph_replay_of_the_ops_equals_eager_generate():
    """The ops captured in CUDA graphs (dynamo + AOT autograd, no inductor: the model's own ops compute as eagerly) and
    replayed across demotions give exactly the eager tokens, greedy and with a left-padded batch."""
    model = cuda_model()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (3, 40), generator=gen).cuda()
    mask = torch.ones_like(ids)
    mask[1, :9], mask[2, :23] = 0, 0
    for kwargs in (dict(), dict(attention_mask=mask, pad_token_id=0)):
        eager = model.generate(ids, past_key_values=static_cache(model, 160), disable_compile=True, **GREEDY, **kwargs)
        counter = new_counter()
        torch._dynamo.reset()
        config = CompileConfig(backend="oscar_test_cudagraphs", mode=None, fullgraph=True)
        compiled = model.generate(ids, past_key_values=static_cache(model, 160), compile_config=config, **GREEDY,
                                  **kwargs)
        assert counter.frame_count == 1
        assert torch.equal(compiled, eager)


@cuda
@torch.no_grad()
def test_cuda_generate_compiles_by_default_once_across_demotions():
    """generate()'s own compilation (inductor, mode="reduce-overhead") of a static cache: one graph for all steps.
    Inductor recomputes the model's own ops (norms, MLP) with fused kernels, so tokens may drift from eager ones on
    near-ties; most must agree."""
    model = cuda_model()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(6)).cuda()
    eager = model.generate(ids, past_key_values=static_cache(model, 160), disable_compile=True, **GREEDY)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cache = static_cache(model, 160)
    assert cache.is_compileable
    compiled = model.generate(ids, past_key_values=cache, **GREEDY)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert cache.layers[0].body_len > 16
    assert (compiled == eager).float().mean() > 0.9


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
@torch.no_grad()
def test_the_attention_function_writes_the_step_as_update_would(family, monkeypatch):
    """With the "oscar" attention function the cache leaves a static layer's step to it
    (`oscar_hf::append_decode_attention`, which on CUDA also rotates the query in the window write). Written there or
    in `update()`, the tokens and every layer's stored state are the same, across demotions; Gemma 2's soft-capped
    scores take the reference path, which writes the step first."""
    from oscar_hf import cache as cache_module
    from oscar_hf import ops

    model = tiny_model(family)
    ids = torch.randint(3, 128, (2, 22), generator=torch.Generator().manual_seed(2))
    fused_calls = []
    real = ops._append_decode_attention_impl
    monkeypatch.setattr(ops, "_append_decode_attention_impl", lambda *a: fused_calls.append(1) or real(*a))
    runs = []
    for deferred in (True, False):
        monkeypatch.setattr(cache_module, "DEFER_WINDOW_WRITE", deferred)
        cache = static_cache(model)
        tokens = model.generate(ids, past_key_values=cache, disable_compile=True, **GREEDY)
        runs.append((tokens, cache))
        if deferred:
            assert bool(fused_calls) == (family != "gemma2")
            fused_calls.clear()
    assert not fused_calls
    (tokens_a, cache_a), (tokens_b, cache_b) = runs
    assert torch.equal(tokens_a, tokens_b)
    for a, b in zip(cache_a.quantized_layers(), cache_b.quantized_layers()):  # (Gemma 2's sliding layers are not)
        assert a.lengths.tolist() == b.lengths.tolist() and a.body_len > 0
        for x, y in zip(a.segment_tensors(), b.segment_tensors()):
            assert torch.equal(x, y)


@torch.no_grad()
def test_the_compiled_step_is_one_op_a_layer():
    """What generate() captures for a static cache under the "oscar" attention function: one
    `oscar_hf::append_decode_attention` a layer (on CUDA, four launches), and neither of the two ops it stands for."""
    torch._dynamo.reset()
    model = tiny_model("qwen3")
    cache = static_cache(model)
    prompt = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    model(input_ids=prompt, **{cache_keyword(model): cache})
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    step = torch.compile(lambda ids, positions: model(input_ids=ids, position_ids=positions,
                                                      **{cache_keyword(model): cache}).logits,
                         backend=recording_backend, fullgraph=True)
    step(torch.full((1, 1), 5), torch.full((1, 1), 20))
    ops_called = [t for t in targets if t.startswith("oscar_hf.")]
    assert ops_called == ["oscar_hf.append_decode_attention"] * model.config.num_hidden_layers
