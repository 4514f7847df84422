"""Affine pre-alignment in physical space, before the deformable stage.

Two scans of one patient from two sessions, or of two patients, can lie centimetres and degrees apart in
the scanner's world, and exported scans do not always share an origin. A deformable pyramid absorbs only
part of that, and bends anatomy to do it. :func:`align_affine` finds the affine map ``A`` taking a point of
the fixed image's world (LPS mm) to the moving-image world point that matches it (the direction of every
transform in the engine, and ITK's). The moving image is then resampled through ``A`` once, the deformable
stage runs on that, and :func:`compose_with_affine` folds ``A`` into the final displacement.

``A(x) = c + expm(G) (x - c) + t`` with ``c`` the fixed image's centre of intensity mass: ``G``
skew-symmetric is a rotation (``mode="rigid"``); a general ``G`` adds scaling and shear, and
``det expm(G) = exp(trace G) > 0`` rules out a reflection (``mode="affine"``).

Both images are smoothed and resampled onto grids of their own (about 32^3 voxels, then 64^3, cubic
voxels where the images are not coarser), and ``G`` and ``t`` are optimised with Adam on local squared NCC over the
region both images cover (the square accepts a locally inverted contrast, so T1 aligns with T2). The search
starts from the identity and from the translation that matches the two centres of intensity mass (images
whose origins disagree); the better after the coarse rigid stage goes on. An alignment that does not
improve the similarity over the identity, or that scales an axis by more than :data:`MAX_SCALE`, is not used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import Volume, index_to_world, world_points_of_grid, world_to_index
from .losses import LocalNCC, ncc_window
from .options import ALIGNMENTS
from .spatial import gaussian_smooth
from .stepper import Adam, RepeatedStep


GRID_VOXELS = (32 ** 3, 64 ** 3)  # voxels of the alignment grids, coarse to fine
MAX_SCALE = 2.0  # an axis scaled by more than this (or less than its inverse) is not a plausible pair
MIN_IMPROVEMENT = 1e-3  # loss the alignment must gain over the identity to be used
NO_OVERLAP_LOSS = 1.0  # the loss where the images hardly overlap (and the worst)
CONTENT_FRACTION = 0.1  # normalised intensity above which a voxel counts for the centre of mass


@dataclass
class AffineAlignment:
    """The result of :func:`align_affine`; ``matrix`` is the identity when ``used`` is False."""
    matrix: np.ndarray  # 4x4, LPS mm: fixed world point -> moving world point
    used: bool
    mode: str
    loss_identity: float = float("nan")
    loss_aligned: float = float("nan")
    start: str = "identity"  # or "centre of mass"
    reason: str = ""
    iterations: List[int] = field(default_factory=list)

    def describe(self) -> dict:
        u, singular, vt = np.linalg.svd(self.matrix[:3, :3])
        rotation = u @ vt
        angle = math.degrees(math.acos(float(np.clip((np.trace(rotation) - 1) / 2, -1.0, 1.0))))
        return {"mode": self.mode, "used": self.used, "start": self.start, "reason": self.reason,
                "matrix_lps": np.round(self.matrix, 6).tolist(), "rotation_deg": round(angle, 3),
                "scales": np.round(singular, 4).tolist(), "loss_identity": round(self.loss_identity, 5),
                "loss_aligned": round(self.loss_aligned, 5), "iterations": self.iterations}


def identity_alignment(mode: str = "none") -> AffineAlignment:
    return AffineAlignment(np.eye(4), False, mode)


def alignment_grid(volume: Volume, voxels: int) -> Volume:
    """A grid over ``volume``'s extent and direction with about ``voxels`` voxels, cubic where the volume's
    own spacing allows (never finer than it along any axis); the first voxel centre at the first block's centre."""
    spacing = np.asarray(volume.spacing)
    size_itk = np.asarray(volume.shape[::-1])
    extent = spacing * size_itk
    step = float(np.prod(extent) / voxels) ** (1 / 3)
    for _ in range(3):  # axes held at their own, coarser spacing leave more voxels to the others
        coarse = spacing >= step
        if not coarse.any() or coarse.all():
            break
        step = float(np.prod(extent[~coarse]) / (voxels / np.prod(size_itk[coarse]))) ** (1 / (~coarse).sum())
    new_size = np.maximum(1, np.round(extent / np.maximum(step, spacing))).astype(int)
    new_spacing = extent / new_size
    origin = np.asarray(volume.origin) + volume.direction @ ((new_spacing - spacing) / 2)
    return Volume(np.zeros(tuple(new_size[::-1]), np.float32), spacing=tuple(new_spacing), origin=tuple(origin),
                  direction=volume.direction, name=volume.name)


