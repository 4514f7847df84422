"""Global discrete displacement search: a large-displacement starting field for the pyramid.

Gradient-based instance optimisation only finds displacements within its capture range. This module
searches every integer displacement within a radius instead, on a coarse grid, and regularises the
choice by coupled convex optimisation (in the manner of Heinrich et al.'s "coupled convex" step, as in
ConvexAdam):

1. :func:`cost_volume`: for each displacement ``d`` of the lattice, the mean squared difference of the
   fixed descriptors at ``p`` and the moving descriptors at ``p + d`` (pull, as :mod:`samir.spatial`).
2. :func:`coupled_convex`: alternately, per voxel, the displacement minimising
   ``cost(d) + w * ||d - u_bar||^2`` (a lookup in the cost volume), and ``u_bar`` = a Gaussian
   smoothing of that choice, with ``w`` rising over the iterations (the coupling's theta falling) so the
   choices first follow the data, then the smooth field. The last choice is refined below a voxel by a
   parabola through its neighbours along each axis, then smoothed.

:func:`discrete_search` composes both on any descriptors ``(1, C, D, H, W)`` (MIND-SSC, learned feature
maps, or both: :func:`combine_descriptors`), optionally on a grid coarser than theirs; :func:`global_search`
is the registration's entry: MIND-SSC of both images on a search grid sized from a radius in mm.
Fields are ``(1, 3, D, H, W)`` in voxels of their grid, channels along D, H, W (:mod:`samir.spatial`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .losses import mind_ssc
from .spatial import folding_fraction, gaussian_smooth, jacobian_determinant, resize_field, resize_volume

Ints3 = Union[int, Sequence[int]]
# coupling weights, in units of the cost volume's typical contrast per squared voxel: the first hardly more
# than a tie-break towards the smooth field (flat background), the last keeps the choice within about a
# voxel of it
DEFAULT_COUPLING = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
DEFAULT_SIGMA = 1.5  # Gaussian of u_bar, in search-grid voxels
SEARCH_RADIUS_VOXELS = 4  # the search grid's spacing is about the radius over this many voxels
MAX_COST_BYTES = 256 * 2 ** 20  # the cost volume's budget: the search grid coarsens until it fits


def _three(value: Ints3) -> Tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"expected one number or three (z, y, x), got {value!r}")
    return values


def displacement_lattice(radius: Ints3, step: int = 1, device=None) -> torch.Tensor:
    """The integer displacements ``(K, 3)`` (D, H, W) within ``radius`` voxels per axis, ``step`` apart,
    ordered as ``itertools.product`` over the axes (the last axis fastest)."""
    ranges = [torch.arange(-r, r + 1, device=device) * step for r in _three(radius)]
    return torch.stack(torch.meshgrid(*ranges, indexing="ij"), dim=-1).reshape(-1, 3).float()


def _lattice_shape(displacements: torch.Tensor) -> Tuple[int, int, int]:
    shape = tuple(int(torch.unique(displacements[:, axis]).numel()) for axis in range(3))
    if math.prod(shape) != displacements.shape[0]:
        raise ValueError("displacements must be a full lattice, as displacement_lattice makes")
    return shape


def _box_average(cost: torch.Tensor, patch: int, chunk: int = 64) -> torch.Tensor:
    """Each displacement's cost averaged over a ``(2 patch + 1)^3`` window, replicate padding (in place, a
    chunk of displacements at a time; separable sums of shifted copies: on a CPU much faster than a 3D pool)."""
    width = 2 * patch + 1
    for start in range(0, cost.shape[1], chunk):
        part = cost[:, start:start + chunk]
        out = part
        for dim in (2, 3, 4):
            n = out.shape[dim]
            pad = [0] * 6
            pad[2 * (4 - dim)] = pad[2 * (4 - dim) + 1] = patch
            padded = F.pad(out, pad, mode="replicate")
            out = padded.narrow(dim, 0, n).clone()
            for j in range(1, width):
                out.add_(padded.narrow(dim, j, n))
        part.copy_(out.div_(width ** 3))
    return cost


@torch.no_grad()
def cost_volume(fixed_desc: torch.Tensor, moving_desc: torch.Tensor, radius: Ints3, step: int = 1, patch: int = 1,
                progress: Optional[Callable[[float], None]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(cost (1, K, D, H, W), displacements (K, 3))``: for each displacement ``d`` of
    :func:`displacement_lattice`, the channel mean of ``(fixed(p) - moving(p + d))^2``, averaged over a
    ``(2 patch + 1)^3`` window.

    Both descriptors are ``(1, C, D, H, W)`` on the same grid. The displacements along W of one (dz, dy) are
    computed at a time, so beside the output one temporary of ``2 r_W + 1`` descriptor volumes is held.
    A displacement reaching past the moving grid's border reads the border's descriptors (as
    :func:`samir.spatial.warp` does). ``step`` > 1 spaces the displacements that many voxels apart (a wider
    range for the same number).
    """
    if fixed_desc.shape != moving_desc.shape or fixed_desc.shape[0] != 1:
        raise ValueError(f"cost_volume: descriptors of one pair on one grid, got {tuple(fixed_desc.shape)} and"
                         f" {tuple(moving_desc.shape)}")
    displacements = displacement_lattice(radius, step)
    radii = _three(radius)
    pads = [r * step for r in radii]
    d, h, w = fixed_desc.shape[2:]
    padded = F.pad(moving_desc, (pads[2], pads[2], pads[1], pads[1], pads[0], pads[0]), mode="replicate")[0]
    # stored displacement-last (a (1, K, D, H, W) view of it): the per-voxel minimum over displacements,
    # done many times, then reads contiguous memory
    cost = torch.empty((d, h, w, displacements.shape[0]), device=fixed_desc.device,
                       dtype=fixed_desc.dtype).permute(3, 0, 1, 2).unsqueeze(0)
    fixed = fixed_desc[0].unsqueeze(3)  # (C, D, H, 1, W)
    row = 2 * radii[2] + 1  # the displacements along W of one (dz, dy), consecutive in the lattice
    for i, k in enumerate(range(0, displacements.shape[0], row)):
        dz, dy = (int(v) for v in displacements[k, :2])
        slab = padded[:, pads[0] + dz:pads[0] + dz + d, pads[1] + dy:pads[1] + dy + h]
        # every shift along W at once (a view; one operation per row, not per displacement)
        shifted = slab.unfold(3, w, 1)[:, :, :, ::step]  # (C, D, H, row, W)
        cost[0, k:k + row] = (fixed - shifted).pow_(2).mean(dim=0).permute(2, 0, 1, 3)
        if progress and i % 8 == 0:
            progress(0.8 * k / displacements.shape[0])
    if patch > 0:
        _box_average(cost, patch)
    return cost, displacements.to(fixed_desc.device)


