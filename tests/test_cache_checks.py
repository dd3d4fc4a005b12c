"""Issue 21: what the cache refuses, what it counts and what it says.

- Key centering is refused for models that soft-cap their scores (tanh is not shift-invariant).
- Memory figures count every layer that holds tokens, exact sliding-window layers included; a cache that quantizes
  nothing says so.
- States of another dtype than a layer stores are refused, not cast; segments handed to another attention function
  fail with the reason; a kernel that declines a call says why.
"""

import types
import uuid

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers.testing_utils import CaptureLogger

import oscar_hf.cache_checks
import oscar_hf.kernel_dispatch
from oscar_hf import OscarQuantizedCache, OscarRotations
from oscar_hf.calibrate.cli import main as calibrate_main
from oscar_hf.evaluation.decode_mode import cache_kv_bits_per_element, cache_kv_bytes

COVERING = dict(sink_tokens=8, recent_tokens=64)


def centered_bundle(layers=2, heads=2, d=32):
    base = OscarRotations.data_free("hadamard", layers, heads, d)
    means = torch.randn(layers, heads, d, generator=torch.Generator().manual_seed(0))
    return OscarRotations("oscar", layers, heads, d, base.k_clip_ratios, base.v_clip_ratios, base.k_rotations,
                          base.v_rotations, k_means=means)


# --- item 3: key centering under score soft-capping -----------------------------------------------------------------


def test_key_centering_is_refused_for_a_soft_capping_model():
    with pytest.raises(ValueError, match=r"attn_logit_softcapping=.*--center-keys"):
        OscarQuantizedCache(tiny_config("gemma2"), rotations=centered_bundle())
    OscarQuantizedCache(tiny_config("gemma2", attn_logit_softcapping=None), rotations=centered_bundle())
    OscarQuantizedCache(tiny_config("gemma3_text"), rotations=centered_bundle())  # no soft-capping: exact


def test_calibrate_center_keys_is_refused_for_a_soft_capping_model_before_it_loads(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    tiny_model("gemma2").save_pretrained(tmp_path / "model")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 128, 4096).astype(np.uint16))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_model)
    rc = calibrate_main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "tokens.npy"), "--num-tokens",
                         "3072", "--output", str(tmp_path / "bundle"), "--seq-len", "256", "--no-progress",
                         "--center-keys"])
    err = capsys.readouterr().err
    assert rc == 2 and "oscar-calibrate: error: --center-keys centers keys" in err, err
    assert "attn_logit_softcapping" in err


# --- item 4: memory figures of every layer ----------------------------------------------------------------------------


@torch.no_grad()
def test_held_bytes_count_the_exact_sliding_layers_too():
    model = tiny_model("gemma2")  # layer 0 slides (window 8), layer 1 is quantized
    cache = OscarQuantizedCache(model.config, method="hadamard", **COVERING)
    model(torch.randint(3, 128, (2, 20)), past_key_values=cache)
    sliding, quantized = cache.layers
    exact_bytes = sliding.keys.numel() * 4 + sliding.values.numel() * 4
    assert cache.held_bytes() == quantized.held_bytes() + exact_bytes
    assert cache_kv_bytes(cache) == cache.held_bytes()
    # Every token held is exact float32 under covering windows.
    assert cache.kv_bits_per_element() == 32.0
    assert cache.allocated_bytes() >= cache.held_bytes()


@torch.no_grad()
def test_a_cache_of_only_sliding_layers_warns_once_and_reports_what_it_holds():
    config = tiny_config("mistral", sliding_window=4)
    config._name_or_path = f"all-sliding-{uuid.uuid4().hex}"  # warning_once remembers messages across tests
    with CaptureLogger(oscar_hf.cache_checks.logger) as captured:
        cache = OscarQuantizedCache(config, method="hadamard")
        OscarQuantizedCache(config, method="hadamard")
    assert captured.out.count("quantizes nothing") == 1
    model = tiny_model("mistral", sliding_window=4)
    model(torch.randint(3, 128, (1, 10)), past_key_values=cache)
    assert not cache.quantized_layers()
    assert cache.held_bytes() > 0 and cache_kv_bits_per_element(cache) == 32.0


# --- item 9: dtypes, segments given to another attention function, kernel declines ----------------------------------


@torch.no_grad()
def test_states_of_another_dtype_are_refused_not_cast():
    cache = OscarQuantizedCache(tiny_config("llama"), method="hadamard", **COVERING)
    k = torch.randn(1, 2, 4, 32, dtype=torch.float16)
    cache.update(k, k, 0)
    big = torch.full((1, 2, 1, 32), 1e6, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"stores its states in torch.float16 but got keys in torch.bfloat16"):
        cache.update(big, big, 0)
    assert cache.get_seq_length(0) == 4


@torch.no_grad()
def test_cache_built_for_oscar_used_by_another_attention_says_why():
    oscar = tiny_model("llama", attn_implementation="oscar")
    other = tiny_model("llama", attn_implementation="eager")
    cache = OscarQuantizedCache(oscar.config, method="hadamard", **COVERING)
    ids = torch.randint(3, 128, (1, 6))
    other(ids, past_key_values=cache)
    with pytest.raises((TypeError, AttributeError), match=r"OscarQuantizedCache\(model.config"):
        other(ids[:, :1], past_key_values=cache)


def test_a_declined_kernel_call_is_reported_with_its_reason(monkeypatch):
    monkeypatch.setattr(oscar_hf.kernel_dispatch, "triton_available", lambda: False)
    query = types.SimpleNamespace(is_cuda=True)
    with CaptureLogger(oscar_hf.kernel_dispatch.logger) as captured:
        assert oscar_hf.kernel_dispatch.decode_attention_fast_path(query, None, None, None) is None
    assert "declined a call (Triton is not installed)" in captured.out


@torch.no_grad()
def test_positive_crop_follows_transformers_own_layers():
    """transformers 5.17 takes `crop(n > 0)` as the length to keep (deprecated); later releases raise. So does the
    cache, whichever is installed."""
    from transformers import DynamicCache

    config = tiny_config("llama")
    states = torch.randn(1, 2, 6, 32)
    exact, cache = DynamicCache(config=config), OscarQuantizedCache(config, method="hadamard", **COVERING)
    for c in (exact, cache):
        for idx in range(2):
            c.update(states, states, idx)
    try:
        exact.crop(4)
    except ValueError:
        with pytest.raises(ValueError, match="positive value"):
            cache.crop(4)
        assert cache.get_seq_length() == 6
    else:
        cache.crop(4)
        assert cache.get_seq_length() == exact.get_seq_length() == 4
    cache.crop(-1)
    assert cache.get_seq_length() == exact.get_seq_length() - 1
