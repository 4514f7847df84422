"""Zero-shot SAMIR: instance optimisation of the PDFP pyramid on frozen encoder features.

The same coarse-to-fine structure as :class:`samir.samirnet.PDFP`, but each level's velocity is a
free parameter optimised with Adam on this pair instead of predicted by a trained network:

    u_l = compose(upsample(u_{l+1}), integrate(smooth(v_l)))
    loss_l = w_sim * S(F_l, M_l o u_l) + w_ssd * MSE(F_l, g * map(M_l) o u_l) / var(F_l)
             + w_feat * MSE(feat F_l, feat M_l o u_l)
             + w_smooth * diffusion(u_l)      (or of the level's increment: regularise_increment=True)

An optional last stage evaluates ``S`` on the full-resolution images (``full_resolution_iterations``)
for volumes whose full grid is beyond ``max_voxels``: its velocity stays on the finest optimised grid,
or with ``full_resolution_velocity`` lives on the full grid, integrated in fewer squaring steps
(``full_resolution_integration_steps``: the increment left at that stage is small), optionally with
its own diffusion weight (``full_resolution_smoothness``).

with ``S`` local NCC (same contrast) or the MIND-SSC descriptor difference (any contrast). With NCC,
from the second stage on ``M`` passes through a monotone intensity map fitted on the pair as aligned
so far (``joint_intensity_map``): local NCC absorbs linear intensity changes only, and a map fitted
on corresponding voxels, unlike histogram matching, is not bent by structures that change size.
From the same stage on, the squared difference of the fixed image and the mapped moving image, scaled
by a smooth gain ``g`` fitted on the pair as aligned (a bias field: ``smooth_intensity_gain``), joins
local NCC (``ssd_weight``): NCC normalises every window's contrast, so a faint boundary weighs as much
as a strong one and the weak contrast inside it hardly counts; the squared difference weighs contrast
as it is.
Where the noisier image's white noise (:func:`estimate_noise_std`), as left by a level's area
averaging, is strong, both images of that level are smoothed alike (``noise_smoothing``): at the finest
levels NCC otherwise aligns the noise. The same noise raises that level's diffusion weight
(``noise_smoothness_factor``): the similarity of noisy images constrains the field less.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .features import SliceFeatures, sample_features
from .intensity import (MIN_MAP_NONLINEARITY, apply_monotone_map, joint_statistics, map_nonlinearity,
                        symmetric_monotone_map)
from .losses import (LocalNCC, diffusion_loss, feature_loss, intensity_difference_loss, mind_loss, mind_ssc,
                     ncc_window)
from .spatial import compose, gaussian_smooth, integrate, pyramid_shapes, resize_field, resize_volume, warp
from .stepper import Adam, RepeatedStep


CONTENT_THRESHOLD = 0.02  # normalised intensity above which a voxel is not background


@dataclass
class OptimizerSettings:
    levels: int = 5
    finest_level: int = 1  # optimise down to this level at most; the field is then upsampled to full resolution
    optimised_levels: Optional[int] = None  # only the this many finest of the optimised levels (refinement)
    max_voxels: Optional[int] = None  # ... and stop at the finest level with no more voxels than this
    iterations: Sequence[int] = (80, 80, 60, 40, 30)  # per level, coarsest first
    learning_rate: float = 0.25
    smoothness: float = 0.3
    feature_weight: float = 1.0
    feature_similarity: str = "mse"  # mean squared difference, or "ncc" (local NCC per channel, slower)
    similarity: str = "ncc"  # image similarity: "ncc" (local NCC, same contrast) or "mind" (MIND-SSC, any contrast)
    ncc_weight: float = 1.0  # weight of the image similarity (NCC or MIND)
    mind_scale: float = 1.0  # multiplies the MIND term (larger aligns no better and is rougher: bench/README)
    ncc_window: int = 9
    velocity_sigma: float = 1.0
    integration_steps: int = 7
    tolerance: float = 1e-4  # early stop when the loss improves less than this over `patience` steps
    patience: int = 15
    # diffusion of each level's own increment (True) or of the whole field so far (False): with the increment
    # alone, roughness builds up across levels, which a noisy, contrast-changed pair shows (bench/README)
    regularise_increment: bool = False
    full_resolution_iterations: int = 0  # a last stage on the finest optimised velocity grid, images at full resolution
    # ... whose velocity is on the full grid instead, integrated in fewer squaring steps (None: integration_steps):
    # the field's last increment is small, and each squaring step at full resolution is costly
    full_resolution_velocity: bool = False
    full_resolution_integration_steps: Optional[int] = None
    full_resolution_smoothness: Optional[float] = None  # the last stage's diffusion weight (None: smoothness)
    # NCC: from the second stage on, the moving intensities pass through a monotone map fitted on the pair as
    # aligned so far (fixed against warped moving), for intensity responses NCC's local linearity cannot absorb
    joint_intensity_map: bool = True
    # NCC: where the noisier image's noise (estimate_noise_std, [0, 1] intensities, reduced by each level's
    # area averaging) exceeds the range's first value, both images are smoothed alike with a Gaussian rising
    # to 1 finest-voxel width at its second; the finest levels otherwise follow the noise (see bench/README)
    noise_smoothing: bool = True
    noise_smoothing_range: Sequence[float] = (0.012, 0.03)
    noise_smoothing_max_mm: float = 2.0
    # NCC: the diffusion weight of a level is multiplied by up to this factor as its noise rises through the same
    # range (1: off): a noisy level's similarity says less about the field, the prior more; clean scans read no
    # noise and keep the weight (bench/README, "Noise-adaptive diffusion weight")
    noise_smoothness_factor: float = 4.0
    # NCC with the intensity map: weight of the squared difference of the fixed and the mapped moving image
    # (over the fixed image's variance), after a gain fitted with a Gaussian of ``ssd_gain_sigma_mm`` (bias
    # fields; 0: no gain). NCC weighs every window's contrast alike; the squared difference weighs faint
    # boundaries as they are (bench/README, "Squared intensity difference beside local NCC")
    ssd_weight: float = 0.5
    ssd_gain_sigma_mm: float = 10.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["iterations"] = list(self.iterations)
        return out


@dataclass
class LevelReport:
    level: int
    shape: tuple
    iterations: int
    loss: float
    intensity_mapped: bool = False  # the moving intensities went through the joint intensity map
    noise_smoothing_mm: float = 0.0  # Gaussian sigma both images were smoothed with against noise
    noise_std: float = 0.0  # the noisier image's estimated noise (full resolution, [0, 1] intensities)
    smoothness: float = 0.0  # the diffusion weight used (raised at noisy levels: noise_smoothness_factor)


def content_region(image: torch.Tensor) -> torch.Tensor:
    """True within one voxel of a voxel brighter than background (``CONTENT_THRESHOLD``)."""
    return F.max_pool3d(image, 3, 1, 1) > CONTENT_THRESHOLD


def _immerkaer_response(image: torch.Tensor, content: torch.Tensor, dilation: int) -> float:
    """Smallest over the three orientations of the median absolute response, scaled to a white-noise std,
    of Immerkaer's mask (the product of second differences along two axes) with taps ``dilation`` apart."""
    second = torch.tensor([1.0, -2.0, 1.0], device=image.device, dtype=image.dtype)
    responses = []
    for axes in ((1, 2), (0, 2), (0, 1)):
        if any(image.shape[2 + d] < 2 * dilation + 1 for d in axes):
            continue
        shape = [3 if d in axes else 1 for d in range(3)]
        kernel = torch.outer(second, second).reshape(1, 1, *shape)
        response = F.conv3d(image, kernel, dilation=dilation,
                            padding=tuple(dilation * (n - 1) // 2 for n in shape))
        values = response[content].abs()
        if values.numel() < 100:
            continue
        step = max(1, values.numel() // 2_000_000)
        # white noise of std s gives responses of std 6 s (the mask's L2 norm); median |N(0, 1)| = 0.6745
        responses.append(float(values[::step].median()) / (0.6745 * 6.0))
    return min(responses) if responses else 0.0


def estimate_noise_std(image: torch.Tensor) -> float:
    """Standard deviation of white noise in ``image`` ``(1, 1, D, H, W)``, over voxels with content.

    Immerkaer's mask cancels whatever is locally linear along either of its axes, but at coarse voxels
    anatomy is not. With its taps 2 voxels apart the mask answers white noise exactly as before and
    anatomy at least twice as strongly, so ``r1^2 = n^2 + a^2`` and ``r2^2 >= n^2 + 4 a^2`` give
    ``n^2 <= (4 r1^2 - r2^2) / 3``: an image whose response grows with the taps' spacing is not noisy."""
    content = content_region(image)
    near, far = _immerkaer_response(image, content, 1), _immerkaer_response(image, content, 2)
    return math.sqrt(max(0.0, (4 * near * near - far * far) / 3))


def noise_strength(noise_std: float, settings: "OptimizerSettings") -> float:
    """How noisy a level whose noise is ``noise_std`` counts, from 0 up to the first value of
    ``settings.noise_smoothing_range`` to 1 from the second on: the Gaussian width, in voxels of the finest
    axis, both images are smoothed with (``noise_smoothing``), and the fraction of the way to
    ``noise_smoothness_factor`` times the diffusion weight."""
    if noise_std <= 0:
        return 0.0
    low, high = settings.noise_smoothing_range
    return min(1.0, max(0.0, (noise_std - low) / (high - low)))


def flat_region(image: torch.Tensor, fraction: float = 0.5) -> torch.Tensor:
    """1 where the local gradient magnitude is in the lowest ``fraction`` of the image's, else 0."""
    grads = [torch.diff(image, dim=d, append=image.narrow(d, image.shape[d] - 1, 1)) for d in (2, 3, 4)]
    magnitude = F.avg_pool3d(sum(g * g for g in grads), 3, 1, 1)
    content = magnitude[image > CONTENT_THRESHOLD]
    if content.numel() < 100:
        return torch.ones_like(image)
    step = max(1, content.numel() // 1_000_000)
    return (magnitude <= torch.quantile(content[::step], fraction)).float()


@torch.no_grad()
def aligned_intensity_statistics(fixed: torch.Tensor, moving: torch.Tensor, field: torch.Tensor,
                                 fixed_mask: Optional[torch.Tensor] = None,
                                 moving_mask: Optional[torch.Tensor] = None) -> np.ndarray:
    """``(2, 3, bins)``: :func:`samir.intensity.joint_statistics` of ``moving`` warped by ``field`` (resized
    to this grid) against ``fixed`` and of ``fixed`` against it, over the fixed image's flat regions: at
    edges the two differ by blur and residual misalignment (regression to the mean), not by their
    intensity response."""
    field = resize_field(field, tuple(fixed.shape[2:]))
    weight = flat_region(fixed)
    if fixed_mask is not None:
        weight = weight * fixed_mask
    if moving_mask is not None:
        weight = weight * warp(moving_mask, field, padding_mode="zeros")
    warped = warp(moving, field)
    return np.stack([joint_statistics(warped, fixed, weight), joint_statistics(fixed, warped, weight)])


@torch.no_grad()
def smooth_intensity_gain(fixed: torch.Tensor, warped: torch.Tensor, spacing_zyx: Sequence[float],
                          sigma_mm: float, statistics_mm: float = 4.0) -> torch.Tensor:
    """Smooth gain ``g`` with ``fixed ~ g * warped`` (a multiplicative bias field between the two), on
    ``fixed``'s grid: local least squares ``G(f w) / G(w w)`` with a Gaussian ``G`` of ``sigma_mm``, computed on
    a grid of about ``statistics_mm`` voxels (the gain is smooth). An axis too short for the Gaussian is
    averaged whole. Clamped to [0.5, 2] (in the background, where both images are dark, it does not matter)."""
    shape = tuple(fixed.shape[2:])
    coarse = tuple(max(1, min(n, math.ceil(n * s / statistics_mm))) for n, s in zip(shape, spacing_zyx))
    sums = resize_volume(torch.cat([fixed * warped, warped * warped], 1), coarse)
    sigmas = [sigma_mm * c / (n * s) for n, s, c in zip(shape, spacing_zyx, coarse)]
    for dim, (n, sigma) in enumerate(zip(coarse, sigmas)):
        if n <= 2 * max(1, round(2 * sigma)):  # gaussian_smooth leaves such an axis alone
            sums = sums.mean(dim=2 + dim, keepdim=True).expand_as(sums)
            sigmas[dim] = 0.0
    sums = gaussian_smooth(sums, sigmas)
    floor = 1e-3 * float(sums[:, 1].max()) + 1e-12
    gain = (sums[:, :1] / sums[:, 1:].clamp_min(floor)).clamp(0.5, 2.0)
    return F.interpolate(gain, size=shape, mode="trilinear", align_corners=False)


def optimised_levels(shapes: Sequence[tuple], settings: OptimizerSettings) -> List[int]:
    """The levels optimised, coarsest first (level 1 = full resolution), for the pyramid ``shapes``."""
    finest = settings.finest_level
    if settings.max_voxels:
        while finest < settings.levels and math.prod(shapes[finest - 1]) > settings.max_voxels:
            finest += 1
    levels = list(range(settings.levels, finest - 1, -1))
    if settings.optimised_levels:
        levels = levels[-settings.optimised_levels:]
    return levels


class _Stage(NamedTuple):
    level: int  # pyramid level; 0 for the last stage at full resolution
    velocity_shape: tuple
    image_shape: tuple
    iterations: int
    integration_steps: int
    smoothness: float


def _full_resolution_stage(settings: OptimizerSettings, finest_shape: tuple, full_shape: tuple) -> _Stage:
    """The last stage compares the images at full resolution, where the small structures are, with the
    velocity on the finest optimised grid or (``full_resolution_velocity``) on the full one."""
    steps = settings.integration_steps
    if settings.full_resolution_velocity and settings.full_resolution_integration_steps is not None:
        steps = settings.full_resolution_integration_steps
    smoothness = settings.smoothness if settings.full_resolution_smoothness is None else settings.full_resolution_smoothness
    return _Stage(0, full_shape if settings.full_resolution_velocity else finest_shape, full_shape,
                  settings.full_resolution_iterations, steps, smoothness)


def optimised_level_shapes(shape: Sequence[int], settings: OptimizerSettings, slicing_axis: Optional[int] = None,
                           spacing_zyx: Optional[Sequence[float]] = None) -> List[tuple]:
    shapes = pyramid_shapes(shape, settings.levels, slicing_axis, spacing_zyx)
    return [shapes[level - 1] for level in optimised_levels(shapes, settings)]


def _stages(full_shape: tuple, spacing_zyx: Sequence[float], settings: OptimizerSettings,
            slicing_axis: Optional[int]) -> List[_Stage]:
    """The optimised pyramid levels, coarsest first, and the full-resolution stage if one is asked for."""
    shapes = pyramid_shapes(full_shape, settings.levels, slicing_axis, spacing_zyx)
    levels = optimised_levels(shapes, settings)
    iterations = list(settings.iterations)[:len(levels)]
    iterations += [iterations[-1]] * (len(levels) - len(iterations))
    stages = [_Stage(level, shapes[level - 1], shapes[level - 1], n, settings.integration_steps, settings.smoothness)
              for level, n in zip(levels, iterations)]
    if settings.full_resolution_iterations and levels and shapes[levels[-1] - 1] != full_shape:
        stages.append(_full_resolution_stage(settings, shapes[levels[-1] - 1], full_shape))
    return stages


@dataclass
class LevelImages:
    """One stage's images, masks and features on its grid, as its objective compares them."""
    fixed: torch.Tensor  # (1, 1, *shape)
    moving: torch.Tensor  # through the joint intensity map when ``intensity_mapped``
    fixed_mask: Optional[torch.Tensor]
    moving_mask: Optional[torch.Tensor]
    spacing: List[float]  # mm per voxel of this grid
    smoothing_mm: float  # Gaussian both images were smoothed with against noise
    smoothness: float  # the diffusion weight (raised at noisy levels)
    intensity_mapped: bool = False
    ssd_moving: Optional[torch.Tensor] = None  # the moving image of the squared-difference term (mapped, gain applied)
    ssd_scale: float = 1.0  # the fixed image's variance, which divides that term
    fixed_features: Optional[torch.Tensor] = None  # (1, C, *shape) when features guide this level
    moving_features: Optional[torch.Tensor] = None
    content: Optional[torch.Tensor] = None  # where features are compared


def level_images(fixed: torch.Tensor, moving: torch.Tensor, fixed_mask: Optional[torch.Tensor],
                 moving_mask: Optional[torch.Tensor], stage: _Stage, spacing_zyx: Sequence[float], noise: float,
                 settings: OptimizerSettings) -> LevelImages:
    """Both images and masks on the stage's grid, smoothed alike where the level is noisy."""
    full_shape, shape = tuple(fixed.shape[2:]), stage.image_shape
    spacing_l = [s * full / n for s, full, n in zip(spacing_zyx, full_shape, shape)]
    f_l, m_l = resize_volume(fixed, shape), resize_volume(moving, shape)
    strength = noise_strength(noise / math.sqrt(math.prod(full_shape) / math.prod(shape)), settings)
    smooth_noise = settings.noise_smoothing and settings.similarity == "ncc"
    smoothing_mm = min(settings.noise_smoothing_max_mm, min(spacing_l) * strength) if smooth_noise else 0.0
    level_smoothness = stage.smoothness * (1 + (settings.noise_smoothness_factor - 1) * strength)
    if smoothing_mm > 0:  # the same physical width on every axis, so thick slices are hardly smoothed across
        f_l, m_l = (gaussian_smooth(x, [smoothing_mm / s for s in spacing_l]) for x in (f_l, m_l))
    fm_l = None if fixed_mask is None else (resize_volume(fixed_mask, shape) > 0.5).float()
    mm_l = None if moving_mask is None else resize_volume(moving_mask, shape)
    return LevelImages(f_l, m_l, fm_l, mm_l, spacing_l, smoothing_mm, level_smoothness)


def map_intensities(images: LevelImages, u_prev: torch.Tensor, statistics, settings: OptimizerSettings):
    """The moving image through the monotone map fitted on the pair as aligned so far (``statistics``:
    the joint statistics of the earlier stages, to which this stage's are added), and the squared-difference
    term's moving image. Returns the updated images and statistics."""
    statistics = statistics + aligned_intensity_statistics(images.fixed, images.moving, u_prev, images.fixed_mask,
                                                           images.moving_mask)
    knots, values = symmetric_monotone_map(*statistics)
    mapped_moving = apply_monotone_map(images.moving, knots, values)
    if map_nonlinearity(knots, values) > MIN_MAP_NONLINEARITY:
        images = replace(images, moving=mapped_moving, intensity_mapped=True)
    if settings.ssd_weight > 0:
        # the gain is smooth, so it is applied on the moving image's own grid (where its bias field is)
        ssd_moving = mapped_moving
        if settings.ssd_gain_sigma_mm > 0:
            ssd_moving = mapped_moving * smooth_intensity_gain(images.fixed, warp(mapped_moving, u_prev),
                                                               images.spacing, settings.ssd_gain_sigma_mm)
        images = replace(images, ssd_moving=ssd_moving, ssd_scale=float(images.fixed.var()) + 1e-8)
    return images, statistics


def add_level_features(images: LevelImages, fixed_features: SliceFeatures, moving_features: SliceFeatures,
                       device: torch.device) -> LevelImages:
    shape = tuple(images.fixed.shape[2:])
    # features are compared where the fixed image has content: encodings of a blank background
    # and of a noisy one differ without saying anything about anatomy
    return replace(images, fixed_features=sample_features(fixed_features, shape, device),
                   moving_features=sample_features(moving_features, shape, device),
                   content=content_region(images.fixed).float())


class LevelObjective:
    """The loss of one stage as a function of its velocity ``v``: with ``u = compose(u_prev, increment(v))``,
    the similarity of the fixed image and the moving image warped by ``u`` (+ the squared difference, +
    the feature term) + the diffusion of ``u`` (or of the increment: ``regularise_increment``)."""

    def __init__(self, images: LevelImages, u_prev: torch.Tensor, stage: _Stage, settings: OptimizerSettings):
        self.images, self.u_prev, self.settings = images, u_prev, settings
        self.shape, self.integration_steps = stage.image_shape, stage.integration_steps
        window = ncc_window(images.spacing, settings.ncc_window if stage.level <= 1 else min(settings.ncc_window, 7))
        self.fixed_mind = self.moving_mind = self.image_ncc = self.feature_ncc = None
        if settings.similarity == "mind":
            with torch.no_grad():
                self.fixed_mind, self.moving_mind = mind_ssc(images.fixed), mind_ssc(images.moving)
        else:
            self.image_ncc = LocalNCC(images.fixed, window)
        if images.fixed_features is not None and settings.feature_similarity == "ncc":
            self.feature_ncc = LocalNCC(images.fixed_features.transpose(0, 1), window)

    def increment(self, velocity: torch.Tensor) -> torch.Tensor:
        return resize_field(integrate(gaussian_smooth(velocity, self.settings.velocity_sigma), self.integration_steps),
                            self.shape)

    def _mask(self, u: torch.Tensor) -> Optional[torch.Tensor]:
        mask = self.images.fixed_mask
        if self.images.moving_mask is not None:
            warped_mask = warp(self.images.moving_mask, u, padding_mode="zeros").detach()
            mask = warped_mask if mask is None else mask * warped_mask
        return mask

    def _image_term(self, u: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        s, images = self.settings, self.images
        if s.similarity == "mind":
            return s.ncc_weight * s.mind_scale * mind_loss(self.fixed_mind, warp(self.moving_mind, u), mask)
        if images.ssd_moving is None:
            return s.ncc_weight * self.image_ncc(warp(images.moving, u), mask)
        # one resampling of both images
        warped, warped_ssd = warp(torch.cat([images.moving, images.ssd_moving], 1), u).chunk(2, dim=1)
        return (s.ncc_weight * self.image_ncc(warped, mask)
                + s.ssd_weight * intensity_difference_loss(images.fixed, warped_ssd, images.ssd_scale, mask))

    def _feature_term(self, u: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        images = self.images
        feature_mask = images.content if mask is None else mask * images.content
        if self.feature_ncc is not None:
            return self.feature_ncc(warp(images.moving_features, u).transpose(0, 1), feature_mask)
        return feature_loss(images.fixed_features, warp(images.moving_features, u), feature_mask)

    def __call__(self, velocity: torch.Tensor) -> torch.Tensor:
        increment = self.increment(velocity)
        u = compose(self.u_prev, increment)
        mask = self._mask(u)
        loss = self._image_term(u, mask)
        if self.images.fixed_features is not None:
            loss = loss + self.settings.feature_weight * self._feature_term(u, mask)
        regularised = increment if self.settings.regularise_increment else u
        return loss + self.images.smoothness * diffusion_loss(regularised, self.images.spacing)


def optimise_level(objective: LevelObjective, velocity: torch.Tensor, iterations: int, settings: OptimizerSettings,
                   on_iteration: Optional[Callable[[int], None]] = None) -> Tuple[int, float]:
    """Adam on ``velocity`` until ``iterations`` or an early stop (no gain of ``tolerance`` in ``patience``
    steps); returns the iterations run and the last loss."""
    step = RepeatedStep(lambda: objective(velocity), Adam([velocity], lr=settings.learning_rate), velocity.device)
    best, stall, loss_value, it = float("inf"), 0, float("nan"), 0
    for it in range(1, iterations + 1):
        loss_value = float(step.step())
        if loss_value < best - settings.tolerance:
            best, stall = loss_value, 0
        else:
            stall += 1
        if on_iteration:
            on_iteration(it)
        if stall >= settings.patience:
            break
    return it, loss_value


def optimize_pyramid(fixed: torch.Tensor, moving: torch.Tensor, spacing_zyx: Sequence[float],
                     settings: OptimizerSettings,
                     fixed_features: Optional[SliceFeatures] = None, moving_features: Optional[SliceFeatures] = None,
                     slicing_axis: Optional[int] = None, fixed_mask: Optional[torch.Tensor] = None,
                     moving_mask: Optional[torch.Tensor] = None, initial_field: Optional[torch.Tensor] = None,
                     feature_spacing_mm: float = 0.0, progress: Optional[Callable[[float], None]] = None) -> tuple:
    """Optimise the pyramid for one pair on ``fixed``'s grid.

    ``fixed``/``moving``: ``(1, 1, D, H, W)`` in [0, 1] on the same grid; masks likewise (1 = use).
    ``initial_field``: optional full-resolution starting displacement (e.g. a network's output).
    ``feature_spacing_mm``: in-plane spacing of the encoder features. Features guide the levels whose
    voxels are at least that coarse (large-scale, structure-aware alignment); finer levels refine on
    image NCC only, since the features hold no detail there and cost the most.
    Returns the full-resolution displacement ``(1, 3, D, H, W)`` in voxels and per-level reports.
    """
    device = fixed.device
    full_shape = tuple(fixed.shape[2:])
    stages = _stages(full_shape, spacing_zyx, settings, slicing_axis)
    total_iterations, done = max(1, sum(stage.iterations for stage in stages)), 0
    use_features = fixed_features is not None and moving_features is not None and settings.feature_weight > 0
    u = None if initial_field is None else initial_field.detach().to(device)
    reports: List[LevelReport] = []
    intensity_statistics = 0.0
    noise_aware = settings.similarity == "ncc" and (settings.noise_smoothing or settings.noise_smoothness_factor != 1)
    noise = max(estimate_noise_std(fixed), estimate_noise_std(moving)) if noise_aware else 0.0

    for stage in stages:
        images = level_images(fixed, moving, fixed_mask, moving_mask, stage, spacing_zyx, noise, settings)
        shape = stage.image_shape
        u_prev = torch.zeros((1, 3, *shape), device=device) if u is None else resize_field(u, shape).detach()
        if settings.joint_intensity_map and settings.similarity == "ncc" and u is not None:
            images, intensity_statistics = map_intensities(images, u_prev, intensity_statistics, settings)
        if use_features and min(images.spacing) >= feature_spacing_mm:
            images = add_level_features(images, fixed_features, moving_features, device)
        objective = LevelObjective(images, u_prev, stage, settings)
        velocity = torch.zeros((1, 3, *stage.velocity_shape), device=device, requires_grad=True)
        on_iteration = None if progress is None else (lambda it, done=done: progress((done + it) / total_iterations))
        iterations, loss_value = optimise_level(objective, velocity, stage.iterations, settings, on_iteration)
        done += stage.iterations
        with torch.no_grad():
            u = compose(u_prev, objective.increment(velocity))
        reports.append(LevelReport(stage.level, shape, iterations, loss_value, images.intensity_mapped,
                                   round(float(images.smoothing_mm), 3), round(noise, 4), round(images.smoothness, 4)))
        if progress:
            progress(done / total_iterations)
    with torch.no_grad():
        u = resize_field(u, full_shape)
    return u, reports
