"""Offline OSCAR calibration: capture post-RoPE Q/K/V statistics, fit rotations and clip ratios, publish bundles.

```python
from oscar_hf.calibrate import calibrate
rotations, report = calibrate(model, token_ids, grouping="layer")
rotations.save_pretrained("./bundle")
```
Command line: `oscar-calibrate --model PATH_OR_HUB_ID --data FILE --num-tokens N --output DIR [--push-to-hub ID]`.
"""

from .core import CalibrationReport, calibrate
from .data import load_calibration_tokens
from .fit import rotation_from_covariance

__all__ = ["CalibrationReport", "calibrate", "load_calibration_tokens", "rotation_from_covariance"]
