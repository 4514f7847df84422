"""Resampling of volumes in physical space: one function per need.

* :func:`resample_into` — a volume onto another grid through an affine map (None: the identity),
  with SimpleITK: the moving image into the fixed frame, masks, label maps onto a common grid.
* :func:`coverage_of` — which voxels of a grid lie inside another image's field of view.
* :func:`warp_volume` / :func:`warp_labels` — the original moving image / label map onto the fixed
  grid through a registration's displacement (LPS mm, on the fixed grid): fixed voxel ``p`` (world
  ``x``) takes its value from the moving image at world ``x + d(x)``, sampled straight from the
  original moving array (one interpolation), whatever its grid.
* :func:`warp_labels_on_grid` — the same label rule for a pair already on one grid and a field in
  voxels (training's validation and the evaluation report score Dice alike).

Sampling at continuous voxel indices follows :mod:`samir.spatial`'s convention (cell-centred,
``align_corners=False``).
"""
from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .geometry import Volume, displacement_zyx_voxels_to_lps, from_sitk, index_to_world, to_sitk, world_to_index
from .spatial import grid_coordinates

VOXELS_PER_CHUNK = 2_000_000  # fixed voxels resampled at a time through a displacement (bounds the memory)


def resample_into(moving: Volume, reference: Volume, labels: bool = False,
                  affine_lps: Optional[np.ndarray] = None, cubic: bool = False) -> Volume:
    """Resample ``moving`` onto ``reference``'s grid through ``affine_lps`` (4x4, reference world point ->
    moving world point; None: the identity) in physical space: nearest neighbour for ``labels``, else
    trilinear, or with ``cubic`` a cubic B-spline clipped to the input's range."""
    identity = affine_lps is None or np.allclose(affine_lps, np.eye(4))
    if identity and moving.same_grid(reference):
        return replace(moving, array=moving.array)
    transform = sitk.Transform()
    if not identity:
        matrix = np.asarray(affine_lps, dtype=np.float64)
        transform = sitk.AffineTransform(3)
        transform.SetMatrix(tuple(matrix[:3, :3].ravel()))
        transform.SetTranslation(tuple(matrix[:3, 3]))
    interp = sitk.sitkNearestNeighbor if labels else (sitk.sitkBSpline if cubic else sitk.sitkLinear)
    out = from_sitk(sitk.Resample(to_sitk(moving), to_sitk(reference.with_array(np.zeros(reference.shape, np.uint8))),
                                  transform, interp, 0.0), moving.name)
    if cubic and not labels:
        out.array = np.clip(out.array, min(float(moving.array.min()), 0.0), float(moving.array.max()))
    return out


def coverage_of(moving: Volume, reference: Volume, affine_lps: Optional[np.ndarray] = None) -> np.ndarray:
    """1 where a reference voxel (mapped through ``affine_lps``) lies inside the moving image's field of view."""
    ones = moving.with_array(np.ones(moving.shape, dtype=np.uint8))
    return resample_into(ones, reference, labels=True, affine_lps=affine_lps).array.astype(np.float32)



