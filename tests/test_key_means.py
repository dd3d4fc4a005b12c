"""Key centering (`OscarRotations.k_means`): the cache subtracts a mean key from every key it stores. Softmax ignores a
score shift shared by all keys of a query, so attention must not change; the 2-bit rows lose their common offset."""

import pytest
import torch
from conftest import tiny_model

from oscar_hf import OscarQuantizedCache, OscarRotations
from oscar_hf.layer import OscarQuantizedLayer
from oscar_hf.quantization import hadamard_matrix

COVERING = dict(sink_tokens=64, recent_tokens=512)  # every token exact: only the shift could change the output
SMALL = dict(sink_tokens=4, recent_tokens=8, demote_block=4)


def _bundle(means=None, layers=2, heads=2, d=32):
    base = OscarRotations.data_free("hadamard", layers, heads, d)
    return OscarRotations("oscar", layers, heads, d, base.k_clip_ratios, base.v_clip_ratios, base.k_rotations,
                          base.v_rotations, k_means=means)


@torch.no_grad()
@pytest.mark.parametrize("attn", ["oscar", "sdpa"])
def test_centering_leaves_attention_unchanged(attn):
    """With exact windows, a large per-head mean key changes no logit: both the `"oscar"` attention (segments) and
    any other attention function (dequantized history + the new states, centered alike) see every key shifted."""
    model = tiny_model("qwen3", attn_implementation=attn)
    means = 5.0 * torch.randn(2, 2, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, 128, (2, 40))
    out = []
    for rot in (_bundle(), _bundle(means)):
        cache = OscarQuantizedCache(model.config, rotations=rot, **COVERING)
        logits = [model(ids[:, :24], past_key_values=cache).logits]
        for t in range(24, 40, 4):  # multi-token steps, then single tokens
            logits.append(model(ids[:, t : t + 4], past_key_values=cache).logits)
        logits.append(model(ids[:, -1:], past_key_values=cache).logits)
        out.append(torch.cat(logits, dim=1))
    torch.testing.assert_close(out[1], out[0], atol=1e-4, rtol=1e-4)


def test_centering_shrinks_the_error_of_keys_with_a_common_offset():
    d, heads = 32, 2
    offset = torch.linspace(-6, 6, d)[torch.randperm(d, generator=torch.Generator().manual_seed(1))]
    keys = offset + 0.5 * torch.randn(1, heads, 300, d, generator=torch.Generator().manual_seed(2))
    values = torch.randn(1, heads, 300, d)
    h = hadamard_matrix(d).float()[None]
    errors = []
    for mean in (None, offset.expand(heads, d).clone()):
        layer = OscarQuantizedLayer(h, h, 0.96, 0.92, layer_idx=0, k_mean=mean, **SMALL)
        layer.update(keys, values)
        k, _ = layer.dequantized_rotated(torch.float32)
        stored = keys - (0 if mean is None else offset)
        errors.append((k @ h[0].T - stored).pow(2).mean())
    assert errors[1] < 0.25 * errors[0]  # the offset no longer stretches each row's 2-bit range


def test_key_means_round_trip_and_validation(tmp_path):
    means = torch.randn(2, 2, 32)
    _bundle(means).save_pretrained(tmp_path / "b")
    back = OscarRotations.from_pretrained(tmp_path / "b")
    assert torch.equal(back.k_means, means) and back.layer_key_mean(1).shape == (2, 32)
    with pytest.raises(ValueError, match="k_means has shape"):
        _bundle(torch.randn(2, 3, 32))
    bad = means.clone()
    bad[1, 0, 4] = float("inf")
    with pytest.raises(ValueError, match="k_means holds NaN or Inf"):
        _bundle(bad)