def smoothed_on_grid(image: torch.Tensor, volume: Volume, grid: Volume) -> torch.Tensor:
    """``image`` (``(1, 1, D, H, W)`` on ``volume``'s grid) on ``grid``, a grid over the same extent and
    direction (:func:`alignment_grid`), after a Gaussian matched to the coarser spacing.

    On such a grid, resampling in physical space is ``align_corners=False`` interpolation of the array."""
    sigma_voxels = [0.5 * math.sqrt(max(t * t - s * s, 0.0)) / s for t, s in zip(grid.spacing_zyx, volume.spacing_zyx)]
    if max(sigma_voxels) > 0:
        image = gaussian_smooth(image, sigma_voxels)
    return F.interpolate(image, size=grid.shape, mode="trilinear", align_corners=False)


def centre_of_mass(image01: torch.Tensor, volume: Volume) -> np.ndarray:
    """Intensity-weighted centre (LPS mm) of the voxels above :data:`CONTENT_FRACTION` (``image01``:
    ``(1, 1, D, H, W)`` on ``volume``'s grid)."""
    weights = torch.where(image01 > CONTENT_FRACTION, image01, 0.0)[0, 0].double()
    total = weights.sum()
    if float(total) <= 0:
        weights = torch.ones_like(weights)
        total = weights.sum()
    index_zyx = [float((weights.sum(dim=tuple(a for a in range(3) if a != axis))
                        * torch.arange(n, dtype=weights.dtype, device=weights.device)).sum() / total)
                 for axis, n in enumerate(weights.shape)]
    return (index_to_world(volume) @ np.array([*index_zyx[::-1], 1.0]))[:3]


def expm3(generator: torch.Tensor, squarings: int = 8, degree: int = 10) -> torch.Tensor:
    """Matrix exponential of a 3x3 ``generator`` by scaling and squaring with a fixed Taylor degree.

    Fixed work (no branch on the norm, unlike ``torch.linalg.matrix_exp``), so a step using it can be
    replayed as a CUDA graph; relative float64 error below 1e-10 for norms up to 8 (a rotation is at most pi)."""
    scaled = generator / 2 ** squarings
    eye = torch.eye(3, dtype=generator.dtype, device=generator.device)
    result, term = eye, eye
    for k in range(1, degree + 1):
        term = term @ scaled / k
        result = result + term
    for _ in range(squarings):
        result = result @ result
    return result


