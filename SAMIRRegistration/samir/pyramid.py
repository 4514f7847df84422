"""The 3D head and pyramidal deformation field prediction (PDFP), with no image size baked in.

Level 1 is the full-resolution grid; level ``l + 1`` halves every axis that stays large enough
(the slicing axis only while it keeps at least ``through_plane_min`` voxels, so a 16-slice cardiac
volume keeps its depth). Fields are predicted coarse to fine: at each level a 3-conv block reads
(moving features warped by the upsampled coarser field, fixed features), predicts a velocity,
scaling and squaring integrates it and the result is composed with the coarser field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .spatial import compose, integrate, resize_field, resize_volume, warp

Shape3 = Tuple[int, int, int]


def pyramid_shapes(shape: Sequence[int], levels: int, slicing_axis: Optional[int] = None,
                   spacing_zyx: Optional[Sequence[float]] = None, min_size: int = 8,
                   through_plane_min: int = 16, anisotropy: float = 1.25) -> List[Shape3]:
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


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, padding=1),
                         nn.InstanceNorm3d(out_channels, affine=True), nn.LeakyReLU(0.2))


class FeatureHead(nn.Module):
    """Lightweight 3D head shared by fixed and moving: input features ⊕ image, 3 conv blocks."""

    def __init__(self, in_channels: int, widths: Sequence[int] = (32, 64, 32)):
        super().__init__()
        blocks, c = [], in_channels + 1
        for width in widths:
            blocks.append(conv_block(c, width))
            c = width
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = c

    def forward(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.blocks(torch.cat([features, image], dim=1))


class VelocityBlock(nn.Module):
    """Three 3x3x3 convs on (warped moving, fixed) -> 3-channel velocity; the last starts at zero."""

    def __init__(self, channels: int, hidden: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(2 * channels, hidden, 3, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv3d(hidden, hidden, 3, padding=1), nn.LeakyReLU(0.2))
        self.out = nn.Conv3d(hidden, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, warped_moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(torch.cat([warped_moving, fixed], dim=1)))


@dataclass
class PyramidOutput:
    fields: List[torch.Tensor]  # per level, coarse -> fine, in voxels of that level
    velocities: List[torch.Tensor]
    shapes: List[Shape3]

    @property
    def final(self) -> torch.Tensor:
        return self.fields[-1]


class PDFP(nn.Module):
    def __init__(self, channels: int, levels: int = 5, hidden: int = 32, integration_steps: int = 7):
        super().__init__()
        self.levels = levels
        self.integration_steps = integration_steps
        self.blocks = nn.ModuleList(VelocityBlock(channels, hidden) for _ in range(levels))

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, slicing_axis: Optional[int] = None,
                spacing_zyx: Optional[Sequence[float]] = None) -> PyramidOutput:
        shapes = pyramid_shapes(fixed.shape[2:], self.levels, slicing_axis, spacing_zyx)
        fields, velocities, u = [], [], None
        for level in range(self.levels, 0, -1):
            shape = shapes[level - 1]
            f_l, m_l = resize_volume(fixed, shape), resize_volume(moving, shape)
            u_prev = torch.zeros((fixed.shape[0], 3, *shape), device=fixed.device, dtype=fixed.dtype) \
                if u is None else resize_field(u, shape)
            v = self.blocks[level - 1](warp(m_l, u_prev), f_l)
            u = compose(u_prev, integrate(v, self.integration_steps))
            fields.append(u)
            velocities.append(v)
        return PyramidOutput(fields, velocities, shapes[::-1])


class SAMIRNet(nn.Module):
    """Head + PDFP: the trainable part of SAMIR on top of frozen, channel-reduced encoder features."""

    def __init__(self, feature_channels: int, widths: Sequence[int] = (32, 64, 32), levels: int = 5,
                 hidden: int = 32, integration_steps: int = 7):
        super().__init__()
        self.head = FeatureHead(feature_channels, widths)
        self.pdfp = PDFP(self.head.out_channels, levels, hidden, integration_steps)

    def forward(self, fixed_features, fixed_image, moving_features, moving_image, slicing_axis=None,
                spacing_zyx=None) -> PyramidOutput:
        return self.pdfp(self.head(fixed_features, fixed_image), self.head(moving_features, moving_image),
                         slicing_axis, spacing_zyx)
