"""Apply a registration to the original moving image/labels, and convert to ITK transforms.

The displacement ``d`` lives on the fixed grid in LPS mm; fixed voxel ``p`` (world ``x``) takes its
value from the moving image at world ``x + d(x)``. Sampling goes straight from the original moving
array (one interpolation), whatever its grid.
"""
from __future__ import annotations

import itertools

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .geometry import Volume, from_sitk, index_to_world, to_sitk, world_to_index
from .io import SAMIROutputError, write_image

VOXELS_PER_CHUNK = 2_000_000


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


def _normalized(index: torch.Tensor, shape_zyx) -> torch.Tensor:
    sizes = torch.tensor([shape_zyx[2], shape_zyx[1], shape_zyx[0]], dtype=index.dtype, device=index.device)
    return 2.0 * index / (sizes - 1).clamp_min(1) - 1.0


def _inside(index: torch.Tensor, shape_zyx) -> torch.Tensor:
    sizes = torch.tensor([shape_zyx[2], shape_zyx[1], shape_zyx[0]], dtype=index.dtype, device=index.device)
    return ((index >= -0.5) & (index <= sizes - 0.5)).all(-1)


def warp_volume(moving: Volume, fixed: Volume, displacement_lps: np.ndarray, default: float = 0.0,
                device: str = "cpu") -> Volume:
    """Linearly resample the original ``moving`` onto ``fixed``'s grid through the displacement."""
    source = torch.from_numpy(np.ascontiguousarray(moving.array, dtype=np.float32))[None, None].to(device)
    out = np.empty(fixed.shape, dtype=np.float32)
    for zs, index in _moving_index_slabs(fixed, moving, displacement_lps, device):
        grid = _normalized(index, moving.shape)[None]
        values = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=True)[0, 0]
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
            prob = F.grid_sample(source, _normalized(index, labels.shape)[None], mode="bilinear",
                                 padding_mode="zeros", align_corners=True)[0, 0]
            prob = torch.where(_inside(index, labels.shape), prob, torch.zeros_like(prob))
            flat = int(torch.argmax(prob))
            if float(prob.flatten()[flat]) > label_peak[0]:
                local = np.unravel_index(flat, tuple(prob.shape))
                label_peak = (float(prob.flatten()[flat]), (zs.start + int(local[0]), int(local[1]), int(local[2])))
        if label_peak[1] is not None:
            best_rank[label_peak[1]] = rank
    return fixed.with_array(values[best_rank].astype(labels.array.dtype, copy=False), name=f"{labels.name} warped")


def displacement_image(displacement_lps: np.ndarray, fixed: Volume) -> sitk.Image:
    """Vector image (float64, LPS mm) on the fixed grid, as ITK displacement field transforms need."""
    image = sitk.GetImageFromArray(displacement_lps.astype(np.float64), isVector=True)
    image.SetSpacing(fixed.spacing)
    image.SetOrigin(fixed.origin)
    image.SetDirection(tuple(fixed.direction.ravel()))
    return image


def displacement_transform(displacement_lps: np.ndarray, fixed: Volume) -> sitk.DisplacementFieldTransform:
    return sitk.DisplacementFieldTransform(displacement_image(displacement_lps, fixed))


def write_transform(displacement_lps: np.ndarray, fixed: Volume, path) -> None:
    """Write an ITK displacement-field transform (``.h5`` or ``.tfm``) readable by SimpleITK, ANTs, Slicer."""
    try:
        sitk.WriteTransform(displacement_transform(displacement_lps, fixed), str(path))
    except RuntimeError as exc:
        message = [line for line in str(exc).strip().splitlines() if line.strip()]
        raise SAMIROutputError(f"could not write '{path}': {message[-1] if message else 'unknown error'}") from None


def write_displacement(displacement_lps: np.ndarray, fixed: Volume, path) -> None:
    """Write the displacement as a 3-component vector image (``.nii.gz``, LPS mm, ITK/ANTs convention)."""
    write_image(sitk.Cast(displacement_image(displacement_lps, fixed), sitk.sitkVectorFloat32), path)


def resample_with_sitk(moving: Volume, fixed: Volume, transform: sitk.Transform,
                       interpolator=sitk.sitkLinear, default: float = 0.0) -> Volume:
    reference = to_sitk(fixed.with_array(np.zeros(fixed.shape, np.float32)))
    return from_sitk(sitk.Resample(to_sitk(moving), reference, transform, interpolator, default), moving.name)
