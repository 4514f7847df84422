"""Registration losses: local NCC, squared intensity difference, hierarchical feature consistency, soft Dice,
diffusion."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .spatial import device_constant


def _box_sum(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    for dim, size in enumerate(window):
        if size <= 1:
            continue
        shape = [1, 1, 1]
        shape[dim] = size
        kernel = torch.ones((x.shape[1], 1, *shape), device=x.device, dtype=x.dtype)
        padding = [0, 0, 0]
        padding[dim] = size // 2
        x = F.conv3d(x, kernel, padding=padding, groups=x.shape[1])
    return x


def ncc_window(spacing_zyx: Sequence[float], window: int = 9) -> tuple:
    """An odd window per axis covering about ``window`` voxels of the finest axis (at least 3)."""
    finest = min(spacing_zyx)
    sizes = []
    for s in spacing_zyx:
        n = max(3, int(round(window * finest / s)))
        sizes.append(n if n % 2 else n + 1)
    return tuple(sizes)


class LocalNCC:
    """Local NCC against a fixed image whose local statistics are computed once.

    ``LocalNCC(fixed, window, mask)(warped)`` equals ``local_ncc_loss(fixed, warped, window, mask)``;
    in an optimisation loop only the three warped-image statistics go through the box filter and
    autograd each step.
    """

    def __init__(self, fixed: torch.Tensor, window: Sequence[int] = (9, 9, 9), eps: float = 1e-8):
        self.window = tuple(min(w, n if n % 2 else n - 1) for w, n in zip(window, fixed.shape[2:]))
        self.eps = eps
        self.fixed = fixed.detach()
        with torch.no_grad():
            ones = torch.ones((1, 1, *fixed.shape[2:]), device=fixed.device, dtype=fixed.dtype)
            self.count = _box_sum(ones, self.window)
            stats = _box_sum(torch.cat([self.fixed, self.fixed * self.fixed], 1), self.window) / self.count
            self.mean_fixed = stats[:, :1]
            self.var_fixed = (stats[:, 1:] - self.mean_fixed * self.mean_fixed).clamp_min(0)

    def __call__(self, warped: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``1 - mean squared local normalised cross-correlation`` (0 for a perfect match)."""
        stats = _box_sum(torch.cat([warped, warped * warped, self.fixed * warped], 1), self.window) / self.count
        mw, ww, fw = stats.chunk(3, dim=1)
        cross = fw - self.mean_fixed * mw
        var_w = (ww - mw * mw).clamp_min(0)
        cc = cross * cross / (self.var_fixed * var_w + self.eps)
        if mask is None:
            return 1.0 - cc.mean()
        return 1.0 - (cc * mask).sum() / mask.expand_as(cc).sum().clamp_min(1.0)


def local_ncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: Sequence[int] = (9, 9, 9),
                   mask: Optional[torch.Tensor] = None, eps: float = 1e-8) -> torch.Tensor:
    """``1 - mean squared local normalised cross-correlation`` (0 for a perfect match).

    Gradients flow into ``warped`` only (``fixed`` is the reference)."""
    return LocalNCC(fixed, window, eps)(warped, mask)