def _moving_index_slabs(fixed: Volume, moving: Volume, displacement_lps: np.ndarray, device):
    """Yield (z-slab slice, continuous moving ITK indices ``(n_z, H, W, 3)``) for the fixed grid."""
    d, h, w = fixed.shape[-3:]
    to_moving = world_to_index(moving) @ index_to_world(fixed)
    linear = torch.as_tensor(to_moving[:3, :3], dtype=torch.float32, device=device)
    offset = torch.as_tensor(to_moving[:3, 3], dtype=torch.float32, device=device)
    world_to_moving = torch.as_tensor(world_to_index(moving)[:3, :3], dtype=torch.float32, device=device)
    jj, ii = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    step = max(1, VOXELS_PER_CHUNK // (h * w))
    for z0 in range(0, d, step):
        z1 = min(d, z0 + step)
        kk = torch.arange(z0, z1, device=device, dtype=torch.float32).view(-1, 1, 1).expand(-1, h, w)
        ijk = torch.stack([ii.expand(z1 - z0, h, w), jj.expand(z1 - z0, h, w), kk], dim=-1)
        disp = torch.as_tensor(displacement_lps[z0:z1], dtype=torch.float32, device=device)
        yield slice(z0, z1), ijk @ linear.T + offset + disp @ world_to_moving.T


def _grid(index: torch.Tensor, shape_zyx) -> torch.Tensor:
    """``grid_sample``'s grid ``(1, ..., 3)`` for continuous ITK indices ``(..., 3)`` of a ``shape_zyx`` volume."""
    return torch.stack([grid_coordinates(index[..., a], n) for a, n in enumerate(shape_zyx[::-1])], dim=-1)[None]


def _inside(index: torch.Tensor, shape_zyx) -> torch.Tensor:
    sizes = torch.tensor([shape_zyx[2], shape_zyx[1], shape_zyx[0]], dtype=index.dtype, device=index.device)
    return ((index >= -0.5) & (index <= sizes - 0.5)).all(-1)


def warp_volume(moving: Volume, fixed: Volume, displacement_lps: np.ndarray, default: float = 0.0,
                device: str = "cpu") -> Volume:
    """Linearly resample the original ``moving`` onto ``fixed``'s grid through the displacement."""
    source = torch.from_numpy(np.ascontiguousarray(moving.array, dtype=np.float32))[None, None].to(device)
    out = np.empty(fixed.shape, dtype=np.float32)
    for zs, index in _moving_index_slabs(fixed, moving, displacement_lps, device):
        grid = _grid(index, moving.shape)
        values = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
        values = torch.where(_inside(index, moving.shape), values, torch.full_like(values, default))
        out[zs] = values.cpu().numpy()
    return fixed.with_array(out, name=f"{moving.name} warped")


def warp_labels(labels: Volume, fixed: Volume, displacement_lps: np.ndarray, device: str = "cpu") -> Volume:
    """Propagate a label map: per-label linear interpolation + argmax, no label allowed to vanish.

    A fixed voxel takes the label with the largest trilinear membership (the sum of the weights of
    the eight neighbouring moving voxels carrying it); ties go to the background, then to the
    smaller label. Voxels mapped outside the moving image are background. A label present in the
    input that wins no voxel (a structure thinner than the interpolation can keep) is given the
    voxel where its interpolated membership is highest.
    """
    values = np.array([0] + [int(v) for v in np.unique(labels.array) if v != 0], dtype=np.int64)
    source_rank = torch.from_numpy(np.searchsorted(values, labels.array).astype(np.int32).ravel()).to(device)
    best_rank = np.zeros(fixed.shape, dtype=np.int32)
    sizes = torch.tensor(labels.shape[::-1], device=device)
    strides = (labels.shape[1] * labels.shape[2], labels.shape[2], 1)
    for zs, index in _moving_index_slabs(fixed, labels, displacement_lps, device):  # one slab in memory at a time
        base = torch.floor(index)
        frac = index - base
        base = base.long()
        corner_rank, corner_weight = [], []
        for dx, dy, dz in itertools.product((0, 1), repeat=3):
            corner = base + torch.tensor([dx, dy, dz], device=device)
            valid = ((corner >= 0) & (corner < sizes)).all(-1)
            flat = (corner[..., 2] * strides[0] + corner[..., 1] * strides[1] + corner[..., 0]).clamp(0, source_rank.numel() - 1)
            weight = ((frac[..., 0] if dx else 1 - frac[..., 0]) * (frac[..., 1] if dy else 1 - frac[..., 1])
                      * (frac[..., 2] if dz else 1 - frac[..., 2]))
            corner_rank.append(torch.where(valid, source_rank[flat], 0))
            corner_weight.append(torch.where(valid, weight, torch.zeros_like(weight)))
        score = [w.clone() for w in corner_weight]
        for a, b in itertools.combinations(range(8), 2):
            same = corner_rank[a] == corner_rank[b]
            score[a] += torch.where(same, corner_weight[b], 0.0)
            score[b] += torch.where(same, corner_weight[a], 0.0)
        best_score = torch.zeros_like(score[0])
        best = torch.zeros_like(corner_rank[0])
        for s, r in zip(score, corner_rank):
            better = (s > best_score) | ((s == best_score) & (r < best))
            best_score = torch.where(better, s, best_score)
            best = torch.where(better, r, best)
        best = torch.where(_inside(index, labels.shape), best, 0)
        best_rank[zs] = best.cpu().numpy()
    missing = np.flatnonzero(np.bincount(best_rank.ravel(), minlength=len(values))[1:] == 0) + 1
    for rank in missing:
        source = torch.from_numpy(np.ascontiguousarray(labels.array == values[rank], dtype=np.float32))[None, None].to(device)
        label_peak = (0.0, None)
        for zs, index in _moving_index_slabs(fixed, labels, displacement_lps, device):
            prob = F.grid_sample(source, _grid(index, labels.shape), mode="bilinear",
                                 padding_mode="zeros", align_corners=False)[0, 0]
            prob = torch.where(_inside(index, labels.shape), prob, torch.zeros_like(prob))
            flat = int(torch.argmax(prob))
            if float(prob.flatten()[flat]) > label_peak[0]:
                local = np.unravel_index(flat, tuple(prob.shape))
                label_peak = (float(prob.flatten()[flat]), (zs.start + int(local[0]), int(local[1]), int(local[2])))
        if label_peak[1] is not None:
            best_rank[label_peak[1]] = rank
    return fixed.with_array(values[best_rank].astype(labels.array.dtype, copy=False), name=f"{labels.name} warped")


def warp_labels_on_grid(labels: np.ndarray, grid: Volume, u: torch.Tensor) -> np.ndarray:
    """A label map on ``grid`` through a field ``u`` ``(1, 3, D, H, W)`` in voxels of that grid, by
    :func:`warp_labels`'s rule (on ``u``'s device)."""
    displacement = displacement_zyx_voxels_to_lps(u[0].detach().cpu().numpy(), grid)
    return warp_labels(grid.with_array(labels), grid, displacement, device=u.device).array
