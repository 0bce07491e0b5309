"""One normalisation rule for turning a cross-attention map into a mask by a threshold relative to its peak.

A method that thresholds "at half the peak" must take the peak where it thresholds: inside the mask the refined
mask is cut to. A peak taken over the whole map (a stray hot spot outside the target is common for an untrained or
unmasked token) would push every value inside below the threshold and empty the mask.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def peak_normalise(attention: Any, inside: Any) -> np.ndarray:
    """``attention`` (HxW) divided by its maximum over ``inside`` (bool HxW, same grid), clipped to [0, 1].

    The cell of that maximum is exactly 1, so any threshold in (0, 1] keeps it. Where nothing inside is positive
    (empty ``inside`` or a zero map there) there is no peak to scale by: the map comes back clipped, unscaled."""
    a = np.asarray(attention, dtype=np.float32)
    m = np.asarray(inside, dtype=bool)
    if m.shape != a.shape:
        raise ValueError(f"attention map {a.shape} and mask {m.shape} must share one grid")
    peak = float(a[m].max()) if m.any() else 0.0
    if peak > 0:
        a = a / np.float32(peak)
    return np.clip(a, 0.0, 1.0).astype(np.float32)
