"""Intensity normalisation to [0, 1] for the encoders and the similarity losses."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

NORMALIZATIONS = ("auto", "mr", "ct")
DEFAULT_CT_WINDOW = (-500.0, 800.0)
DEFAULT_PERCENTILES = (0.5, 99.5)


def _sample(array: np.ndarray, max_samples: int = 2_000_000) -> np.ndarray:
    flat = array.reshape(-1)
    step = max(1, flat.size // max_samples)
    return flat[::step]


def looks_like_ct(array: np.ndarray) -> bool:
    """Hounsfield-like range: air near -1000 and dense tissue or bone above +300."""
    lo, hi = np.percentile(_sample(array), [1, 99.9])
    return lo <= -700 and hi >= 300


def resolve_normalization(array: np.ndarray, method: str) -> str:
    if method not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")
    if method == "auto":
        return "ct" if looks_like_ct(array) else "mr"
    return method


def normalize_intensity(array: np.ndarray, method: str = "auto",
                        ct_window: Tuple[float, float] = DEFAULT_CT_WINDOW,
                        percentiles: Tuple[float, float] = DEFAULT_PERCENTILES,
                        mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Map intensities to float32 in [0, 1].

    ``mr``: robust clip between the given percentiles (computed inside ``mask`` when given),
    ``ct``: fixed Hounsfield window, ``auto``: ``ct`` when the range looks like Hounsfield units.
    """
    method = resolve_normalization(array, method)
    if method == "ct":
        lo, hi = ct_window
    else:
        values = array[mask > 0] if mask is not None and np.any(mask) else array
        lo, hi = np.percentile(_sample(values), percentiles)
        if hi <= lo:
            lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.float32)
    out = (array.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)
