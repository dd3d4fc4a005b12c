"""oscar-hf: 2-bit OSCAR KV-cache quantization for Hugging Face Transformers."""

from . import attention as _attention
from . import deferred_stop as _deferred_stop
from . import ops as _ops  # noqa: F401  (registers the oscar_hf::append and oscar_hf::decode_attention torch ops)
from .attention import OSCAR_ATTENTION
from .cache import OscarQuantizedCache, cache_keyword
from .layer import OscarQuantizedLayer, OscarSegments
from .rotations import OscarRotations

__version__ = "0.1.0"

_attention.register()
_deferred_stop.install()

__all__ = [
    "OSCAR_ATTENTION",
    "OscarQuantizedCache",
    "OscarQuantizedLayer",
    "OscarRotations",
    "OscarSegments",
    "__version__",
    "cache_keyword",
]
