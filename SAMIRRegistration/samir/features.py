"""Structure-aware feature embedding (SAFE, paper Algorithm 1).

Each slice along the slicing axis is padded to a centred square of side ``s``, resized to the
encoder's input size ``k`` and encoded; the features ``(N, C, f, f)`` stay at encoder resolution
(reduced to a few channels by a PCA shared by fixed and moving) and are sampled onto whichever
grid a pyramid level needs by :func:`sample_features`, so 256 channels are never held at full
resolution.

Alignment: feature pixel ``q`` of a slice covers the padded square's pixels
``[q * s / f, (q + 1) * s / f)``, so its centre is at padded coordinate ``(q + 0.5) * s / f - 0.5``
and at volume voxel ``(q + 0.5) * s / f - 0.5 - pad_before``.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .encoders import SliceEncoder
from .spatial import grid_coordinates

ProgressFn = Optional[Callable[[float], None]]


@dataclass
class SliceFeatures:
    features: torch.Tensor  # (N, C, f, f): N slices spread evenly from the first to the last along ``axis``
    axis: int  # slicing axis of the (D, H, W) volume
    volume_shape: Tuple[int, int, int]
    pad_before: Tuple[int, int]  # padding before the two in-plane axes (in increasing axis order)
    padded_size: int  # side s of the padded square, in voxels

    @property
    def in_plane_axes(self) -> Tuple[int, int]:
        return tuple(a for a in range(3) if a != self.axis)

    def feature_spacing_mm(self, spacing_zyx: Sequence[float]) -> float:
        """In-plane distance between neighbouring feature pixels, in mm (the finer in-plane axis)."""
        voxels = self.padded_size / self.features.shape[-1]
        return voxels * min(spacing_zyx[a] for a in self.in_plane_axes)


def choose_slicing_axis(shape: Sequence[int], spacing_zyx: Sequence[float], anisotropy: float = 1.25) -> int:
    """Largest-spacing axis for anisotropic volumes; otherwise the axis with the fewest slices."""
    spacing = np.asarray(spacing_zyx, dtype=float)
    if spacing.max() > anisotropy * spacing.min():
        return int(np.argmax(spacing))
    return int(np.argmin(shape))


def square_padding(height: int, width: int) -> Tuple[int, Tuple[int, int]]:
    side = max(height, width)
    return side, ((side - height) // 2, (side - width) // 2)


def cpu_has_fast_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _autocast(device: torch.device):
    """bf16 autocast where the hardware runs it natively (CUDA with bf16, x86 with AVX512-BF16/AMX)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def auto_slice_stride(shape: Sequence[int], spacing_zyx: Sequence[float], axis: int, feature_size: int) -> int:
    """Encode every n-th slice so that slice spacing roughly matches the in-plane feature spacing.

    Features of a ``f x f`` map over a padded square of side ``s`` voxels are ``s / f`` voxels apart
    in-plane; encoding slices much closer than that adds cost and no information.
    """
    in_plane = [a for a in range(3) if a != axis]
    side_mm = max(shape[a] * spacing_zyx[a] for a in in_plane)
    feature_spacing_mm = side_mm / feature_size
    return max(1, int(round(feature_spacing_mm / spacing_zyx[axis])))