def intensity_difference_loss(fixed: torch.Tensor, warped: torch.Tensor, scale: float,
                              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared intensity difference divided by ``scale`` (e.g. the fixed image's variance)."""
    diff = (fixed - warped).pow(2)
    if mask is None:
        return diff.mean() / scale
    return (diff * mask).sum() / (mask.expand_as(diff).sum().clamp_min(1.0) * scale)


def feature_loss(fixed: torch.Tensor, warped: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared feature difference (channels averaged)."""
    diff = (fixed - warped).pow(2).mean(1, keepdim=True)
    if mask is None:
        return diff.mean()
    return (diff * mask).sum() / mask.sum().clamp_min(1.0)


def hierarchical_feature_consistency(fixed_levels: Sequence[torch.Tensor], warped_levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Paper eq. 3: sum over levels l = 1 (finest) .. L of ``feature_loss / 2**(l - 1)``."""
    total = 0.0
    for level, (f, w) in enumerate(zip(fixed_levels, warped_levels), start=1):
        total = total + feature_loss(f, w) / 2 ** (level - 1)
    return total


def soft_dice_loss(fixed_onehot: torch.Tensor, warped_onehot: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``1 - mean soft Dice`` over the foreground channels of one-hot label volumes ``(B, K, ...)``."""
    dims = tuple(range(2, fixed_onehot.ndim))
    inter = (fixed_onehot * warped_onehot).sum(dims)
    union = fixed_onehot.sum(dims) + warped_onehot.sum(dims)
    return 1.0 - ((2 * inter + eps) / (union + eps)).mean()


def diffusion_loss(u: torch.Tensor, spacing_zyx: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Mean squared forward-difference gradient of the displacement, in physical units (mm/mm).

    ``u`` is in voxels of its grid with voxel size ``spacing_zyx`` (isotropic 1 if omitted).
    """
    spacing_values = [1.0, 1.0, 1.0] if spacing_zyx is None else [float(s) for s in spacing_zyx]
    physical = u * device_constant(spacing_values, u.device, u.dtype).view(1, 3, 1, 1, 1)
    total = 0.0
    for dim in range(3):
        if u.shape[2 + dim] < 2:
            continue
        d = torch.diff(physical, dim=2 + dim) / spacing_values[dim]
        total = total + d.pow(2).mean()
    return total


# The 12 pairs of face neighbours at distance sqrt(2) from each other (MIND-SSC's self-similarity context).
_FACE_NEIGHBOURS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
_SSC_PAIRS = tuple((a, b) for i, a in enumerate(_FACE_NEIGHBOURS) for b in _FACE_NEIGHBOURS[i + 1:]
                   if sum(x * y for x, y in zip(a, b)) == 0)


def _shifted(x: torch.Tensor, offset: Sequence[int], pad: int) -> torch.Tensor:
    """``x`` sampled at ``voxel + offset`` (replicate padding at the border), same shape as ``x``."""
    padded = F.pad(x, (pad,) * 6, mode="replicate")
    d, h, w = x.shape[2:]
    oz, oy, ox = (pad + o for o in offset)
    return padded[:, :, oz:oz + d, oy:oy + h, ox:ox + w]


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2, eps: float = 1e-6) -> torch.Tensor:
    """MIND-SSC descriptor (Heinrich et al., 2013): ``(B, 1, D, H, W)`` -> ``(B, 12, D, H, W)``.

    Each channel is a patch distance between two face neighbours (``dilation`` voxels away, patch
    ``2 * radius + 1`` wide), normalised by the local mean distance and mapped through ``exp(-x)``:
    it describes local structure, not intensity, so it is the same for T1- and T2-like contrasts of
    the same anatomy (and insensitive to smooth intensity bias).
    """
    distances = []
    for a, b in _SSC_PAIRS:
        diff = _shifted(image, [dilation * v for v in a], dilation) - _shifted(image, [dilation * v for v in b], dilation)
        distances.append(diff * diff)
    ssd = torch.cat(distances, dim=1)
    if radius > 0:
        ssd = F.avg_pool3d(F.pad(ssd, (radius,) * 6, mode="replicate"), 2 * radius + 1, stride=1)
    ssd = ssd - ssd.amin(dim=1, keepdim=True)
    variance = ssd.mean(dim=1, keepdim=True)
    mean_variance = variance.mean()
    variance = variance.clamp(min=float(mean_variance) * 1e-3 + eps, max=float(mean_variance) * 1e3 + eps)
    return torch.exp(-ssd / variance)


def mind_loss(fixed_descriptor: torch.Tensor, warped_descriptor: torch.Tensor,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared difference of MIND descriptors (0 for identical local structure)."""
    return feature_loss(fixed_descriptor, warped_descriptor, mask)