def _parabola_offset(minus: torch.Tensor, centre: torch.Tensor, plus: torch.Tensor) -> torch.Tensor:
    """Vertex of the parabola through energies at -1, 0, +1 (0 where it is not convex), within half a step."""
    curvature = minus - 2 * centre + plus
    offset = 0.5 * (minus - plus) / curvature.clamp_min(1e-12)
    return torch.where(curvature > 1e-12, offset, torch.zeros_like(offset)).clamp(-0.5, 0.5)


def coupled_minimum(cost: torch.Tensor, displacements: torch.Tensor, u_bar: torch.Tensor, weight: float,
                    subvoxel: bool = False, chunk: int = 4096) -> torch.Tensor:
    """Per voxel, the displacement minimising ``cost(d) + weight * ||d - u_bar||^2``: ``(1, 3, D, H, W)``.

    With ``subvoxel``, moved to the vertex of the parabola through the energy at the two lattice
    neighbours of the minimum along each axis (inside the lattice). Chunked over voxels: the energy of
    ``chunk`` voxels at a time is held."""
    k, spatial = cost.shape[1], cost.shape[2:]
    flat_cost = cost[0].permute(1, 2, 3, 0).reshape(-1, k)  # a view of cost_volume's output, else a copy
    flat_u = u_bar.reshape(3, -1)
    lattice = _lattice_shape(displacements)
    strides = (lattice[1] * lattice[2], lattice[2], 1)
    spacing = [float(displacements[:, a].unique()[1] - displacements[:, a].unique()[0]) if n > 1 else 1.0
               for a, n in enumerate(lattice)]
    norms = displacements.pow(2).sum(1)  # ||d - u||^2 = ||d||^2 - 2 d.u + (the same for every d)
    lattice_t = displacements.t().contiguous()
    out = torch.empty_like(flat_u)
    for start in range(0, flat_cost.shape[0], chunk):
        # (voxels, K): the minimum over the last, contiguous axis is several times faster than over the first
        energy = torch.addmm(flat_cost[start:start + chunk], flat_u[:, start:start + chunk].t(), lattice_t,
                             alpha=-2 * weight).add_(norms, alpha=weight)
        best = energy.argmin(dim=1, keepdim=True)
        chosen = displacements[best[:, 0]].t()
        if subvoxel:
            centre = energy.gather(1, best)[:, 0]
            for axis in range(3):
                position = (best // strides[axis]) % lattice[axis]
                inside = (position > 0) & (position < lattice[axis] - 1)
                minus = energy.gather(1, best - strides[axis] * inside)[:, 0]
                plus = energy.gather(1, best + strides[axis] * inside)[:, 0]
                chosen[axis] += spacing[axis] * torch.where(inside[:, 0], _parabola_offset(minus, centre, plus),
                                                            torch.zeros_like(centre))
        out[:, start:start + chunk] = chosen
    return out.reshape(1, 3, *spatial)


@torch.no_grad()
def coupled_convex(cost: torch.Tensor, displacements: torch.Tensor, coupling: Sequence[float] = DEFAULT_COUPLING,
                   sigma: float = DEFAULT_SIGMA, subvoxel: bool = True,
                   progress: Optional[Callable[[float], None]] = None) -> torch.Tensor:
    """A smooth field ``(1, 3, D, H, W)`` (voxels of the cost volume's grid, pull) from the cost volume.

    From ``u_bar = 0``: for each coupling weight ``w`` (rising; in units of the cost's typical contrast, the
    mean over voxels of mean minus minimum cost, per squared voxel), choose per voxel the displacement
    minimising ``cost + w ||d - u_bar||^2``, then ``u_bar`` = that choice smoothed with a Gaussian of
    ``sigma`` voxels. The last choice is refined below a voxel (``subvoxel``) before its smoothing."""
    scale = float((cost.mean(dim=1) - cost.amin(dim=1)).mean()) + 1e-12
    u_bar = torch.zeros((1, 3, *cost.shape[2:]), device=cost.device, dtype=cost.dtype)
    for i, weight in enumerate(coupling):
        last = i == len(coupling) - 1
        chosen = coupled_minimum(cost, displacements, u_bar, weight * scale, subvoxel=subvoxel and last)
        u_bar = gaussian_smooth(chosen, sigma)
        if progress:
            progress((i + 1) / len(coupling))
    return u_bar


def _coarse_shape(shape: Sequence[int], grid_step: Ints3) -> Tuple[int, int, int]:
    return tuple(max(1, math.ceil(n / s)) for n, s in zip(shape, _three(grid_step)))


@torch.no_grad()
def discrete_search(fixed_desc: torch.Tensor, moving_desc: torch.Tensor, radius: Ints3, grid_step: Ints3 = 1,
                    step: int = 1, patch: int = 1, coupling: Sequence[float] = DEFAULT_COUPLING,
                    sigma: float = DEFAULT_SIGMA, progress: Optional[Callable[[float], None]] = None) -> torch.Tensor:
    """The field ``(1, 3, D, H, W)`` on the descriptors' grid, in its voxels, that takes each fixed point to the
    moving point matching it (``warp(moving, u)`` resembles ``fixed``).

    The search runs on a grid ``grid_step`` times coarser per axis (descriptors area-averaged), over the
    displacements within ``radius`` voxels of that grid, ``step`` apart; the field is brought back to the
    descriptors' grid with :func:`samir.spatial.resize_field` (its units follow)."""
    shape = tuple(fixed_desc.shape[2:])
    coarse = _coarse_shape(shape, grid_step)
    fixed_c, moving_c = resize_volume(fixed_desc, coarse), resize_volume(moving_desc, coarse)
    cost, displacements = cost_volume(fixed_c, moving_c, radius, step, patch, progress)
    u = coupled_convex(cost, displacements, coupling, sigma,
                       progress=None if progress is None else lambda f: progress(0.8 + 0.2 * f))
    return resize_field(u, shape)


def combine_descriptors(pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]], shape: Sequence[int]
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Several descriptor sets of a pair (each ``(fixed, moving)``, ``(1, C_i, ...)`` on any grid) resampled to
    ``shape`` and concatenated, each scaled so that it weighs alike in the channel-mean squared difference
    whatever its channel count and range."""
    fixed_parts, moving_parts = [], []
    total = sum(fixed.shape[1] for fixed, _ in pairs)
    for fixed, moving in pairs:
        fixed, moving = resize_volume(fixed, shape), resize_volume(moving, shape)
        spread = float(torch.cat([fixed, moving], 0).var(dim=(0, 2, 3, 4)).mean()) + 1e-12
        factor = math.sqrt(total / (len(pairs) * fixed.shape[1] * spread))
        fixed_parts.append(fixed * factor)
        moving_parts.append(moving * factor)
    return torch.cat(fixed_parts, 1), torch.cat(moving_parts, 1)


@dataclass
class SearchGrid:
    """Where :func:`global_search` searches: the descriptors' grid, and the search grid ``grid_step`` coarser."""
    descriptor_shape: Tuple[int, int, int]
    grid_step: Tuple[int, int, int]  # search grid = descriptor grid pooled this much per axis
    shape: Tuple[int, int, int]  # the search grid
    spacing_mm: Tuple[float, float, float]  # of the search grid
    radius: Tuple[int, int, int]  # search-grid voxels per axis

    @property
    def displacements(self) -> int:
        return math.prod(2 * r + 1 for r in self.radius)


