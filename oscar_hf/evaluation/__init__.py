"""Quality tooling, apart from the runtime cache: decode-mode KL against an exact cache, long-range retrieval, and the
`oscar-eval` command. Nothing in `import oscar_hf` imports this package.

```python
from oscar_hf.evaluation import evaluate_caches, decode_mode_run, compare_runs
```
"""

from .decode_mode import (
    DecodeRun,
    cache_kv_bits_per_element,
    cache_kv_bytes,
    compare_runs,
    decode_mode_run,
    evaluate_caches,
    smooth,
)

__all__ = [
    "DecodeRun",
    "cache_kv_bits_per_element",
    "cache_kv_bytes",
    "compare_runs",
    "decode_mode_run",
    "evaluate_caches",
    "smooth",
]
