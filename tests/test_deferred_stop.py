"""generate() reads its stop decision one step late with an OSCAR cache on CUDA (`oscar_hf.deferred_stop`), so the
host queues the next step while the GPU runs this one. The deferral must change nothing the caller sees: the tokens,
what the streamer gets, and the cache generate() hands back (the extra step it decoded past an EOS is cropped away,
even where that step demoted a block). On the CPU the tests widen `deferred_stop.DEVICES` to run the same path
(with a stand-in for `torch.Event`, which the CPU lacks)."""

import pytest
import torch
from conftest import tiny_model
from test_crop import _assert_same as assert_same_layer
from transformers.generation.utils import DeferredStopCheck

from oscar_hf import OscarQuantizedCache, cache_keyword, deferred_stop
from oscar_hf.layer import OscarQuantizedLayer

WINDOWS = dict(method="hadamard", sink_tokens=4, recent_tokens=8, demote_block=4)


class HostEvent:
    """`torch.Event` for the CPU, which has none: its ops have all run by the time the host reads their results."""

    def __init__(self, device=None, blocking=False):
        pass

    def record(self):
        pass

    def synchronize(self):
        pass


class Tokens:
    """A streamer that keeps what it is handed."""

    def __init__(self):
        self.seen = []

    def put(self, value):
        self.seen.append(value.clone())

    def end(self):
        pass


