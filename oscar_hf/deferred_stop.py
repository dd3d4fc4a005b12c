"""Let `generate()` read its stop decision one step late with an OscarQuantizedCache on CUDA, so the GPU never idles
between decode steps.

`generate()` asks the host after every token whether to stop (`unfinished_sequences.max() == 0`) and hands the token
to the streamer (`.cpu()`). Both wait for the device to finish the step. The host then prepares the next step (the
loop, the inputs and masks, the compiled call's guards and CUDA-graph launch) while the GPU has nothing queued: about
3 ms a step for the Qwen3-8B shape on an H100, against 8.0 (8K) to 10.6 ms (128K) of graph (`benchmarks/RESULTS.md`).

transformers has the remedy, `DeferredStopCheck`: the flag and the token are copied to pinned memory without waiting
and read on the following step, so the host queues step n + 1 while the device runs step n; when the flag says stop,
the one extra step is undone (`cache.crop(-1)`, and generate() drops its token). transformers turns it on for MPS only.
Its condition for a cache the caller keeps is that `crop` puts the cache back exactly, which an OSCAR cache's crop does
(its undo ring holds the demoted tokens a crop must restore: `OscarQuantizedLayer.crop`). So for an OSCAR cache on
CUDA we turn it on too. Set `cache.defer_stop_check = False` to keep generate()'s per-step check.
"""

from __future__ import annotations

import inspect

from transformers.utils import logging

logger = logging.get_logger(__name__)

# Where the deferral pays: on the CPU every op has already run when the host reads the flag (tests widen this).
DEVICES = frozenset({"cuda"})


def _defers(device, cache, is_assistant: bool) -> bool:
    from .cache import OscarQuantizedCache

    return (
        not is_assistant
        and getattr(device, "type", None) in DEVICES
        and isinstance(cache, OscarQuantizedCache)
        and cache.defer_stop_check
        and cache.is_croppable
    )


def install() -> bool:
    """Wrap `DeferredStopCheck.is_supported` (once) so that it also says yes for an OSCAR cache on CUDA. Returns whether
    this transformers has the deferred check at all (older releases check every step, and stay as they are)."""
    try:
        from transformers.generation.utils import DeferredStopCheck
    except ImportError:
        return False
    original = DeferredStopCheck.__dict__.get("is_supported")
    if not isinstance(original, staticmethod):
        logger.debug("transformers' DeferredStopCheck.is_supported is not a staticmethod; generate() left as it is")
        return False
    if getattr(original.__func__, "_oscar_wrapped", None) is not None:
        return True
    decide = original.__func__
    signature = inspect.signature(decide)
    if not {"device", "cache", "is_assistant"} <= set(signature.parameters):
        logger.debug("transformers' DeferredStopCheck.is_supported changed its arguments; generate() left as it is")
        return False

    def is_supported(*args, **kwargs):
        # Bound by name, so that an argument transformers adds later passes through untouched.
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        given = call.arguments
        if _defers(given["device"], given["cache"], given["is_assistant"]):
            return True
        return decide(*args, **kwargs)

    is_supported._oscar_wrapped = decide
    is_supported.__doc__ = decide.__doc__
    DeferredStopCheck.is_supported = staticmethod(is_supported)
    return True
