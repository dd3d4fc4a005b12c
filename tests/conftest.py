"""Shared fixtures: tiny random models of several families and the location of the shared reference assets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import oscar_hf  # noqa: F401  (registers the "oscar" attention implementation)

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("OSCAR_SHARED", REPO.parent / "shared"))
REF_MODEL = Path(os.environ.get("OSCAR_REF_MODEL", SHARED / "models" / "oscar-ref-code-qwen3"))
# Tokens [0, CALIBRATION_SPLIT) of heldout_tokens.npy may be used for calibration, the rest only for evaluation.
CALIBRATION_SPLIT = 1_048_576


# Per-family settings on top of the common tiny shape. Gemma's sliding window is short so that a few dozen tokens
# already slide; Mistral is built without one, as Mistral 7B v0.2 and later ship (with a window every layer is an
# exact sliding layer and nothing is quantized).
FAMILY_OVERRIDES = {
    "llama": {},
    "mistral": dict(sliding_window=None),
    "qwen2": {},
    "qwen3": {},
    "gemma2": dict(sliding_window=8),
    "gemma3_text": dict(sliding_window=8, layer_types=None),
    "phi3": {},
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}


def tiny_config(family: str, head_dim: int = 32, layers: int = 2, **overrides):
    """A tiny random config of `family` (a key of `FAMILY_OVERRIDES`): 4 query / 2 KV heads, vocab 128."""
    from transformers import AutoConfig

    if family not in FAMILY_OVERRIDES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILY_OVERRIDES)}")
    common = dict(
        vocab_size=128,
        hidden_size=4 * head_dim,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family.startswith("gemma"):
        common["query_pre_attn_scalar"] = head_dim
    common.update(FAMILY_OVERRIDES[family])
    common.update(overrides)
    if common.get("layer_types", 0) is None:
        # Gemma 3's 5:1 local:global pattern, cut to the layer count, ending on a global (full) layer.
        common["layer_types"] = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    return AutoConfig.for_model(family, **common)


def tiny_model(family: str = "qwen3", attn_implementation: str = "oscar", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


@pytest.fixture(scope="session")
def ref_model_path() -> Path:
    if not (REF_MODEL / "config.json").exists():
        pytest.skip(f"reference model not found at {REF_MODEL} (set OSCAR_REF_MODEL or OSCAR_SHARED)")
    return REF_MODEL