def _generate(model, ids, eos: int, defer: bool, static: bool, crops=None, crops_layer=0, **kwargs):
    """Greedy generate() stopping at `eos`; with `crops`, layer `crops_layer`'s crops are logged as
    (n, body before, after)."""
    cache = OscarQuantizedCache(model.config, **WINDOWS, **({"max_cache_len": 96} if static else {}))
    cache.defer_stop_check = defer
    streamer = Tokens()
    with pytest.MonkeyPatch.context() as patch:
        if crops is not None:
            real = OscarQuantizedLayer.crop

            def spy(layer, n):
                before = layer.body_len if n else None
                real(layer, n)
                if layer.layer_idx == crops_layer:
                    crops.append((n, before, layer.body_len if n else None))

            patch.setattr(OscarQuantizedLayer, "crop", spy)
        out = model.generate(ids, **{cache_keyword(model): cache}, max_new_tokens=30, do_sample=False,
                             eos_token_id=eos, pad_token_id=0, streamer=streamer,
                             **(kwargs or {"disable_compile": True}))
    return out, streamer.seen, cache


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@torch.no_grad()
def test_deferred_stop_gives_the_tokens_streamer_and_cache_of_the_per_step_check(static, monkeypatch):
    """Stop at EOS at many points (every new token of a 30-token greedy run in turn): with the deferral, generate()
    decodes one step past the EOS and crops it; tokens, streamed tokens and every layer's storage equal the per-step
    check's, bit for bit, including stops whose extra step had demoted a block (the undo ring brings it back)."""
    monkeypatch.setattr(deferred_stop, "DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(torch, "Event", HostEvent)
    model = tiny_model("qwen3")
    ids = torch.randint(3, 128, (1, 21), generator=torch.Generator().manual_seed(0))
    reference, _, _ = _generate(model, ids, eos=model.config.vocab_size + 1, defer=False, static=static)
    new = reference[0, ids.shape[1]:].tolist()
    undone_demotions, deferred_runs = 0, 0
    for eos in dict.fromkeys(new[:-1]):  # each distinct token: generate() stops at its first occurrence
        crops = []
        got, got_streamed, got_cache = _generate(model, ids, eos, True, static, crops)
        want, want_streamed, want_cache = _generate(model, ids, eos, False, static)
        assert torch.equal(got, want)
        assert len(got_streamed) == len(want_streamed)
        assert all(torch.equal(a, b) for a, b in zip(got_streamed, want_streamed))
        for a, b in zip(got_cache.layers, want_cache.layers, strict=True):
            assert_same_layer(a, b)  # lengths and every held row, bit for bit
        assert any(n == 0 for n, _, _ in crops)  # the deferred check ran: it calls crop(0) every step
        undo = [(before, after) for n, before, after in crops if n == -1]
        assert len(undo) == 1  # stopped at an EOS before max_new_tokens: one step undone
        deferred_runs += 1
        undone_demotions += undo[0][1] < undo[0][0]
    assert deferred_runs >= 8
    assert undone_demotions >= 1  # the case the undo ring is for


@torch.no_grad()
def test_deferral_is_chosen_for_oscar_caches_on_the_listed_devices_only():
    """transformers' own rule stays for every other cache (MPS only); ours says yes on CUDA for an OSCAR cache that
    crops exactly, unless the cache or the call declines."""
    model = tiny_model("qwen3")
    cache = OscarQuantizedCache(model.config, **WINDOWS)
    cuda, cpu, mps = torch.device("cuda"), torch.device("cpu"), torch.device("mps")
    assert DeferredStopCheck.is_supported(cuda, cache, True, False)
    assert not DeferredStopCheck.is_supported(cpu, cache, True, False)
    assert not DeferredStopCheck.is_supported(cuda, cache, True, True)  # assisted decoding: its own loop
    cache.defer_stop_check = False
    assert not DeferredStopCheck.is_supported(cuda, cache, True, False)
    from transformers import DynamicCache

    assert not DeferredStopCheck.is_supported(cuda, DynamicCache(), True, False)
    assert DeferredStopCheck.is_supported(mps, DynamicCache(), True, False)  # transformers' rule, untouched
    assert deferred_stop.install()  # idempotent: a second install does not wrap twice
    wrapped = DeferredStopCheck.__dict__["is_supported"].__func__
    assert not hasattr(wrapped._oscar_wrapped, "_oscar_wrapped")


def test_crop_zero_reads_nothing_back_from_the_device(monkeypatch):
    """The deferred check calls crop(0) on every step: on a static layer it must not read the device lengths (a host
    sync per layer and step, the very stall the deferral removes)."""
    layer = OscarQuantizedLayer(None, None, 0.96, 0.92, sink_tokens=4, recent_tokens=8, demote_block=4,
                                max_cache_len=64, layer_idx=0)
    layer.update(torch.randn(1, 2, 20, 32).bfloat16(), torch.randn(1, 2, 20, 32).bfloat16())

    def no_reads(*_):
        raise AssertionError("crop(0) read the lengths back")

    monkeypatch.setattr(OscarQuantizedLayer, "get_seq_length", no_reads)
    monkeypatch.setattr(OscarQuantizedLayer, "_host_lengths", no_reads)
    layer.crop(0)
    with pytest.raises(AssertionError, match="read the lengths"):
        layer.crop(-1)


@torch.no_grad()
def test_compiled_generate_defers_and_compiles_once(monkeypatch):
    """The compiled path (a compile_config on the CPU): with the deferral, an EOS stop that lands a few demotions in
    gives the eager per-step tokens and cache, in one compiled graph (crop(0) between steps touches no tensor the
    graph guards on, and the final crop(-1) writes the lengths in place)."""
    from test_compile import compile_config, new_counter

    monkeypatch.setattr(deferred_stop, "DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(torch, "Event", HostEvent)
    model = tiny_model("qwen3")
    ids = torch.randint(3, 128, (1, 21), generator=torch.Generator().manual_seed(0))
    reference, _, _ = _generate(model, ids, eos=model.config.vocab_size + 1, defer=False, static=True)
    eos = reference[0, ids.shape[1] + 17].item()
    want, _, want_cache = _generate(model, ids, eos, False, True)
    counter = new_counter()
    torch._dynamo.reset()
    if hasattr(model, "_compiled_call"):
        del model._compiled_call
    crops = []
    got, _, cache = _generate(model, ids, eos, True, True, crops, compile_config=compile_config(counter))
    assert torch.equal(got, want)
    assert counter.frame_count == 1
    assert [n for n, _, _ in crops if n] == [-1]  # deferred: one step past the EOS, undone
    for a, b in zip(cache.layers, want_cache.layers, strict=True):
        assert_same_layer(a, b)


@torch.no_grad()
def test_preparing_a_decode_step_reads_no_lengths_back(monkeypatch):
    """generate() builds each step's mask before the step (`prepare_inputs_for_generation`); with a static cache it
    asks for the query offset, which must come as a device tensor, as StaticCache's does: a host read there waits for
    the previous step and takes the deferral's overlap away (seen on an H100: 7.8 ms of a 10.8 ms step)."""
    model = tiny_model("qwen3")
    cache = OscarQuantizedCache(model.config, **WINDOWS, max_cache_len=96)
    inside, reads = [False], []
    real_prepare, real_lengths = model.prepare_inputs_for_generation, OscarQuantizedLayer._host_lengths

    def prepare(*args, **kwargs):
        inside[0] = True
        try:
            return real_prepare(*args, **kwargs)
        finally:
            inside[0] = False

    def lengths(layer):
        if inside[0]:
            reads.append(layer.layer_idx)
        return real_lengths(layer)

    monkeypatch.setattr(model, "prepare_inputs_for_generation", prepare)
    monkeypatch.setattr(OscarQuantizedLayer, "_host_lengths", lengths)
    ids = torch.randint(3, 128, (1, 21), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, **{cache_keyword(model): cache}, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         pad_token_id=0, disable_compile=True)
    assert out.shape[1] == 33
    assert reads == []
    offset = cache.get_query_offset(0)
    assert isinstance(offset, torch.Tensor) and int(offset) == cache.get_seq_length() == 32


@pytest.mark.parametrize("family", ["gemma3_text", "gemma2"])
@torch.no_grad()
def test_deferral_with_sliding_window_layers_continues_like_the_per_step_check(family, monkeypatch):
    """A cache with transformers' sliding-window layers beside the OSCAR ones is croppable too (transformers records
    their past while the stop is deferred), so it defers: after EOS stops at several points, a second turn on the
    returned cache gives the per-step check's tokens."""
    monkeypatch.setattr(deferred_stop, "DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(torch, "Event", HostEvent)
    model = tiny_model(family, layers=3)
    ids = torch.randint(3, 128, (1, 21), generator=torch.Generator().manual_seed(1))
    turn2 = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    reference, _, _ = _generate(model, ids, eos=model.config.vocab_size + 1, defer=False, static=False)
    new = reference[0, ids.shape[1]:].tolist()
    stops = list(dict.fromkeys(new[3:-1]))[:4]
    assert len(stops) >= 3
    for eos in stops:
        crops = []
        oscar_layer = model.config.layer_types.index("full_attention")
        got, got_streamed, got_cache = _generate(model, ids, eos, True, False, crops, crops_layer=oscar_layer)
        want, want_streamed, want_cache = _generate(model, ids, eos, False, False)
        assert torch.equal(got, want) and len(got_streamed) == len(want_streamed)
        assert [n for n, _, _ in crops if n] == [-1]
        follow = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, disable_compile=True)
        a = model.generate(torch.cat([got, turn2], 1), **{cache_keyword(model): got_cache}, **follow)
        b = model.generate(torch.cat([want, turn2], 1), **{cache_keyword(model): want_cache}, **follow)
        assert torch.equal(a, b)
