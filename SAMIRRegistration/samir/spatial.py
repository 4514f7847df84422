"""Dense spatial transforms on voxel grids: the engine's one coordinate convention.

Conventions (stated here once; every other module relies on them):

* Volumes are tensors shaped ``(B, C, D, H, W)``. For an image read with SimpleITK the axes
  D, H, W are the array axes of ``sitk.GetArrayFromImage`` (z, y, x), i.e. ITK's index
  ``(i, j, k)`` reversed.
* A displacement field ``u`` is shaped ``(B, 3, D, H, W)``; channels 0, 1, 2 are displacements
  along D, H, W, in voxels of the grid the field is defined on.
* Fields "pull": ``warp(moving, u)(p) = moving(p + u(p))``. ``p -> p + u(p)`` maps a point of the
  fixed grid to where it is found in the moving image (ITK's transform direction).
* Grids are cell-centred. Resampling a grid of ``n`` voxels to ``m`` voxels keeps the extent, so
  voxel ``i`` of the ``m``-grid sits at ``(i + 0.5) * n / m - 0.5`` of the ``n``-grid
  (``align_corners=False`` throughout). Sampling at continuous voxel indices (resampling through a
  displacement, encoder features onto a level grid) converts them with :func:`grid_coordinates`.
* ``jacobian_determinant`` works in voxel units; the determinant of ``I + grad u`` does not depend
  on the spacing, so it equals the physical Jacobian determinant.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

Shape3 = Sequence[int]


@functools.lru_cache(maxsize=512)
def _cached_constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # made under inference mode it could not join a later backward pass
        return torch.tensor(values, device=device, dtype=dtype)


def device_constant(values: Sequence[float], device, dtype=torch.float32) -> torch.Tensor:
    """A small constant tensor on ``device``, made once: no host-to-device copy inside a recorded step."""
    return _cached_constant(tuple(float(v) for v in values), torch.device(device), dtype)


def grid_coordinates(index: torch.Tensor, size: int) -> torch.Tensor:
    """``grid_sample`` coordinates (``align_corners=False``) of continuous voxel indices along an axis of
    ``size`` voxels. A Python-number divisor: no host-to-device copy, so it may run in a recorded step."""
    return (2.0 * index + 1.0) / size - 1.0


def sample_at_points(volume: torch.Tensor, points: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """``volume`` ``(1, C, D, H, W)`` at continuous voxel indices ``points`` ``(P, 3)`` (D, H, W order), trilinear
    -> ``(P, C)``."""
    shape = volume.shape[2:]
    grid = torch.stack([grid_coordinates(points[:, i], int(shape[i])) for i in (2, 1, 0)], -1).view(1, -1, 1, 1, 3)
    out = F.grid_sample(volume, grid.to(volume.dtype), mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return out.view(volume.shape[1], -1).T


def normalized_identity_grid(shape: Shape3, device=None, dtype=torch.float32) -> torch.Tensor:
    """Identity sampling grid ``(1, D, H, W, 3)`` for ``grid_sample``; last axis ordered (W, H, D)."""
    d, h, w = torch.meshgrid(*(grid_coordinates(torch.arange(n, device=device, dtype=dtype), n) for n in shape),
                             indexing="ij")
    return torch.stack([w, h, d], dim=-1).unsqueeze(0)


def _sampling_grid(u: torch.Tensor) -> torch.Tensor:
    shape = u.shape[2:]
    scale = device_constant([2.0 / n for n in shape], u.device, u.dtype).view(1, 3, 1, 1, 1)
    offset = (u * scale).permute(0, 2, 3, 4, 1).flip(-1)  # (B, D, H, W, 3) ordered (W, H, D)
    return normalized_identity_grid(shape, u.device, u.dtype) + offset


def warp(moving: torch.Tensor, u: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "border") -> torch.Tensor:
    """Resample ``moving`` (B, C, D, H, W) at ``p + u(p)``; ``u`` lives on the same grid.

    ``mode`` is ``"bilinear"`` (trilinear in 3D) or ``"nearest"``.
    """
    if moving.shape[2:] != u.shape[2:]:
        raise ValueError(f"warp: image grid {tuple(moving.shape[2:])} differs from field grid {tuple(u.shape[2:])}")
    grid = _sampling_grid(u.to(moving.dtype) if moving.is_floating_point() else u)
    source = moving if moving.is_floating_point() else moving.to(u.dtype)
    out = F.grid_sample(source, grid, mode=mode, padding_mode=padding_mode, align_corners=False)
    return out if moving.is_floating_point() else out.round().to(moving.dtype)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Displacement of ``p -> outer(inner(p))``: ``inner(p) + outer(p + inner(p))``.

    With pull fields, ``warp(warp(m, outer), inner) == warp(m, compose(outer, inner))``.
    """
    return inner + warp(outer, inner)


