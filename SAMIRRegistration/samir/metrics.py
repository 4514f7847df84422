"""Overlap metrics on label maps that share a grid."""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; NaN when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else float("nan")


def dice_per_label(fixed: np.ndarray, warped: np.ndarray, labels: Optional[Iterable[int]] = None) -> Dict[int, float]:
    """Dice of each label; labels default to the non-zero values of either map.

    A label absent from both maps is left out (its Dice is undefined); absent from one map gives 0.
    """
    if fixed.shape != warped.shape:
        raise ValueError(f"label maps differ in shape: {fixed.shape} vs {warped.shape}")
    if labels is None:
        labels = sorted(set(np.unique(fixed).tolist()) | set(np.unique(warped).tolist()) - {0})
    scores = {int(label): dice(fixed == label, warped == label) for label in labels}
    return {label: score for label, score in scores.items() if not np.isnan(score)}


def mean_dice(scores: Dict[int, float]) -> float:
    return float(np.mean(list(scores.values()))) if scores else float("nan")
