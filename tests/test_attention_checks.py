"""Features the `"oscar"` attention does not implement are refused with the way out, never silently dropped."""

import pytest
import torch
from conftest import tiny_model

from oscar_hf.attention import oscar_attention_forward


class FakeAttention(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def qkv(q_len=3):
    torch.manual_seed(0)
    return torch.randn(1, 4, q_len, 8), torch.randn(1, 2, q_len, 8), torch.randn(1, 2, q_len, 8)


def test_unknown_keyword_is_refused_with_its_name_and_the_way_out():
    module = FakeAttention()
    with pytest.raises(NotImplementedError, match=r"`rel_bias`.*attn_implementation=\"sdpa\" or \"eager\""):
        oscar_attention_forward(module, *qkv(), None, rel_bias=torch.zeros(1))
    # None means the feature is off: nothing to refuse.
    out, _ = oscar_attention_forward(module, *qkv(), None, rel_bias=None, position_ids=torch.arange(3)[None])
    assert out.shape == (1, 3, 4, 8)


def test_learned_sinks_are_refused_even_after_a_cached_verdict():
    module = FakeAttention()
    oscar_attention_forward(module, *qkv(), None, scaling=0.3)
    with pytest.raises(NotImplementedError, match="learned attention sinks"):
        oscar_attention_forward(module, *qkv(), None, scaling=0.3, s_aux=torch.zeros(4))


def test_verdict_is_cached_per_module_and_keyword_set():
    module = FakeAttention()
    oscar_attention_forward(module, *qkv(), None, scaling=0.3, sliding_window=None)
    assert module._oscar_attention_verdict == (("sliding_window", True), None)  # scaling is a named argument


def test_bidirectional_attention_is_refused():
    with pytest.raises(NotImplementedError, match="is_causal=False"):
        oscar_attention_forward(FakeAttention(), *qkv(), None, is_causal=False)


def test_dropout_is_refused_where_the_oscar_path_would_drop_it_and_kept_where_sdpa_applies_it():
    with pytest.raises(NotImplementedError, match="dropout"):
        oscar_attention_forward(FakeAttention(), *qkv(), None, dropout=0.5, softcap=30.0)
    torch.manual_seed(0)
    a, _ = oscar_attention_forward(FakeAttention(), *qkv(), None, dropout=0.5)
    b, _ = oscar_attention_forward(FakeAttention(), *qkv(), None, dropout=0.0)
    assert not torch.equal(a, b)  # SDPA applied the dropout


def test_training_gemma2_with_attention_dropout_is_refused():
    model = tiny_model("gemma2", attention_dropout=0.1).train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(torch.randint(3, 128, (1, 6)))


def test_gpt_oss_sinks_are_refused_not_ignored():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    from transformers import AutoModelForCausalLM, GptOssConfig

    config = GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0, max_position_embeddings=256,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="oscar").eval()
    with pytest.raises(NotImplementedError, match=r"s_aux.*\"eager\""):
        model(torch.randint(3, 128, (1, 6)))
