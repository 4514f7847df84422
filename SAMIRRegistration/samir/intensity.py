"""Intensity normalisation to [0, 1] for the encoders and the similarity losses, and monotone intensity maps."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .options import NORMALIZATIONS

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


def merge_ties(x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The distinct values of ``x`` (sorted) and the mean of ``y`` over each: knots for a piecewise-linear map."""
    knots, which = np.unique(x, return_inverse=True)
    return knots, np.bincount(which, weights=y) / np.bincount(which)


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
    knots, targets = merge_ties(source_q, reference_q)
    if knots.size < 2:
        return source01.astype(np.float32, copy=True)
    mapped = np.interp(source01, knots, targets).astype(np.float32)
    if source_valid is not None:
        mapped = np.where(source_valid > 0, mapped, source01).astype(np.float32)
    return mapped


MIN_MAP_CONTRAST = 0.1  # a monotone map flatter than this (output range / input range) is not applied
# a fitted map closer to a straight line than this (see map_nonlinearity) is not applied: pairs with the same
# intensity response depart a little from a line too (blur and residual misalignment in the estimate), and
# applied to such small departures the map moved soft edges and cost Dice (bench/README, "Design notes")
MIN_MAP_NONLINEARITY = 0.06


def joint_statistics(source: "torch.Tensor", target: "torch.Tensor", weight: "torch.Tensor",
                     bins: int = 64) -> np.ndarray:
    """``(3, bins)`` float64: per equal-width bin of ``source`` (values in [0, 1]) the total weight and the
    weighted sums of ``source`` and ``target``. Sums of these over several grids fit one map."""
    import torch

    source, target, weight = source.reshape(-1).float(), target.reshape(-1).float(), weight.reshape(-1).float()
    index = (source.clamp(0, 1) * bins).long().clamp_(max=bins - 1)
    return np.stack([torch.bincount(index, w, minlength=bins).double().cpu().numpy()
                     for w in (weight, weight * source, weight * target)])


def monotone_map(statistics: np.ndarray, min_fraction: float = 1e-4) -> Tuple[np.ndarray, np.ndarray]:
    """Non-decreasing map ``g`` with ``g(source) ≈ target`` from :func:`joint_statistics`: the weighted mean
    of ``target`` per bin, made monotone by pool-adjacent-violators; bins holding less than ``min_fraction``
    of the weight are left out. Returns ``(knots, values)`` for :func:`apply_monotone_map`.

    Fitted on an aligned pair (warped moving, fixed) the map is the intensity response that separates
    them, estimated from corresponding voxels rather than from the two histograms, so a structure that
    changes size does not bend it.
    """
    total, sum_source, sum_target = statistics
    if total.sum() <= 0:
        return np.zeros(0), np.zeros(0)
    keep = total > min_fraction * total.sum()
    knots, means, weights = sum_source[keep] / total[keep], sum_target[keep] / total[keep], total[keep]
    blocks: list = []  # pool adjacent violators: [mean, weight, count], merged until the means do not decrease
    for mean, w in zip(means, weights):
        blocks.append([mean, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    values = np.concatenate([np.full(count, mean) for mean, _, count in blocks]) if blocks else np.zeros(0)
    if knots.size < 2 or values[-1] - values[0] < MIN_MAP_CONTRAST * (knots[-1] - knots[0]):
        return np.zeros(0), np.zeros(0)  # no monotone relation to speak of: mapping would erase the contrast
    return knots, values


def symmetric_monotone_map(forward: np.ndarray, backward: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Monotone map source → target from both regressions: ``forward`` = :func:`joint_statistics` (source,
    target), ``backward`` = (target, source). The mean of the forward map and of the backward map's inverse.

    Where the two images differ by their intensity response only, both give that response. Where they
    are not yet in correspondence, or the source is noisy, the forward regression flattens the map towards
    the mean target and the inverted backward one steepens it; the average keeps the contrast that
    either one alone would erase.
    """
    forward_knots, forward_values = monotone_map(forward)
    backward_knots, backward_values = monotone_map(backward)
    if len(forward_knots) < 2 or len(backward_knots) < 2:
        return np.zeros(0), np.zeros(0)
    inverse_knots, inverse_values = merge_ties(backward_values, backward_knots)  # flat runs: their mean
    if inverse_knots.size < 2:
        return np.zeros(0), np.zeros(0)
    return forward_knots, 0.5 * (forward_values + np.interp(forward_knots, inverse_knots, inverse_values))


def map_nonlinearity(knots: np.ndarray, values: np.ndarray) -> float:
    """Largest distance of the map from its least-squares straight line, as a fraction of its range
    (0 for a linear map, which changes nothing for local NCC)."""
    if len(knots) < 3 or np.ptp(values) <= 0:
        return 0.0
    design = np.stack([knots, np.ones_like(knots)], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, values, rcond=None)
    return float(np.abs(values - design @ coefficients).max() / np.ptp(values))


def apply_monotone_map(image: "torch.Tensor", knots: np.ndarray, values: np.ndarray) -> "torch.Tensor":
    """``image`` through the piecewise-linear map through ``(knots, values)``, constant beyond the ends."""
    import torch

    if len(knots) < 2:
        return image
    knots = torch.as_tensor(knots, dtype=image.dtype, device=image.device)
    values = torch.as_tensor(values, dtype=image.dtype, device=image.device)
    flat = image.reshape(-1)
    right = torch.searchsorted(knots, flat.contiguous()).clamp_(1, knots.numel() - 1)
    left = right - 1
    x0, x1, y0, y1 = knots[left], knots[right], values[left], values[right]
    t = ((flat - x0) / (x1 - x0).clamp_min(1e-12)).clamp_(0, 1)
    return (y0 + t * (y1 - y0)).reshape(image.shape)
