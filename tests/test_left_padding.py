"""Left-padded batches through `attn_implementation="oscar"`, every family of the support table.

The oracle is eager attention over a `DynamicCache` on the same padded batch: with windows covering the sequence the
OSCAR cache stores every token exactly, so the two differ only by the order of float32 sums.
"""

import pytest
import torch
from conftest import FAMILY_OVERRIDES, tiny_model
from transformers import DynamicCache

from oscar_hf import OscarQuantizedCache


def left_padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (2, 12))
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0  # the second sequence is 7 tokens behind 5 pads
    return ids, mask


@pytest.mark.parametrize("family", sorted(FAMILY_OVERRIDES))
@torch.no_grad()
def test_left_padded_batch_gives_finite_logits_and_eager_tokens(family):
    reference = tiny_model(family, attn_implementation="eager")
    model = tiny_model(family, attn_implementation="oscar")
    ids, mask = left_padded_batch()
    want = reference(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(config=reference.config)).logits
    cache = OscarQuantizedCache(model.config, method="hadamard", sink_tokens=8, recent_tokens=64)
    got = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
    assert torch.isfinite(got).all(), "non-finite logits from the prefill of a left-padded batch"
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)

    kwargs = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    expected = reference.generate(ids, **kwargs)
    cache = OscarQuantizedCache(model.config, method="hadamard", sink_tokens=8, recent_tokens=64)
    scores = model.generate(ids, past_key_values=cache, output_logits=True, return_dict_in_generate=True, **kwargs)
    assert all(torch.isfinite(step).all() for step in scores.logits)
    assert torch.equal(scores.sequences, expected)
    assert all(layer.body_len == 0 for layer in cache.quantized_layers())