def plan_search_grid(shape: Sequence[int], spacing_zyx: Sequence[float], radius_mm: float,
                     max_cost_bytes: int = MAX_COST_BYTES) -> SearchGrid:
    """A search grid of about ``radius_mm / SEARCH_RADIUS_VOXELS`` spacing (coarser if the cost volume
    would exceed ``max_cost_bytes``), and a descriptor grid twice as fine (the image's, if finer is asked):
    descriptors computed there and averaged keep detail that descriptors of the coarse image lose."""
    target = max(radius_mm / SEARCH_RADIUS_VOXELS, min(spacing_zyx))
    while True:
        steps = [max(1, math.ceil(target / s - 1e-6)) for s in spacing_zyx]
        grid = tuple(max(1, math.ceil(n / s)) for n, s in zip(shape, steps))
        spacing = tuple(float(s) * n / g for s, n, g in zip(spacing_zyx, shape, grid))
        radius = tuple(max(1, round(radius_mm / g)) if n > 1 else 0 for g, n in zip(spacing, grid))
        cost_bytes = 4 * math.prod(grid) * math.prod(2 * r + 1 for r in radius)
        if cost_bytes <= max_cost_bytes or all(g <= 2 for g in grid):
            break
        target *= 1.25
    descriptor = tuple(min(n, 2 * g) if s >= 2 else n for n, g, s in zip(shape, grid, steps))
    grid_step = tuple(2 if s >= 2 else 1 for s in steps)
    return SearchGrid(descriptor, grid_step, grid, spacing, radius)


