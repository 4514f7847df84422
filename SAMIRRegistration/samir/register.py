"""Register two volumes: resampling into the fixed frame, SAFE features, zero-shot pyramid.

Everything happens on the fixed image's grid. The moving image is first resampled into that grid
in physical space (so any size, spacing, origin and direction is accepted); the result is a
displacement field on the fixed grid, in voxels for the engine and in LPS millimetres for files
(ITK convention: fixed point ``p`` maps to moving point ``p + d(p)``).

:func:`register` runs these steps, each a function of plain inputs and outputs:
:func:`load_network` (network mode), :func:`plan_registration` (slicing axis, features or not, memory
estimate), :func:`prepare_pair` (normalise, pre-align with :func:`align_pair`, resample into the fixed
frame, choose the similarity), :func:`encode_features`, :func:`compute_field` (network forward pass
and/or pyramid optimisation, from the global discrete search's field with ``global_search="on"``),
:func:`finish_field` (affine folded in, Jacobian) and
:func:`describe_run` (the result's ``info``).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import numpy as np
import torch

from .encoders import SliceEncoder, build_encoder
from .feature_cache import FeatureCache
from .features import (SliceFeatures, auto_slice_stride, choose_slicing_axis, default_encoder_batch_size, encode_volume,
                       fit_channel_reduction, reduce_channels, remove_frame_component, sample_features)
from .discrete import global_search
from .affine import AffineAlignment, align_affine, compose_with_affine, identity_alignment
from .geometry import SAMIRInputError, Volume, displacement_zyx_voxels_to_lps
from .intensity import intensity_rank_correlation, match_histogram, normalize_intensity, resolve_normalization
from .spatial import folding_fraction, jacobian_determinant, sdlogj
from .resources import (check_host_memory, estimate_peak_memory_mb, host_peak_rss_mb, resolve_device,
                        run_with_oom_fallback)
from .options import OPTION, check_values, default, registration_values, split_values
from .options import PRESETS as PRESET_NAMES
from .resampling import coverage_of, resample_into
from .zeroshot import LevelReport, OptimizerSettings, optimize_pyramid, optimised_level_shapes

if TYPE_CHECKING:
    from .checkpoint import SAMIRModel

ProgressFn = Optional[Callable[[str, float], None]]

# Presets bound the finest optimised grid by its voxel count, so the same preset costs about the
# same on a 2 mm and a 1 mm scan (a 1 mm brain stops at 1/2 resolution with "balanced"). "accurate"
# then ends with a full-resolution velocity compared on the full-resolution images, for small structures:
# the increment left there is small, so a few squaring steps keep it invertible, and a lighter smoothness
# at that stage alone keeps what it adds without touching the coarser levels (bench/README, "Design notes").
PRESETS: Dict[str, dict] = {
    "fast": dict(max_voxels=300_000, iterations=(60, 50, 40, 40, 30)),
    "balanced": dict(max_voxels=1_500_000, iterations=(80, 80, 60, 50, 40)),
    "accurate": dict(max_voxels=1_500_000, iterations=(100, 100, 80, 60, 50), full_resolution_iterations=40,
                     full_resolution_velocity=True, full_resolution_integration_steps=2, full_resolution_smoothness=0.15),
}
assert tuple(PRESETS) == PRESET_NAMES, "samir.options.PRESETS names the presets defined here"
MIN_OVERLAP = 0.05
# Below this rank correlation of fixed and moving intensities the contrasts are not the same (e.g. T1
# against T2): local NCC then pulls structures onto the wrong ones and MIND-SSC is used instead.
SAME_CONTRAST_MIN_CORRELATION = 0.2


@dataclass
class RegistrationOptions:
    """One registration's options: the fields of :data:`samir.options.OPTIONS` that are not optimiser
    overrides (their defaults come from there), the overrides in ``optimizer``, and a few settings for
    programs rather than users."""

    mode: str = default("mode")
    encoder: Optional[str] = default("encoder")
    encoder_weights: Optional[str] = default("encoder_weights")
    network: Optional[str] = default("network")
    refine_iterations: int = default("refine_iterations")
    input_size: Optional[int] = default("input_size")
    preset: str = default("preset")
    similarity: str = default("similarity")
    global_search: str = default("global_search")
    search_radius: float = default("search_radius")
    histogram_matching: bool = default("histogram_matching")
    alignment: str = default("alignment")
    device: str = default("device")
    normalization: str = default("normalization")
    slicing_axis: Optional[int] = default("slicing_axis")  # in the fixed array's (z, y, x) axes
    use_features: bool = default("use_features")
    feature_head: str = default("feature_head")
    slice_stride: Optional[int] = default("slice_stride")
    seed: int = default("seed")
    use_cache: bool = default("use_cache")
    optimizer: dict = field(default_factory=dict)  # overrides of OptimizerSettings (options with optimizer=True)
    feature_channels: int = 16
    encoder_batch_size: Optional[int] = None  # None: 32 on CUDA, 1 on CPU

    @classmethod
    def from_values(cls, values: dict) -> "RegistrationOptions":
        """Options from ``{name: value}`` of :data:`samir.options.OPTIONS` (unchecked: see :meth:`validate`)."""
        fields, overrides = split_values(values)
        return cls(**fields, optimizer=overrides)

    @classmethod
    def from_arguments(cls, namespace) -> "RegistrationOptions":
        """Options from a namespace parsed with :func:`samir.options.add_registration_arguments`."""
        return cls.from_values(registration_values(namespace))

    def option_values(self) -> dict:
        """``{name: value}`` of the schema's options (the overrides among them)."""
        values = {name: getattr(self, name) for name in OPTION if not OPTION[name].optimizer}
        values.update({k: v for k, v in self.optimizer.items() if k in OPTION})
        return values

    def settings(self) -> OptimizerSettings:
        if self.preset not in PRESETS:
            raise SAMIRInputError(f"unknown preset '{self.preset}'; choose one of {', '.join(PRESETS)}")
        values = {**PRESETS[self.preset], **{k: v for k, v in self.optimizer.items() if v is not None}}
        unknown = set(values) - set(OptimizerSettings.__dataclass_fields__)
        if unknown:
            raise SAMIRInputError(f"unknown optimiser setting(s): {', '.join(sorted(unknown))}")
        settings = OptimizerSettings(**values)
        if not 1 <= settings.finest_level <= settings.levels:
            raise SAMIRInputError(f"finest level {settings.finest_level} must be between 1 and levels = {settings.levels}")
        if settings.ssd_gain_sigma_mm < 0:
            raise SAMIRInputError(f"the squared-difference gain's Gaussian must not be negative, got"
                                  f" {settings.ssd_gain_sigma_mm} mm")
        return settings

    def validate(self) -> None:
        """The schema's checks (each option, and how they combine), then the device and the preset."""
        check_values(self.option_values())
        resolve_device(self.device)
        self.settings()


