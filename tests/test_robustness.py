"""Bad input fails early and says what to do: unsupported models, misuse of a cache, non-finite states, hostile files.

Argument validation, bundles for another model and corrupt bundle files are covered in `test_cache.py` and
`test_bundle.py`; this file covers what those do not.
"""

import pickle

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import AutoConfig

from oscar_hf import OscarQuantizedCache, OscarRotations


@pytest.mark.parametrize(
    "family, kwargs, match",
    [
        ("t5", dict(d_model=64, num_layers=2, num_heads=2, d_kv=32, d_ff=64, vocab_size=128), "encoder-decoder"),
        (
            "deepseek_v3",
            dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, q_lora_rank=16,
                 qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, vocab_size=128),
            "multi-head latent attention",
        ),
        (
            "qwen3_next",
            dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 vocab_size=128),
            "layer types \\['linear_attention'\\]",
        ),
        ("llama", dict(hidden_size=120, num_attention_heads=4, head_dim=30, num_hidden_layers=2), "multiple of 4"),
    ],
    ids=["encoder-decoder", "mla", "linear-attention", "head-dim-30"],
)
def test_unsupported_models_are_refused_at_construction(family, kwargs, match):
    config = AutoConfig.for_model(family, **kwargs)
    with pytest.raises(ValueError, match=match):
        OscarQuantizedCache(config, method="hadamard")


@pytest.mark.parametrize("value", [float("nan"), -0.5, 2.0])
def test_clip_ratio_outside_the_unit_interval_is_refused_everywhere(value):
    config = tiny_config("qwen3")
    with pytest.raises(ValueError, match="k_clip_ratio"):
        OscarQuantizedCache(config, method="hadamard", k_clip_ratio=value)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        OscarRotations.data_free("hadamard", 2, 2, 32, v_clip_ratio=value)


@pytest.mark.parametrize("name", ["sink_tokens", "recent_tokens", "demote_block", "max_cache_len"])
def test_window_sizes_must_be_non_negative_integers(name):
    with pytest.raises(ValueError, match=name):
        OscarQuantizedCache(tiny_config("qwen3"), method="naive", **{name: -1})
    with pytest.raises(ValueError, match=name):
        OscarQuantizedCache(tiny_config("qwen3"), method="naive", **{name: 8.5})


@pytest.mark.parametrize("where", ["keys", "values"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@torch.no_grad()
def test_check_finite_refuses_non_finite_states_from_a_model(where, bad):
    model = tiny_model("llama")
    cache = OscarQuantizedCache(model.config, method="hadamard", check_finite=True, sink_tokens=2, recent_tokens=4)
    ids = torch.randint(3, 128, (1, 12))
    model(input_ids=ids, past_key_values=cache)
    # Poison one projection of the last layer: the next forward produces non-finite states there.
    proj = model.model.layers[1].self_attn.k_proj if where == "keys" else model.model.layers[1].self_attn.v_proj
    proj.weight[0, 0] = bad
    with pytest.raises(ValueError, match=f"Layer 1 received .* {where} rows holding NaN or Inf"):
        model(input_ids=ids[:, :1], past_key_values=cache)


@torch.no_grad()
def test_a_cache_reused_with_a_deeper_model_names_the_mismatch():
    cache = OscarQuantizedCache(tiny_config("llama", layers=2), method="hadamard")
    deeper = tiny_model("llama", layers=3)
    with pytest.raises(ValueError, match="built for 2 decoder layers but got states for layer 2"):
        deeper(input_ids=torch.randint(3, 128, (1, 8)), past_key_values=cache)


@torch.no_grad()
def test_a_cache_reused_with_another_head_dim_names_the_mismatch():
    small = tiny_model("llama", head_dim=32)
    cache = OscarQuantizedCache(small.config, method="naive")
    small(input_ids=torch.randint(3, 128, (1, 8)), past_key_values=cache)
    with pytest.raises(ValueError, match="KV heads of head_dim 32 but got keys of shape"):
        cache.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64), 0)


class _Marker:
    """Unpickling this creates a file: proof that pickled code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_posing_as_a_bundle_is_refused_without_running_it(tmp_path):
    OscarRotations.data_free("hadamard", 2, 2, 32).save_pretrained(tmp_path)
    marker = tmp_path / "pickle-ran"
    (tmp_path / "rotations.safetensors").write_bytes(pickle.dumps({"k_rotations": _Marker(marker)}))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        OscarRotations.from_pretrained(tmp_path)
    assert not marker.exists()


def test_pickled_calibration_data_is_refused_without_running_it(tmp_path):
    from oscar_hf.calibrate.data import load_calibration_tokens

    marker = tmp_path / "pickle-ran"
    np.save(tmp_path / "tokens.npy", np.array([_Marker(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="Python objects"):
        load_calibration_tokens(tmp_path / "tokens.npy")
    assert not marker.exists()