def integrate(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: displacement of the time-1 flow of the stationary ``velocity``."""
    u = velocity / (2 ** steps)
    for _ in range(steps):
        u = compose(u, u)
    return u


def resize_field(u: torch.Tensor, shape: Shape3) -> torch.Tensor:
    """Resample a displacement field to grid ``shape`` and rescale it to that grid's voxel units."""
    shape = tuple(int(n) for n in shape)
    if tuple(u.shape[2:]) == shape:
        return u
    out = F.interpolate(u, size=shape, mode="trilinear", align_corners=False)
    factors = device_constant([new / old for new, old in zip(shape, u.shape[2:])], u.device, u.dtype)
    return out * factors.view(1, 3, 1, 1, 1)


def resize_volume(x: torch.Tensor, shape: Shape3) -> torch.Tensor:
    """Resample an image/feature volume to ``shape``: area averaging when shrinking, else trilinear."""
    shape = tuple(int(n) for n in shape)
    if tuple(x.shape[2:]) == shape:
        return x
    if all(new <= old for new, old in zip(shape, x.shape[2:])):
        return F.adaptive_avg_pool3d(x, shape)
    return F.interpolate(x, size=shape, mode="trilinear", align_corners=False)


def pyramid_shapes(shape: Sequence[int], levels: int, slicing_axis: Optional[int] = None,
                   spacing_zyx: Optional[Sequence[float]] = None, min_size: int = 8,
                   through_plane_min: int = 16, anisotropy: float = 1.25) -> List[Tuple[int, int, int]]:
    """Grid shapes of levels 1 (full) .. ``levels`` (coarsest).

    An axis is halved while it keeps at least ``min_size`` voxels and (when ``spacing_zyx`` is
    given) its voxels are not already coarser than 1.5x the finest axis, so anisotropic grids become
    more isotropic going down. The slicing axis of an anisotropic volume is only halved while it
    keeps ``through_plane_min`` voxels (a 16-slice cine volume keeps its depth).
    """
    spacing = [1.0, 1.0, 1.0] if spacing_zyx is None else [float(s) for s in spacing_zyx]
    anisotropic = max(spacing) > anisotropy * min(spacing)
    shapes = [tuple(int(n) for n in shape)]
    for _ in range(levels - 1):
        prev = shapes[-1]
        limits = [through_plane_min if (axis == slicing_axis and (anisotropic or spacing_zyx is None)) else min_size
                  for axis in range(3)]
        can_halve = [math.ceil(n / 2) >= limit for n, limit in zip(prev, limits)]
        finest = min([s for s, ok in zip(spacing, can_halve) if ok], default=min(spacing))
        nxt = []
        for axis, n in enumerate(prev):
            half = math.ceil(n / 2)
            if can_halve[axis] and spacing[axis] <= 1.5 * finest:
                nxt.append(half)
                spacing[axis] *= n / half
            else:
                nxt.append(n)
        shapes.append(tuple(nxt))
    return shapes


def spatial_gradient(u: torch.Tensor) -> torch.Tensor:
    """Central-difference gradient (one-sided at the border): ``(B, C, 3, D, H, W)``, d/dD, d/dH, d/dW."""
    grads = torch.gradient(u, dim=(2, 3, 4))
    return torch.stack(grads, dim=2)


def jacobian_determinant(u: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of ``p -> p + u(p)``, shaped ``(B, D, H, W)``."""
    grad = spatial_gradient(u)  # (B, 3 components, 3 derivatives, D, H, W)
    eye = torch.eye(3, device=u.device, dtype=u.dtype).view(1, 3, 3, 1, 1, 1)
    jac = (grad + eye).permute(0, 3, 4, 5, 1, 2)
    return torch.linalg.det(jac)


def sdlogj(jacdet: torch.Tensor, crop: int = 2) -> float:
    """Std of log(clip(J + 3)) on the ``crop``-voxel-cropped Jacobian (the Learn2Reg definition)."""
    if crop > 0 and min(jacdet.shape[-3:]) > 2 * crop:
        jacdet = jacdet[..., crop:-crop, crop:-crop, crop:-crop]
    return float(torch.log((jacdet + 3.0).clamp(1e-9, 1e9)).std())


def folding_fraction(jacdet: torch.Tensor) -> float:
    """Fraction of voxels where the transform folds (J <= 0)."""
    return float((jacdet <= 0).float().mean())


def gaussian_kernel(sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1D Gaussian of ``sigma`` voxels, truncated at two sigmas (at least 3 taps)."""
    radius = max(1, int(round(2 * sigma)))
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_smooth(x: torch.Tensor, sigma: Union[float, Sequence[float]]) -> torch.Tensor:
    """Separable Gaussian of ``sigma`` voxels (one value, or one per axis z, y, x), replicate padding.

    Each axis is one convolution, except on a CPU where no gradient is needed: there a sum of shifted
    copies is much faster (the same numbers; its backward pass, a copy per tap, is slower than the
    convolution's on large volumes)."""
    shifted_sum = not x.is_cuda and not (torch.is_grad_enabled() and x.requires_grad)
    sigmas = [float(sigma)] * 3 if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    channels = x.shape[1]
    for dim, sigma_d in enumerate(sigmas):
        if sigma_d <= 0.05:
            continue
        kernel = gaussian_kernel(sigma_d, x.device, x.dtype)
        radius = kernel.numel() // 2
        if x.shape[2 + dim] <= 2 * radius:
            continue
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = radius
        padded = F.pad(x, pad, mode="replicate")
        if not shifted_sum:
            shape = [1, 1, 1]
            shape[dim] = kernel.numel()
            x = F.conv3d(padded, kernel.view(1, 1, *shape).expand(channels, 1, *shape), groups=channels)
        else:
            n = x.shape[2 + dim]
            weights = kernel.tolist()
            out = padded.narrow(2 + dim, 0, n) * weights[0]
            for j in range(1, len(weights)):
                out = out.add_(padded.narrow(2 + dim, j, n), alpha=weights[j])
            x = out
    return x