@dataclass
class RegistrationResult:
    fixed: Volume  # the output grid (and the fixed intensities)
    displacement: torch.Tensor  # (1, 3, D, H, W), voxels of the fixed grid, z/y/x channels
    jacobian: np.ndarray  # (D, H, W)
    timings: Dict[str, float]
    info: Dict[str, object]

    @property
    def displacement_lps(self) -> np.ndarray:
        """``(D, H, W, 3)`` LPS millimetres, ITK convention."""
        return displacement_zyx_voxels_to_lps(self.displacement[0].numpy(), self.fixed)

    @property
    def sdlogj(self) -> float:
        return sdlogj(torch.from_numpy(self.jacobian))

    @property
    def folding_percent(self) -> float:
        return 100.0 * folding_fraction(torch.from_numpy(self.jacobian))


def peak_memory_mb(device: Optional[torch.device] = None) -> Dict[str, float]:
    out = {"host_peak_rss_mb": host_peak_rss_mb()}
    if device is not None and device.type == "cuda":
        out["device_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class RunLog:
    """What a registration reports as it goes: progress, timings per stage and notes (retries, fallbacks)."""

    def __init__(self, progress: ProgressFn = None):
        self.report: Callable[[str, float], None] = progress or (lambda stage, fraction: None)
        self.timings: Dict[str, float] = {}
        self.notes: List[str] = []


@dataclass
class Plan:
    """What ``register`` will do, decided from the options and the fixed grid before any full-size copy."""
    model: Optional["SAMIRModel"]  # network mode: the trained network
    encoder_name: str
    input_size: Optional[int]  # encoder k (None: the encoder's default)
    normalization: str  # as asked ("auto": chosen from the fixed image)
    axis: int  # slicing axis, in the fixed array's (z, y, x) axes
    need_features: bool
    estimated_peak_mb: float


@dataclass
class FixedFramePair:
    """The pair on the fixed grid, normalised, and what was learnt about it on the way."""
    fixed01: np.ndarray
    moving01: np.ndarray  # the moving image resampled into the fixed frame (through the alignment)
    normalization: str  # resolved
    fixed_mask: Optional[np.ndarray]  # bool, on the fixed grid
    moving_valid: np.ndarray  # 1 where the moving image (and its mask) covers a fixed voxel
    alignment: AffineAlignment
    overlap: float
    similarity: str  # resolved ("auto" decided)
    rank_correlation: float
    histogram_matched: bool


@dataclass
class PairFeatures:
    """Encoder features of a pair as the field computation reads them (None without features)."""
    fixed: Optional[SliceFeatures] = None
    moving: Optional[SliceFeatures] = None
    encoder: Optional[SliceEncoder] = None
    stride: Optional[int] = None
    cache: Optional[FeatureCache] = None
    guide: bool = False  # zero-shot guidance features (else, if any, the network's)
    head: Optional[dict] = None  # the SAFE head that made the guidance features (what the summary says)


@dataclass
class ComputedField:
    field: torch.Tensor  # (1, 3, D, H, W) voxels of the fixed grid, on ``device``
    levels: List[LevelReport]
    device: torch.device  # where it was computed (the CPU after an out-of-memory fallback)
    timings: Dict[str, float]
    search: Optional[Dict[str, object]] = None  # the global search's report, when it ran


def load_network(options: RegistrationOptions) -> Optional["SAMIRModel"]:
    """Network mode's trained network (None in zero-shot mode)."""
    if options.mode != "network":
        return None
    from .checkpoint import load_model
    return load_model(options.network, encoder=options.encoder, input_size=options.input_size)


def plan_registration(fixed: Volume, options: RegistrationOptions, settings: OptimizerSettings,
                      model: Optional["SAMIRModel"], device: torch.device) -> Plan:
    """Choose the slicing axis and whether features are needed; estimate the peak memory."""
    normalization = options.normalization
    if model is not None and normalization == "auto":
        normalization = model.config.normalization
    axis = options.slicing_axis
    if axis is None:
        axis = choose_slicing_axis(fixed.shape, fixed.spacing_zyx)
    need_features = (model is not None and model.config.encoder != "none") or (  # "none": image-only network
        model is None and options.use_features and settings.feature_weight > 0)
    optimised = optimised_level_shapes(fixed.shape, settings, axis, fixed.spacing_zyx)
    optimising = model is None or options.refine_iterations
    full_resolution_stage = optimising and settings.full_resolution_iterations
    velocity_voxels = math.prod(fixed.shape) if full_resolution_stage and settings.full_resolution_velocity else \
        math.prod(optimised[-1]) if optimised and optimising else 0
    estimate = estimate_peak_memory_mb(
        fixed.shape, velocity_voxels, encoded_slices=2 * fixed.shape[axis] if need_features else 0,
        network=model is not None, on_gpu=device.type == "cuda",
        image_loss_voxels=math.prod(fixed.shape) if full_resolution_stage else 0)
    return Plan(model, model.config.encoder if model is not None else (options.encoder or "litemedsam"),
                model.config.input_size if model is not None else options.input_size, normalization, axis,
                need_features, estimate)


def align_pair(fixed: Volume, moving: Volume, fixed01: np.ndarray, normalization: str,
               fixed_mask: Optional[np.ndarray], moving_mask: Optional[Volume], options: RegistrationOptions,
               device: torch.device, log: RunLog) -> AffineAlignment:
    """The affine pre-alignment in physical space (the identity with ``alignment="none"``)."""
    if options.alignment == "none":
        return identity_alignment(options.alignment)
    log.report("align", 0.0)
    align = lambda dev, _batch: align_affine(
        fixed.with_array(fixed01), moving.with_array(normalize_intensity(moving.array, normalization)),
        options.alignment, None if fixed_mask is None else fixed.with_array(fixed_mask.astype(np.float32)),
        None if moving_mask is None else resample_into(moving_mask, moving, labels=True),
        device=dev, progress=lambda f: log.report("align", f))
    # float64 maps: none on MPS, which aligns on the CPU
    return run_with_oom_fallback(align, device if device.type == "cuda" else torch.device("cpu"), 1, "pre-alignment",
                                 log.notes)


def choose_similarity(options: RegistrationOptions, rank_correlation: float) -> str:
    if options.similarity != "auto":
        return options.similarity
    return "ncc" if rank_correlation >= SAME_CONTRAST_MIN_CORRELATION else "mind"


def prepare_pair(fixed: Volume, moving: Volume, fixed_mask: Optional[Volume], moving_mask: Optional[Volume],
                 options: RegistrationOptions, plan: Plan, device: torch.device, log: RunLog) -> FixedFramePair:
    """Normalise, pre-align and resample the moving image (and masks) into the fixed frame; choose the similarity."""
    t0 = time.perf_counter()
    norm = resolve_normalization(fixed.array, plan.normalization)
    fixed01 = normalize_intensity(fixed.array, norm)
    fixed_mask_np = None if fixed_mask is None else resample_into(fixed_mask, fixed, labels=True).array > 0
    alignment = align_pair(fixed, moving, fixed01, norm, fixed_mask_np, moving_mask, options, device, log)
    if options.alignment != "none":
        log.timings["align_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
    log.report("resample", 0.0)
    coverage = coverage_of(moving, fixed, alignment.matrix)
    overlap = float(coverage.mean())
    if overlap < MIN_OVERLAP:
        raise SAMIRInputError(
            f"fixed and moving images do not overlap in physical space: only {100 * overlap:.1f}% of the fixed"
            " image lies inside the moving image" + (" after the affine alignment" if alignment.used else "")
            + " (check origins and orientations, or align them first)")
    # cubic: linear interpolation blurs by an amount that varies with the sub-voxel offset, which NCC rewards
    moving_on_fixed = resample_into(moving, fixed, affine_lps=alignment.matrix, cubic=True)
    moving01 = normalize_intensity(moving_on_fixed.array, norm, mask=coverage)
    rank_correlation = intensity_rank_correlation(fixed01, moving01, coverage, seed=options.seed)
    similarity = choose_similarity(options, rank_correlation)
    # NCC forgives linear intensity changes only; on request a same-contrast pair with another intensity
    # response (gamma, scanner, protocol) is first brought onto one histogram over the region both images
    # cover. The network sees the intensities it was trained on; MIND-SSC needs no matching.
    histogram_matched = bool(options.histogram_matching and plan.model is None and similarity == "ncc")
    if histogram_matched:
        moving01 = match_histogram(moving01, fixed01, source_valid=coverage, reference_valid=coverage)
    log.timings["resample_s"] = time.perf_counter() - t0
    log.report("resample", 1.0)
    moving_valid = coverage
    if moving_mask is not None:
        moving_mask_on_fixed = resample_into(moving_mask, fixed, labels=True, affine_lps=alignment.matrix)
        moving_valid = coverage * (moving_mask_on_fixed.array > 0)
    return FixedFramePair(fixed01, moving01, norm, fixed_mask_np, moving_valid, alignment, overlap, similarity,
                        rank_correlation, histogram_matched)


def encode_pair(fixed01: np.ndarray, moving01: np.ndarray, encoder: SliceEncoder, axis: int, device: torch.device,
                options: RegistrationOptions, stride: int, log: RunLog, cache: Optional[FeatureCache] = None,
                normalization: str = "", spacing_zyx=None):
    """The encoder's raw features of the normalised fixed and moving volumes (slices along ``axis``).

    With ``cache``, features stored there for the same content, encoder, ``normalization``, axis and
    stride are reused, and new ones stored."""
    def encode(label: str, volume01: np.ndarray):
        batch = options.encoder_batch_size or default_encoder_batch_size(device)
        run = lambda: run_with_oom_fallback(
            lambda dev, b: encode_volume(volume01, encoder, axis, dev, b, lambda f: log.report(f"encode {label}", f),
                                         stride),
            device, batch, f"encoding the {label} image", log.notes)
        if cache is None:
            return run()
        return cache.fetch_or_encode(label, volume01, spacing_zyx, normalization, encoder, axis, stride, device, run)
    return encode("fixed", fixed01), encode("moving", moving01)


def guidance_head(options: RegistrationOptions, encoder: SliceEncoder):
    """``(head, payload)`` of the SAFE head that ``options.feature_head`` asks for, or ``(None, None)`` for
    the PCA; the trained head applies to the encoder it was trained on only."""
    from .safe_head import load_head, shipped_head_available
    if options.feature_head == "pca":
        return None, None
    fits = encoder.name == "litemedsam" and encoder.input_size == 256
    if options.feature_head == "trained" and not fits:
        raise SAMIRInputError(f"the trained SAFE head reads LiteMedSAM features (k = 256), not {encoder.name}"
                              f" (k = {encoder.input_size}); use --feature-head pca")
    if options.feature_head == "auto" and not (fits and shipped_head_available()):
        return None, None
    return load_head()


def reduce_pair(fixed_features, moving_features, options: RegistrationOptions, encoder: SliceEncoder):
    """Zero-shot guidance features and the head that made them: the trained SAFE head's descriptors, scaled
    to unit mean square per channel like the PCA's; or the frame component removed and a PCA shared by the pair."""
    from .safe_head import apply_head, describe_head
    head, payload = guidance_head(options, encoder)
    if head is not None:
        scale = float(head.out_channels) ** 0.5
        described = [apply_head(f, head) for f in (fixed_features, moving_features)]
        return [replace(f, features=f.features * scale) for f in described] + [describe_head(payload)]
    fixed_features, moving_features = remove_frame_component([fixed_features, moving_features])
    reduction = fit_channel_reduction([fixed_features, moving_features], options.feature_channels, seed=options.seed)
    return reduce_channels(fixed_features, reduction), reduce_channels(moving_features, reduction), {"name": "pca"}


def encode_features(fixed: Volume, pair: FixedFramePair, options: RegistrationOptions, plan: Plan, device: torch.device,
                  encoder: Optional[SliceEncoder], log: RunLog) -> PairFeatures:
    """Encode the pair (if the plan needs features) and reduce the features to what the field computation reads."""
    if not plan.need_features:
        return PairFeatures(encoder=encoder)
    model = plan.model
    t0 = time.perf_counter()
    if encoder is None:
        log.report("load encoder", 0.0)
        encoder = build_encoder(plan.encoder_name, options.encoder_weights, plan.input_size)
    if model is not None and (encoder.name != model.config.encoder or encoder.input_size != model.config.input_size):
        raise SAMIRInputError(f"the network was trained on {model.config.encoder} (k = {model.config.input_size})"
                              f" features, the encoder given is {encoder.name} (k = {encoder.input_size})")
    log.timings["encoder_load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stride = options.slice_stride or auto_slice_stride(fixed.shape, fixed.spacing_zyx, plan.axis, encoder.feature_size)
    cache = FeatureCache() if options.use_cache else None
    fixed_features, moving_features = encode_pair(pair.fixed01, pair.moving01, encoder, plan.axis, device, options,
                                                  stride, log, cache=cache, normalization=pair.normalization,
                                                  spacing_zyx=fixed.spacing_zyx)
    log.timings["encoder_s"] = time.perf_counter() - t0
    head = None
    if model is None:
        fixed_features, moving_features, head = reduce_pair(fixed_features, moving_features, options, encoder)
    else:
        from .inference import prepare_features  # the raw 256-channel features are not needed any more
        fixed_features, moving_features = prepare_features(model, fixed_features, moving_features)
    return PairFeatures(fixed_features, moving_features, encoder, stride, cache, guide=model is None, head=head)


def head_descriptors(features: PairFeatures, shape, device: torch.device) -> list:
    """The trained head's descriptors of both images at half the image's resolution, for the global search
    beside MIND-SSC (none without the head: raw or PCA features are not contrast-invariant)."""
    if not features.guide or not features.head or features.head.get("name") != "trained SAFE head":
        return []
    half = tuple(max(1, int(n) // 2) for n in shape)
    return [(sample_features(features.fixed, half, device), sample_features(features.moving, half, device))]


def compute_field(fixed: Volume, pair: FixedFramePair, features: PairFeatures, plan: Plan, settings: OptimizerSettings,
                  options: RegistrationOptions, device: torch.device, report: Callable[[str, float], None]
                  ) -> ComputedField:
    """Network forward pass and/or pyramid optimisation on ``device``."""
    timings: Dict[str, float] = {}
    t_start = time.perf_counter()
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None].to(device)
    fixed_t, moving_t = as_tensor(pair.fixed01), as_tensor(pair.moving01)
    initial_field = None
    if plan.model is not None:
        from .inference import predict_field
        report("network", 0.0)
        initial_field = predict_field(plan.model, fixed_t, moving_t, features.fixed, features.moving,
                                      fixed.spacing_zyx, plan.axis, prepared=True)
        report("network", 1.0)
        timings["network_s"] = time.perf_counter() - t_start
        t_start = time.perf_counter()
        if not options.refine_iterations:
            return ComputedField(initial_field, [], device, timings)
    search = None
    if options.global_search == "on":
        # the pyramid starts from the searched field and optimises on top of it; its output is the whole field
        report("search", 0.0)
        initial_field, search = global_search(fixed_t, moving_t, fixed.spacing_zyx, options.search_radius,
                                              extra_descriptors=head_descriptors(features, fixed_t.shape[2:], device),
                                              progress=lambda f: report("search", f))
        report("search", 1.0)
        timings["search_s"] = time.perf_counter() - t_start
        t_start = time.perf_counter()
    guide = features.guide
    field_, levels = optimize_pyramid(
        fixed_t, moving_t, fixed.spacing_zyx, settings, features.fixed if guide else None,
        features.moving if guide else None, plan.axis, None if pair.fixed_mask is None else as_tensor(pair.fixed_mask),
        None if pair.moving_valid.min() > 0 else as_tensor(pair.moving_valid), initial_field=initial_field,
        feature_spacing_mm=features.fixed.feature_spacing_mm(fixed.spacing_zyx) if guide else 0.0,
        progress=lambda f: report("optimise", f))
    timings["optimise_s"] = time.perf_counter() - t_start
    return ComputedField(field_, levels, device, timings, search)


def finish_field(u: torch.Tensor, alignment: AffineAlignment, fixed: Volume, notes: List[str]):
    """The affine map folded into the field, and its Jacobian determinant (on the field's device); both on the CPU."""
    def finish(dev: torch.device, _batch: int):
        total = u.detach().float().to(dev)
        if alignment.used:
            total = compose_with_affine(total, alignment.matrix, fixed)
        return total.cpu(), jacobian_determinant(total)[0].cpu()
    return run_with_oom_fallback(finish, u.device, 1, "composition and Jacobian", notes)


def describe_run(options: RegistrationOptions, plan: Plan, pair: FixedFramePair, features: PairFeatures,
                 settings: OptimizerSettings, computed: ComputedField, notes: List[str]) -> Dict[str, object]:
    """The result's ``info``: what was done, as the summary reports it."""
    model, encoder, cache = plan.model, features.encoder, features.cache
    return {
        "mode": options.mode, "encoder": encoder.describe() if encoder is not None else None,
        "feature_head": features.head,
        "network": model.describe() if model is not None else None, "refine_iterations": options.refine_iterations,
        "device": str(computed.device), "preset": options.preset, "normalization": pair.normalization,
        "slicing_axis_zyx": plan.axis, "slice_stride": features.stride, "overlap_fraction": pair.overlap,
        "similarity": pair.similarity, "intensity_rank_correlation": pair.rank_correlation,
        "histogram_matching": pair.histogram_matched, "alignment": pair.alignment.describe(),
        "global_search": computed.search or {"enabled": False},
        "optimizer": settings.to_dict(),
        "feature_cache": cache.report() if cache is not None else (
            {"enabled": False} if features.stride is not None else None),
        "levels": [asdict(level) for level in computed.levels], "notes": notes,
        "estimated_peak_host_mb": plan.estimated_peak_mb, **peak_memory_mb(computed.device),
    }


def register(fixed: Volume, moving: Volume, options: Optional[RegistrationOptions] = None,
             fixed_mask: Optional[Volume] = None, moving_mask: Optional[Volume] = None,
             encoder: Optional[SliceEncoder] = None, progress: ProgressFn = None) -> RegistrationResult:
    """Deformably register ``moving`` to ``fixed`` (both validated 3D volumes)."""
    options = options or RegistrationOptions()
    options.validate()
    settings = options.settings()
    device = resolve_device(options.device)
    seed_everything(options.seed)
    log = RunLog(progress)
    plan = plan_registration(fixed, options, settings, load_network(options), device)
    check_host_memory(plan.estimated_peak_mb, fixed.shape)  # before any full-size copy is made
    pair = prepare_pair(fixed, moving, fixed_mask, moving_mask, options, plan, device, log)
    settings = replace(settings, similarity=pair.similarity)
    features = encode_features(fixed, pair, options, plan, device, encoder, log)
    if plan.model is not None:
        settings = replace(settings, optimised_levels=2, iterations=(options.refine_iterations,))
    computed = run_with_oom_fallback(
        lambda dev, _batch: compute_field(fixed, pair, features, plan, settings, options, dev, log.report),
        device, 1, "registration", log.notes)
    log.timings.update(computed.timings)
    u, jac = finish_field(computed.field, pair.alignment, fixed, log.notes)
    info = describe_run(options, plan, pair, features, settings, computed, log.notes)
    return RegistrationResult(fixed, u, jac.numpy(), log.timings, info)


def stage_times(summary: dict) -> str:
    """One line: total time and the main stages, from a summary's ``timings_s``."""
    t = summary["timings_s"]
    parts = [f"{name} {t[key]:.1f} s" for key, name in (("encoder", "encoder"), ("search", "global search"),
                                                        ("optimise", "optimisation")) if key in t]
    return f"time {t['total']:.1f} s ({', '.join(parts)}) on {summary['device']}"