def affine_matrix(log_linear: torch.Tensor, translation: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """4x4 ``x -> c + expm(G) (x - c) + t`` (float64)."""
    linear = expm3(log_linear)
    top = torch.cat([linear, (centre + translation - linear @ centre)[:, None]], dim=1)
    bottom = F.pad(torch.ones((1, 1), dtype=top.dtype, device=top.device), (3, 0))
    return torch.cat([top, bottom], dim=0)


class _Level:
    """One alignment grid: the fixed image and its world points, the moving image on a grid of its own."""

    def __init__(self, fixed01: Volume, fixed: torch.Tensor, moving01: Volume, moving: torch.Tensor,
                 fixed_weight: Optional[torch.Tensor], moving_valid: torch.Tensor, voxels: int):
        """``fixed``, ``moving``, ``fixed_weight``, ``moving_valid``: full-resolution ``(1, 1, D, H, W)``
        tensors on their volumes' grids, on the device the alignment runs on."""
        device = fixed.device
        fixed_grid = alignment_grid(fixed01, voxels)
        moving_grid = alignment_grid(moving01, voxels)
        self.shape = fixed_grid.shape
        self.fixed = smoothed_on_grid(fixed, fixed01, fixed_grid)
        self.weight = None if fixed_weight is None else (smoothed_on_grid(fixed_weight, fixed01, fixed_grid) > 0.5).float()
        self.moving = smoothed_on_grid(moving, moving01, moving_grid)
        self.moving_valid = smoothed_on_grid(moving_valid, moving01, moving_grid)
        self.points = torch.from_numpy(world_points_of_grid(fixed_grid).reshape(-1, 3)).to(device)  # float64
        self.moving_world_to_index = torch.from_numpy(world_to_index(moving_grid)).to(device)
        size_ijk = torch.tensor(moving_grid.shape[::-1], dtype=torch.float64, device=device)
        self.index_scale = 2.0 / size_ijk  # align_corners=False: index i sits at (2 i + 1) / n - 1
        self.ncc = LocalNCC(self.fixed, ncc_window(fixed_grid.spacing[::-1], 7))
        self.spacing_mm = float(max(fixed_grid.spacing))
        self.reference_count = float(self.fixed.numel() if self.weight is None else self.weight.sum().clamp_min(1))

    def loss(self, matrix: torch.Tensor) -> torch.Tensor:
        to_index = self.moving_world_to_index @ matrix
        index = self.points @ to_index[:3, :3].T + to_index[:3, 3]
        grid = (index * self.index_scale + self.index_scale / 2 - 1).to(torch.float32).view(1, *self.shape, 3)
        warped = F.grid_sample(self.moving, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        valid = F.grid_sample(self.moving_valid, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        mask = (valid > 0.99).float().detach()
        if self.weight is not None:
            mask = mask * self.weight
        covered = mask.sum()
        # the mean over the fixed region, not over the covered part: a map that shrinks the overlap (to drop
        # blank or mismatched borders) must not gain by it
        loss = 1.0 - (1.0 - self.ncc(warped, mask)) * covered / self.reference_count
        # hardly any overlap: no information, the worst loss (NO_OVERLAP_LOSS) and no gradient
        return torch.where(covered < 0.05 * self.reference_count, torch.full_like(loss, NO_OVERLAP_LOSS), loss)


def _optimise(level: _Level, log_linear: torch.Tensor, translation: torch.Tensor, centre: torch.Tensor,
              rigid: bool, iterations: int, linear_rate: float) -> tuple:
    device = level.fixed.device
    log_linear = log_linear.clone().requires_grad_(True)
    translation = translation.clone().requires_grad_(True)
    optimizer = Adam([{"params": [translation], "lr": 0.25 * level.spacing_mm},
                      {"params": [log_linear], "lr": linear_rate}])
    generator = (lambda: 0.5 * (log_linear - log_linear.T)) if rigid else (lambda: log_linear)
    step = RepeatedStep(lambda: level.loss(affine_matrix(generator(), translation, centre)), optimizer, device)
    best, best_state, stall, it = float("inf"), None, 0, 0
    for it in range(1, iterations + 1):
        with torch.no_grad():
            before = (generator().clone(), translation.clone())  # the map this step's loss is measured at
        value = float(step.step())
        if value < best - 1e-5:
            best, best_state, stall = value, before, 0
        else:
            stall += 1
            if stall >= 12:
                break
        if value >= NO_OVERLAP_LOSS:  # no overlap: no gradient to follow
            break
    if best_state is None:
        best_state = (log_linear.detach().clone(), translation.detach().clone())
    return best_state[0], best_state[1], best, it


def align_affine(fixed01: Volume, moving01: Volume, mode: str = "affine", fixed_mask: Optional[Volume] = None,
                 moving_mask: Optional[Volume] = None, device: Optional[torch.device] = None,
                 progress: Optional[Callable[[float], None]] = None) -> AffineAlignment:
    """Align ``moving01`` to ``fixed01`` (normalised intensities, each on its own grid) by an affine map.

    ``mode``: ``"affine"`` (12 parameters), ``"rigid"`` (6) or ``"none"``. Masks (on their images' grids,
    1 = use) restrict the similarity. Returns the map and whether it was used (see the module docstring)."""
    if mode not in ALIGNMENTS:
        raise ValueError(f"unknown alignment '{mode}'; choose one of {', '.join(ALIGNMENTS)}")
    if mode == "none":
        return identity_alignment()
    device = device or torch.device("cpu")
    report = progress or (lambda f: None)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))[None, None].to(device)
    fixed, moving = as_tensor(fixed01.array), as_tensor(moving01.array)
    valid = torch.ones_like(moving) if moving_mask is None else as_tensor(moving_mask.array > 0)
    weight = None if fixed_mask is None else as_tensor(fixed_mask.array)
    coarse, fine = (_Level(fixed01, fixed, moving01, moving, weight, valid, n) for n in GRID_VOXELS)
    centre = torch.from_numpy(centre_of_mass(fixed, fixed01)).to(device)
    shift = torch.from_numpy(centre_of_mass(moving, moving01)).to(device) - centre
    del fixed, moving, valid, weight
    zero_g = torch.zeros((3, 3), dtype=torch.float64, device=device)
    zero_t = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        loss_identity = float(fine.loss(affine_matrix(zero_g, zero_t, centre)))

    starts = []
    for name, t0 in (("identity", zero_t), ("centre of mass", shift)):
        g, t, value, it = _optimise(coarse, zero_g, t0, centre, True, 80, 0.02)
        starts.append((value, name, g, t, it))
        report(0.2 * len(starts))
    value, start, g, t, it_rigid = min(starts, key=lambda s: s[0])
    iterations = [it_rigid]
    rigid = mode == "rigid"
    if not rigid:
        g, t, value, it = _optimise(coarse, g, t, centre, False, 60, 0.01)
        iterations.append(it)
    report(0.6)
    g, t, value, it = _optimise(fine, g, t, centre, rigid, 50, 0.005)
    iterations.append(it)
    report(1.0)
    with torch.no_grad():
        matrix = affine_matrix(g, t, centre)
        loss_aligned = float(fine.loss(matrix))
    matrix_np = matrix.cpu().numpy()
    scales = np.linalg.svd(matrix_np[:3, :3], compute_uv=False)
    result = AffineAlignment(matrix_np, True, mode, loss_identity, loss_aligned, start, iterations=iterations)
    if not loss_aligned < loss_identity - MIN_IMPROVEMENT:
        result.matrix, result.used = np.eye(4), False
        result.reason = "no better than the images' own placement"
    elif scales.max() > MAX_SCALE or scales.min() < 1 / MAX_SCALE:
        result.matrix, result.used = np.eye(4), False
        result.reason = f"implausible scaling {np.round(scales, 2).tolist()}"
    return result


def compose_with_affine(u: torch.Tensor, matrix_lps: np.ndarray, fixed: Volume) -> torch.Tensor:
    """The displacement ``x -> A(x + u(x)) - x`` on ``fixed``'s grid (engine convention: ``(1, 3, D, H, W)``,
    fixed-grid voxels, z/y/x channels), for ``A`` a 4x4 LPS map of fixed world points to moving ones."""
    in_index = world_to_index(fixed) @ matrix_lps @ index_to_world(fixed)  # ITK (i, j, k) order
    order = [2, 1, 0]
    linear = torch.as_tensor(in_index[:3, :3][np.ix_(order, order)], dtype=u.dtype, device=u.device)
    offset = torch.as_tensor(in_index[:3, 3][order], dtype=u.dtype, device=u.device)
    d, h, w = u.shape[2:]
    grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=u.dtype, device=u.device) for n in (d, h, w)),
                                      indexing="ij"), dim=0)[None]
    points = grid + u
    mapped = torch.einsum("ij,bjdhw->bidhw", linear, points) + offset.view(1, 3, 1, 1, 1)
    return mapped - grid
