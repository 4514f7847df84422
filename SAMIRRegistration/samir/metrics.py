"""Overlap metrics on label maps that share a grid."""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import numpy as np


def dice_per_label(fixed: np.ndarray, warped: np.ndarray, labels: Optional[Iterable[int]] = None) -> Dict[int, float]:
    """Dice of each label; labels default to the non-zero values of either map.

    A label absent from both maps is left out (its Dice is undefined); absent from one map gives 0.
    """
    if fixed.shape != warped.shape:
        raise ValueError(f"label maps differ in shape: {fixed.shape} vs {warped.shape}")
    if labels is None:
        labels = sorted(set(np.unique(fixed).tolist()) | set(np.unique(warped).tolist()) - {0})
    out = {}
    for label in labels:
        a, b = fixed == label, warped == label
        total = int(a.sum()) + int(b.sum())
        if total:
            out[int(label)] = 2.0 * int(np.logical_and(a, b).sum()) / total
    return out


def mean_dice(scores: Dict[int, float]) -> float:
    return float(np.mean(list(scores.values()))) if scores else float("nan")
