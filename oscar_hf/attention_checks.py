"""What the `"oscar"` attention function accepts, checked once per attention module.

transformers' attention modules pass their features as keyword arguments (`scaling`, `dropout`, `sliding_window`,
`softcap`, gpt-oss's learned sinks `s_aux`, ...). A feature the OSCAR path does not implement must be refused, not
dropped: dropped, it gives wrong logits without a word (gpt-oss's sinks ignored move its logits by 0.44).

The verdict on a module is cached on the module, keyed by the keyword names and which of them are `None` (no tensor
is read), so a decode step pays one tuple comparison.
"""

from __future__ import annotations

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

_WAY_OUT = 'Load the model with attn_implementation="sdpa" or "eager" instead (the cache still works, dequantized).'

# Keywords the "oscar" path honours (scaling, softcap), that the mask already carries (sliding_window, packed-sequence
# lengths), or that do not touch attention (bookkeeping the model forwards to every layer).
HONOURED = frozenset(
    {
        "scaling",
        "softcap",
        "sliding_window",
        "position_ids",
        "cache_position",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "output_router_logits",
        "return_dict",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "is_causal",
    }
)
# Keywords naming a feature the "oscar" path does not implement, with what it is.
REFUSED = {
    "s_aux": "learned attention sinks (`s_aux`, gpt-oss)",
    "sinks": "learned attention sinks (`sinks`)",
    "position_bias": "an additive position bias (`position_bias`)",
    "head_mask": "a head mask (`head_mask`)",
}

_VERDICT = "_oscar_attention_verdict"


def _verdict_key(kwargs: dict) -> tuple:
    return tuple((name, value is None) for name, value in kwargs.items()) + (kwargs.get("is_causal"),)


def check_attention_call(module: torch.nn.Module, key, dropout: float, kwargs: dict) -> None:
    """Raise when this call asks the `"oscar"` path for a feature it would drop; return quietly otherwise.

    `key` is the key tensor or the layer's `OscarSegments`; `kwargs` the attention function's extra keywords.
    """
    exact = kwargs.get("softcap") is not None or not isinstance(key, torch.Tensor)
    if dropout and exact:
        # Plain SDPA (no soft-capping, no OSCAR storage) applies dropout itself.
        raise NotImplementedError(
            f"The \"oscar\" attention path of {type(module).__name__} has no attention dropout (dropout={dropout}: "
            f"the module is training). Call model.eval(), or set the config's attention_dropout to 0. {_WAY_OUT}"
        )
    # The verdict is cached on the module for eager calls only. Traced, the checks cost nothing at replay. A cached
    # verdict would also put a guard on a value the trace itself rewrites: a compiled step whose keywords differ from
    # the eager prefill's (no position_ids there, say) then compiled twice.
    compiling = torch.compiler.is_compiling()
    verdict_key = _verdict_key(kwargs)
    if not compiling and getattr(module, _VERDICT, None) == verdict_key:
        return
    for name, value in kwargs.items():
        if value is None:
            continue
        if name in REFUSED:
            raise NotImplementedError(
                f"{type(module).__name__} passes {REFUSED[name]} to its attention function, which the \"oscar\" "
                f"attention does not implement (it would be silently ignored). {_WAY_OUT}"
            )
        if name not in HONOURED:
            raise NotImplementedError(
                f"{type(module).__name__} passes `{name}` to its attention function; the \"oscar\" attention does not "
                f"know this feature and will not ignore it silently. {_WAY_OUT}"
            )
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise NotImplementedError(
            f"{type(module).__name__} attends bidirectionally (is_causal=False); the \"oscar\" attention is for causal "
            f"decoders. {_WAY_OUT}"
        )
    if kwargs.get("output_attentions"):
        logger.warning_once(
            'The "oscar" attention does not return attention weights (output_attentions=True gives None); use '
            'attn_implementation="eager" for them.'
        )
    if not compiling:
        setattr(module, _VERDICT, verdict_key)


def segments_misused(what: str) -> str:
    """The message for another attention function handed an `OscarSegments` (the cache's config says "oscar")."""
    return (
        f"An attention function other than \"oscar\" tried `{what}` on OscarSegments, the handle an "
        "OscarQuantizedCache gives the \"oscar\" attention instead of key/value tensors. The cache reads the attention "
        "implementation from the config it was built with, which says \"oscar\", but the model using it runs another "
        "one. Build the cache from the config of the model that uses it: OscarQuantizedCache(model.config, ...)."
    )
