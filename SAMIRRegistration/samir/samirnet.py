"""The 3D head and pyramidal deformation field prediction (PDFP), with no image size baked in.

Level 1 is the full-resolution grid; level ``l + 1`` halves every axis that stays large enough
(:func:`samir.spatial.pyramid_shapes`: a 16-slice cardiac volume keeps its depth). Fields are
predicted coarse to fine: at each level a 3-conv block reads (moving features warped by the
upsampled coarser field, fixed features), predicts a velocity, scaling and squaring integrates it
and the result is composed with the coarser field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .spatial import compose, integrate, pyramid_shapes, resize_field, resize_volume, warp


# Inference (no autograd) runs the full-resolution convolutions in slabs along z with about this many
# voxels each, and instance norm in place: the same outputs without the large temporaries of a
# whole-volume pass (bench/README, "Design notes").
INFERENCE_SLAB_VOXELS = 1_000_000


def apply_in_slabs(fn, inputs: Sequence[torch.Tensor], halo: int, out_channels: int,
                   slab_voxels: Optional[int] = None, accumulate_into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``fn(*inputs)`` for a local ``fn`` (each output voxel sees at most ``halo`` voxels along z, and
    zero padding at the volume's border, like stride-1 same-padded convolutions), computed slab by slab.

    ``inputs``: ``(B, C_i, D, H, W)`` tensors on one grid; returns ``(B, out_channels, D, H, W)``, or adds
    the result to ``accumulate_into`` (of that shape) and returns it.
    """
    batch, _, depth, height, width = inputs[0].shape
    slab_voxels = slab_voxels or INFERENCE_SLAB_VOXELS
    thickness = max(1, slab_voxels // max(1, height * width))
    if thickness >= depth and accumulate_into is None:
        return fn(*inputs)
    out = accumulate_into
    if out is None:
        out = inputs[0].new_empty((batch, out_channels, depth, height, width))
    for z0 in range(0, depth, thickness):
        z1 = min(depth, z0 + thickness)
        lo, hi = max(0, z0 - halo), min(depth, z1 + halo)
        part = fn(*(x[:, :, lo:hi] for x in inputs))[:, :, z0 - lo:z0 - lo + z1 - z0]
        if accumulate_into is None:
            out[:, :, z0:z1] = part
        else:
            out[:, :, z0:z1] += part
    return out


def instance_norm_leaky_relu_(x: torch.Tensor, norm: nn.InstanceNorm3d, slope: float,
                              channels: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``leaky_relu(norm(x))`` in place, one channel at a time (inference only); ``channels``: which of
    ``norm``'s channels ``x``'s channels are (default: all, in order)."""
    channels = range(x.shape[1]) if channels is None else channels
    for b in range(x.shape[0]):
        for i, c in enumerate(channels):
            channel = x[b, i]
            var, mean = torch.var_mean(channel, unbiased=False)
            scale = torch.rsqrt(var + norm.eps)
            if norm.affine:
                channel.sub_(mean).mul_(scale * norm.weight[c]).add_(norm.bias[c])
            else:
                channel.sub_(mean).mul_(scale)
    return F.leaky_relu_(x, slope)


def _conv_part(conv: nn.Conv3d, out_channels: Optional[slice] = None, in_channels: Optional[slice] = None,
               bias: bool = True):
    """``conv`` restricted to some output or input channels (a sum over input-channel groups, plus the
    bias once, is the whole convolution)."""
    weight = conv.weight
    weight = weight if out_channels is None else weight[out_channels]
    weight = weight if in_channels is None else weight[:, in_channels]
    b = None if not bias or conv.bias is None else (conv.bias if out_channels is None else conv.bias[out_channels])
    return lambda x: F.conv3d(x, weight, b, padding=conv.padding)


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
        if torch.is_grad_enabled():
            return self.blocks(torch.cat([features, image], dim=1))
        return self.infer(torch.cat([features, image], dim=1))  # a temporary, freed after the first conv

    def infer(self, x: torch.Tensor, group: int = 16) -> torch.Tensor:
        """``blocks(x)`` for ``x = cat(features, image)`` without autograd and without the graph's temporaries:
        convolutions in slabs, norms in place, and a block wider than both its input and the next block's
        output is never held whole: its output channels are produced ``group`` at a time (instance norm is
        per channel) and each group's share of the next convolution accumulated. Pass ``x`` as a temporary
        (not held by the caller) and it is freed after the first convolution."""
        blocks = list(self.blocks)
        i = 0
        while i < len(blocks):
            conv, norm, act = blocks[i]
            next_conv = blocks[i + 1][0] if i + 1 < len(blocks) else None
            if next_conv is not None and conv.out_channels > max(conv.in_channels, group, next_conv.out_channels):
                _, next_norm, next_act = blocks[i + 1]
                out = None
                for start in range(0, conv.out_channels, group):
                    channels = slice(start, min(conv.out_channels, start + group))
                    part = apply_in_slabs(_conv_part(conv, out_channels=channels), [x], 1, channels.stop - start)
                    part = instance_norm_leaky_relu_(part, norm, act.negative_slope, range(start, channels.stop))
                    contribution = _conv_part(next_conv, in_channels=channels, bias=start == 0)
                    if out is None:
                        out = apply_in_slabs(contribution, [part], 1, next_conv.out_channels)
                    else:
                        apply_in_slabs(contribution, [part], 1, next_conv.out_channels, accumulate_into=out)
                    del part
                x = instance_norm_leaky_relu_(out, next_norm, next_act.negative_slope)
                i += 2
            else:
                x = apply_in_slabs(conv, [x], 1, conv.out_channels)
                x = instance_norm_leaky_relu_(x, norm, act.negative_slope)
                i += 1
        return x


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
        if torch.is_grad_enabled():
            return self._velocity(warped_moving, fixed)
        return apply_in_slabs(self._velocity, [warped_moving, fixed], 3, 3)

    def _velocity(self, warped_moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(torch.cat([warped_moving, fixed], dim=1)))


@dataclass
class PyramidOutput:
    fields: List[torch.Tensor]  # per level, coarse -> fine, in voxels of that level
    velocities: List[torch.Tensor]
    shapes: List[Tuple[int, int, int]]

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