@torch.no_grad()
def global_search(fixed: torch.Tensor, moving: torch.Tensor, spacing_zyx: Sequence[float], radius_mm: float,
                  extra_descriptors: Sequence[Tuple[torch.Tensor, torch.Tensor]] = (), use_mind: bool = True,
                  progress: Optional[Callable[[float], None]] = None) -> Tuple[torch.Tensor, Dict[str, object]]:
    """The registration's starting field: ``(field (1, 3, D, H, W) on fixed's grid in its voxels, report)``.

    ``fixed``/``moving``: ``(1, 1, D, H, W)`` images on one grid (the moving one already pre-aligned). The
    descriptors are MIND-SSC of both images on the descriptor grid (any contrast; ``use_mind=False`` leaves
    them out) and/or ``extra_descriptors``, ``(fixed, moving)`` pairs ``(1, C, ...)`` on any grid covering the
    same volume (e.g. encoder feature maps), combined by :func:`combine_descriptors`."""
    if not use_mind and not extra_descriptors:
        raise ValueError("global_search needs descriptors: MIND-SSC or extra_descriptors")
    start = time.perf_counter()
    full_shape = tuple(fixed.shape[2:])
    grid = plan_search_grid(full_shape, spacing_zyx, radius_mm)
    pairs = list(extra_descriptors)
    if use_mind:
        f, m = (resize_volume(x, grid.descriptor_shape) for x in (fixed, moving))
        pairs.insert(0, (mind_ssc(f), mind_ssc(m)))
    fixed_desc, moving_desc = pairs[0] if len(pairs) == 1 else combine_descriptors(pairs, grid.descriptor_shape)
    u = discrete_search(fixed_desc, moving_desc, grid.radius, grid.grid_step, progress=progress)
    u = resize_field(u, full_shape)
    spacing = torch.tensor([float(s) for s in spacing_zyx], device=u.device).view(1, 3, 1, 1, 1)
    report = {"enabled": True, "radius_mm": float(radius_mm), "grid_shape_zyx": list(grid.shape),
              "grid_spacing_mm_zyx": [round(s, 3) for s in grid.spacing_mm], "radius_voxels_zyx": list(grid.radius),
              "displacements": grid.displacements,
              "max_displacement_mm": round(float((u * spacing).norm(dim=1).max()), 3),
              "folding_percent": 100.0 * folding_fraction(jacobian_determinant(u)),
              "time_s": round(time.perf_counter() - start, 3)}
    return u, report
