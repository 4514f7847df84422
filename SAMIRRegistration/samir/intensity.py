"""Intensity normalisation to [0, 1] for the encoders and the similarity losses."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

NORMALIZATIONS = ("auto", "mr", "ct")
# also accepted where a trained network's checkpoint names its normalisation (not a command-line choice)
ALL_NORMALIZATIONS = NORMALIZATIONS + ("minmax",)
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
    if method not in ALL_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {ALL_NORMALIZATIONS}, got {method!r}")
    if method == "auto":
        return "ct" if looks_like_ct(array) else "mr"
    return method


def normalize_intensity(array: np.ndarray, method: str = "auto",
                        ct_window: Tuple[float, float] = DEFAULT_CT_WINDOW,
                        percentiles: Tuple[float, float] = DEFAULT_PERCENTILES,
                        mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Map intensities to float32 in [0, 1].

    ``mr``: robust clip between the given percentiles (computed inside ``mask`` when given),
    ``ct``: fixed Hounsfield window, ``minmax``: the volume's minimum and maximum (inside ``mask``),
    ``auto``: ``ct`` when the range looks like Hounsfield units.
    """
    method = resolve_normalization(array, method)
    if method == "ct":
        lo, hi = ct_window
    elif method == "minmax":  # per-volume min-max (e.g. the ACDC training protocol)
        values = array[mask > 0] if mask is not None and np.any(mask) else array
        lo, hi = float(values.min()), float(values.max())
    else:
        values = array[mask > 0] if mask is not None and np.any(mask) else array
        lo, hi = np.percentile(_sample(values), percentiles)
        if hi <= lo:
            lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.float32)
    out = (array.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def intensity_rank_correlation(fixed01: np.ndarray, moving01: np.ndarray, valid: Optional[np.ndarray] = None,
                               max_samples: int = 200_000, seed: int = 0) -> float:
    """Spearman correlation of fixed and moving intensities where the fixed image has content.

    Same-contrast pairs (phases, patients, follow-ups, gamma or bias changes) correlate clearly
    positively even before registration; T1 against T2-like contrasts correlate negatively.
    """
    select = fixed01 > 0.02  # not background
    if valid is not None:
        select &= valid > 0
    a, b = fixed01[select], moving01[select]
    if a.size < 100:
        return 1.0
    if a.size > max_samples:
        idx = np.random.default_rng(seed).choice(a.size, max_samples, replace=False)
        a, b = a[idx], b[idx]
    rank_a = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(np.float64)
    rank_b = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(np.float64)
    if rank_a.std() == 0 or rank_b.std() == 0:
        return 0.0
    return float(np.corrcoef(rank_a, rank_b)[0, 1])


HISTOGRAM_QUANTILES = 1025


def match_histogram(source01: np.ndarray, reference01: np.ndarray, source_valid: Optional[np.ndarray] = None,
                    reference_valid: Optional[np.ndarray] = None, quantiles: int = HISTOGRAM_QUANTILES) -> np.ndarray:
    """``source01`` remapped by a monotone intensity map so that its distribution inside ``source_valid``
    matches ``reference01``'s inside ``reference_valid`` (quantile matching, float32).

    For same-contrast pairs whose intensity response differs (gamma, scanner, bias in the global map):
    local NCC is invariant to linear changes only. Quantiles the source repeats (a background plateau)
    map to the mean of the matching reference quantiles; voxels outside ``source_valid`` are unchanged.
    """
    if source01.shape != reference01.shape:
        raise ValueError(f"histogram matching needs one grid, got {source01.shape} and {reference01.shape}")
    source_values = source01 if source_valid is None else source01[source_valid > 0]
    reference_values = reference01 if reference_valid is None else reference01[reference_valid > 0]
    if source_values.size < quantiles or reference_values.size < quantiles:
        return source01.astype(np.float32, copy=True)
    levels = np.linspace(0.0, 1.0, quantiles)
    source_q = np.quantile(_sample(source_values), levels)
    reference_q = np.quantile(_sample(reference_values), levels)
    knots, which = np.unique(source_q, return_inverse=True)
    targets = np.bincount(which, weights=reference_q) / np.bincount(which)
    if knots.size < 2:
        return source01.astype(np.float32, copy=True)
    mapped = np.interp(source01, knots, targets).astype(np.float32)
    if source_valid is not None:
        mapped = np.where(source_valid > 0, mapped, source01).astype(np.float32)
    return mapped