def _resample_slices(slices: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` slices evenly spaced over [0, N - 1] (linear interpolation between slices)."""
    n = slices.shape[0]
    if count >= n:
        return slices
    positions = torch.linspace(0, n - 1, count)
    lower = positions.floor().long().clamp(max=n - 1)
    upper = (lower + 1).clamp(max=n - 1)
    weight = (positions - lower.float()).view(-1, 1, 1)
    return slices[lower] * (1 - weight) + slices[upper] * weight


def default_encoder_batch_size(device: torch.device) -> int:
    """Slices per encoder call: 32 on CUDA; 1 on the CPU, where larger batches are no faster."""
    return 32 if device.type == "cuda" else 1


def encode_volume(volume01: np.ndarray, encoder: SliceEncoder, axis: int, device: torch.device,
                  batch_size: Optional[int] = None, progress: ProgressFn = None,
                  slice_stride: int = 1) -> SliceFeatures:
    """Encode the slices of a [0, 1] volume ``(D, H, W)`` along ``axis``; features kept in fp16 on CPU.

    With ``slice_stride > 1`` about one slice in ``slice_stride`` is encoded, at positions spread
    evenly over the whole axis (first and last slice included); :func:`sample_features`
    interpolates between them.
    """
    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume01, axis, 0))).float()
    n_volume = slices.shape[0]
    if slice_stride > 1:
        slices = _resample_slices(slices, (n_volume - 1 + slice_stride - 1) // slice_stride + 1)
    n, h, w = slices.shape
    side, (pad_h, pad_w) = square_padding(h, w)
    k, f = encoder.input_size, encoder.feature_size
    if batch_size is None:
        batch_size = default_encoder_batch_size(device)
    out = torch.empty((n, encoder.out_channels, f, f), dtype=torch.float16)
    empty = slices.flatten(1).amax(1) <= 0
    todo = torch.nonzero(~empty).flatten().tolist()
    if bool(empty.any()):
        todo = [int(torch.nonzero(empty)[0])] + todo  # one blank slice stands for all of them
    encoder = encoder.to(device=device, memory_format=torch.channels_last)
    with torch.inference_mode(), _autocast(device):
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            batch = slices[idx].to(device).unsqueeze(1)
            batch = F.pad(batch, (pad_w, side - w - pad_w, pad_h, side - h - pad_h))
            if side != k:
                batch = F.interpolate(batch, size=(k, k), mode="bilinear", align_corners=False, antialias=side > k)
            batch = batch.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
            out[idx] = encoder(batch).to(torch.float16).cpu()  # half the transfer, no conversion on the host
            if progress:
                progress(min(1.0, (start + len(idx)) / len(todo)))
    if bool(empty.any()):
        out[empty] = out[int(torch.nonzero(empty)[0])].clone()
    volume_shape = tuple(volume01.shape)
    return SliceFeatures(out, axis, volume_shape, (pad_h, pad_w), side)


def remove_frame_component(feature_sets: Sequence[SliceFeatures]) -> List[SliceFeatures]:
    """Subtract, at each in-plane feature pixel, the mean feature over all slices of all sets.

    ViT encoders add an absolute position embedding, and padding borders sit at fixed places of
    the frame, so part of every feature says *where in the slice* a pixel is rather than what is
    there; matching that part pulls the registration towards the identity. Its average over many
    slices is an estimate of it.
    """
    total = sum(fs.features.float().sum(0) for fs in feature_sets)
    mean = total / sum(fs.features.shape[0] for fs in feature_sets)
    return [replace(fs, features=(fs.features.float() - mean).to(fs.features.dtype)) for fs in feature_sets]


@dataclass
class ChannelReduction:
    mean: torch.Tensor  # (C,)
    basis: torch.Tensor  # (C, n), scaled so the projected channels have unit mean variance


def fit_channel_reduction(feature_sets: Sequence[SliceFeatures], n_components: int = 16,
                          max_samples: int = 200_000, seed: int = 0) -> ChannelReduction:
    """PCA shared by all feature sets (fixed and moving), fitted on a random subset of feature vectors."""
    vectors = torch.cat([fs.features.permute(0, 2, 3, 1).reshape(-1, fs.features.shape[1]) for fs in feature_sets])
    generator = torch.Generator().manual_seed(seed)
    if vectors.shape[0] > max_samples:
        vectors = vectors[torch.randperm(vectors.shape[0], generator=generator)[:max_samples]]
    vectors = vectors.double()
    mean = vectors.mean(0)
    cov = torch.cov((vectors - mean).T)
    eigval, eigvec = torch.linalg.eigh(cov)
    order = torch.argsort(eigval, descending=True)[:n_components]
    eigval, eigvec = eigval[order].clamp_min(0), eigvec[:, order]
    scale = torch.sqrt(eigval.mean().clamp_min(1e-12))
    return ChannelReduction(mean.float(), (eigvec / scale).float())


def reduce_channels(features: SliceFeatures, reduction: ChannelReduction, chunk: int = 32) -> SliceFeatures:
    parts = []
    for start in range(0, features.features.shape[0], chunk):
        block = features.features[start:start + chunk].float()
        block = torch.einsum("nchw,ck->nkhw", block - reduction.mean.view(1, -1, 1, 1), reduction.basis)
        parts.append(block)
    return replace(features, features=torch.cat(parts))


def _level_coordinates(full: int, level: int) -> torch.Tensor:
    """Full-grid voxel coordinate of each voxel centre of a level grid with ``level`` voxels."""
    return (torch.arange(level, dtype=torch.float32) + 0.5) * full / level - 0.5


def _stack_grid(features: SliceFeatures, coords: Sequence[torch.Tensor]) -> torch.Tensor:
    """``grid_sample`` coordinates, last axis ordered (f2, f1, slice), of volume voxel coordinates given per
    volume axis (three tensors of one shape) in the feature stack ``(C, N, f, f)``."""
    n, f = features.features.shape[0], features.features.shape[-1]
    stack_coords = []
    for ax in range(3):
        x = coords[ax]
        if ax == features.axis:  # the n encoded slices span the first to the last voxel
            last = features.volume_shape[ax] - 1
            slice_index = x * (n - 1) / last if last > 0 and n > 1 else torch.zeros_like(x)
            stack_coords.append(grid_coordinates(slice_index, n))
        else:
            pad = features.pad_before[features.in_plane_axes.index(ax)]
            stack_coords.append(grid_coordinates((x + pad + 0.5) * f / features.padded_size - 0.5, f))
    src_order = (features.axis,) + features.in_plane_axes  # stack dims: (slice axis, in-plane 1, in-plane 2)
    return torch.stack([stack_coords[src_order[2]], stack_coords[src_order[1]], stack_coords[src_order[0]]], dim=-1)


def _stack(features: SliceFeatures, device) -> torch.Tensor:
    return features.features.to(device=device, dtype=torch.float32).permute(1, 0, 2, 3).unsqueeze(0)  # (1, C, N, f, f)


def sample_features(features: SliceFeatures, level_shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Features on a (cell-centred) level grid covering the volume: ``(1, C, D_l, H_l, W_l)``."""
    axes = [_level_coordinates(features.volume_shape[ax], int(level_shape[ax])) for ax in range(3)]
    grid = _stack_grid(features, torch.meshgrid(*axes, indexing="ij")).unsqueeze(0)
    return F.grid_sample(_stack(features, device), grid.to(device), mode="bilinear", padding_mode="border",
                         align_corners=False)


def sample_features_at(features: SliceFeatures, points: torch.Tensor) -> torch.Tensor:
    """Features ``(P, C)`` at continuous volume voxel coordinates ``points`` ``(P, 3)`` (D, H, W order);
    differentiable with respect to the features (training a head through known correspondences)."""
    grid = _stack_grid(features, points.unbind(-1)).view(1, -1, 1, 1, 3)
    stack = features.features
    source = stack.permute(1, 0, 2, 3).unsqueeze(0) if stack.dtype == torch.float32 else _stack(features, stack.device)
    sampled = F.grid_sample(source, grid.to(source.device, source.dtype), mode="bilinear", padding_mode="border",
                            align_corners=False)
    return sampled.view(sampled.shape[1], -1).T
