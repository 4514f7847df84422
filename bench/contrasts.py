"""Named contrast changes of a T1-weighted image, shared by the contrast suite and the feature benchmark.

A map takes the T1 intensity ``t`` (scaled so that the brain's 99th percentile is 1) to a new
intensity through smooth control points; then a smooth multiplicative bias field and Gaussian noise
are applied. The maps are not fitted to any scan: they follow the textbook ordering of the three
brain tissues (CSF < GM < WM on T1), which is what a second sequence changes.

- ``t2like``: monotone decreasing (CSF bright, WM dark).
- ``pdlike``: non-monotone: GM brightest, WM a little darker, CSF darker still (but far brighter than on T1).
- ``flairlike``: non-monotone: CSF dark as on T1, but WM darker than GM as on T2.
- ``inverted``: ``1 - t``.
- ``gamma``: ``t ** 2`` (monotone, same ordering), for reference.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.interpolate import PchipInterpolator

# (T1 intensity, new intensity) control points; a shape-preserving cubic goes through them
CONTRAST_MAPS: Dict[str, Sequence[Tuple[float, float]]] = {
    "t2like": ((0.0, 0.0), (0.05, 0.9), (0.3, 0.95), (0.5, 0.7), (0.75, 0.35), (1.0, 0.25), (1.3, 0.2)),
    "pdlike": ((0.0, 0.0), (0.05, 0.55), (0.3, 0.65), (0.5, 0.95), (0.7, 0.85), (1.0, 0.7), (1.3, 0.65)),
    "flairlike": ((0.0, 0.0), (0.1, 0.1), (0.3, 0.2), (0.5, 0.85), (0.75, 0.6), (1.0, 0.5), (1.3, 0.45)),
    "inverted": ((0.0, 0.0), (0.02, 1.0), (1.0, 0.05), (1.3, 0.0)),
    "gamma": ((0.0, 0.0), (0.25, 0.0625), (0.5, 0.25), (0.75, 0.5625), (1.0, 1.0), (1.3, 1.69)),
}
CONTRAST_NAMES = tuple(CONTRAST_MAPS)


def normalised_t1(image: np.ndarray, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """The image divided by the 99th percentile of its foreground (``mask``, else ``image > 0``)."""
    inside = mask if mask is not None else image > 0
    scale = float(np.percentile(image[inside], 99)) if inside.any() else 1.0
    return (image / max(scale, 1e-6)).astype(np.float32)


def map_intensities(t: np.ndarray, name: str) -> np.ndarray:
    points = np.asarray(CONTRAST_MAPS[name], dtype=float)
    curve = PchipInterpolator(points[:, 0], points[:, 1], extrapolate=False)
    out = curve(np.clip(t, 0.0, points[-1, 0]))
    return np.nan_to_num(out).astype(np.float32)


def bias_field(shape: Sequence[int], strength: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative field exp(b), b of standard deviation ``strength`` varying over the image size."""
    coarse = rng.standard_normal((4, 4, 4))
    field = ndimage.zoom(coarse, [n / 4 for n in shape], order=3)[tuple(slice(0, n) for n in shape)]
    field = field / max(field.std(), 1e-6) * strength
    return np.exp(field).astype(np.float32)


def recontrast(image: np.ndarray, name: str, mask: Optional[np.ndarray] = None, bias: float = 0.15,
               noise: float = 0.03, seed: int = 0) -> np.ndarray:
    """``image`` under the named contrast map, a bias field and noise; intensities in [0, 1], background kept at 0."""
    rng = np.random.default_rng(seed)
    t = normalised_t1(image, mask)
    foreground = mask if mask is not None else image > 0
    out = map_intensities(t, name)
    if bias > 0:
        out = out * bias_field(image.shape, bias, rng)
    if noise > 0:
        out = out + noise * rng.standard_normal(image.shape).astype(np.float32)
    out = np.where(foreground, out, 0.0)
    return np.clip(out / max(float(out.max()), 1e-6), 0.0, 1.0).astype(np.float32)


def recontrast_by_tissue(image: np.ndarray, labels: np.ndarray, tissue_means: Dict[int, float],
                         bias: float = 0.15, noise: float = 0.03, seed: int = 0) -> np.ndarray:
    """Each tissue label moved to a new mean intensity, keeping its own texture (deviations from its mean).

    Voxels of labels not named in ``tissue_means`` keep their intensities; the background (0) stays 0.
    """
    rng = np.random.default_rng(seed)
    out = image.astype(np.float32).copy()
    for label, mean in tissue_means.items():
        inside = labels == label
        if inside.any():
            out[inside] = mean + (image[inside] - image[inside].mean())
    if bias > 0:
        out = out * bias_field(image.shape, bias, rng)
    if noise > 0:
        out = out + noise * rng.standard_normal(image.shape).astype(np.float32)
    out = np.where(image > 0, out, 0.0)
    return np.clip(out / max(float(out.max()), 1e-6), 0.0, 1.0).astype(np.float32)
