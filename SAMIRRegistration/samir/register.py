"""Register two volumes: resampling into the fixed frame, SAFE features, zero-shot pyramid.

Everything happens on the fixed image's grid. The moving image is first resampled into that grid
in physical space (so any size, spacing, origin and direction is accepted); the result is a
displacement field on the fixed grid, in voxels for the engine and in LPS millimetres for files
(ITK convention: fixed point ``p`` maps to moving point ``p + d(p)``).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .encoders import ENCODERS, SliceEncoder, build_encoder
from .feature_cache import FeatureCache
from .features import (auto_slice_stride, choose_slicing_axis, default_encoder_batch_size, encode_volume,
                       fit_channel_reduction, reduce_channels, remove_frame_component)
from .affine import ALIGNMENT_MODES, align_affine, compose_with_affine, identity_alignment
from .geometry import SAMIRInputError, Volume, displacement_zyx_voxels_to_lps
from .intensity import intensity_rank_correlation, match_histogram, normalize_intensity, resolve_normalization
from .spatial import folding_fraction, jacobian_determinant, sdlogj
from .resources import (check_host_memory, estimate_peak_memory_mb, host_peak_rss_mb, resolve_device,
                        run_with_oom_fallback)
from .options import MODES, SIMILARITIES
from .options import PRESETS as PRESET_NAMES
from .resampling import coverage_of, resample_into
from .zeroshot import OptimizerSettings, optimize_pyramid, optimised_level_shapes

ProgressFn = Optional[Callable[[str, float], None]]

# Presets bound the finest optimised grid by its voxel count, so the same preset costs about the
# same on a 2 mm and a 1 mm scan (a 1 mm brain stops at 1/2 resolution with "balanced"). "accurate"
# then ends with a full-resolution velocity compared on the full-resolution images, for small structures:
# 2 squaring steps keep it invertible at about half the cost of 7, and a lighter smoothness there measured
# better on the real brain pair (Dice 0.796 vs 0.789, folding 0.009 %) without touching the coarser levels.
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
    mode: str = "zeroshot"  # or "network": a trained SAMIR network (``network``), optionally refined
    encoder: Optional[str] = None  # None: litemedsam, or the encoder the network was trained on
    weights: Optional[str] = None  # encoder checkpoint (SAM / MedSAM)
    network: Optional[str] = None  # SAMIR network checkpoint (mode "network")
    refine_iterations: int = 0  # network mode: instance-optimisation steps per level after the forward pass
    input_size: Optional[int] = None  # encoder k
    preset: str = "balanced"
    similarity: str = "auto"  # image similarity: ncc, mind, or auto (ncc unless the contrasts are reversed)
    # zero-shot with NCC: moving intensities mapped onto the fixed histogram first. Off by default: where
    # structures change size (cardiac phases, growth) the map reshapes soft edges and mimics the deformation.
    histogram_matching: bool = False
    # pre-alignment in physical space (affine.py): rigid by default, since a scaling fitted on a pair whose
    # structures change size (cardiac phases) would scale the whole body; "affine" for another subject's size
    alignment: str = "rigid"
    device: str = "auto"
    normalization: str = "auto"
    slicing_axis: Optional[int] = None  # in the fixed array's (z, y, x) axes
    feature_channels: int = 16
    use_features: bool = False  # encoder-feature guidance of the coarse levels (see README: not yet a gain)
    encoder_batch_size: Optional[int] = None  # None: 32 on CUDA, 1 on CPU
    slice_stride: Optional[int] = None  # encode every n-th slice; None: match the in-plane feature spacing
    seed: int = 0
    use_cache: bool = True  # reuse / store encoder features on disk (feature_cache.py; --no-cache)
    optimizer: dict = field(default_factory=dict)  # overrides of OptimizerSettings

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
        if settings.ssd_weight < 0 or settings.ssd_gain_sigma_mm < 0:
            raise SAMIRInputError(f"the squared-difference weight and its gain's Gaussian must not be negative, got"
                                  f" {settings.ssd_weight} and {settings.ssd_gain_sigma_mm} mm")
        if settings.noise_smoothness_factor < 1:
            raise SAMIRInputError(f"the noise smoothness factor multiplies the diffusion weight at noisy levels and must"
                                  f" be at least 1 (1: constant), got {settings.noise_smoothness_factor}")
        return settings

    def validate(self) -> None:
        if self.mode not in MODES:
            raise SAMIRInputError(f"unknown mode '{self.mode}'; choose one of {', '.join(MODES)}")
        if self.encoder is not None and self.encoder not in ENCODERS:
            raise SAMIRInputError(f"unknown encoder '{self.encoder}'; choose one of {', '.join(ENCODERS)}")
        if self.alignment not in ALIGNMENT_MODES:
            raise SAMIRInputError(f"unknown alignment '{self.alignment}'; choose one of {', '.join(ALIGNMENT_MODES)}")
        if self.similarity not in SIMILARITIES:
            raise SAMIRInputError(f"unknown similarity '{self.similarity}'; choose one of {', '.join(SIMILARITIES)}")
        if self.slicing_axis not in (None, 0, 1, 2):
            raise SAMIRInputError(f"slicing axis must be 0, 1 or 2 (z, y, x), got {self.slicing_axis}")
        if self.mode == "network" and not self.network:
            raise SAMIRInputError("mode 'network' needs a trained SAMIR network checkpoint (--network CKPT)")
        if self.mode != "network" and self.network:
            raise SAMIRInputError("a network checkpoint was given but the mode is zero-shot: add --mode network")
        if not isinstance(self.refine_iterations, int) or self.refine_iterations < 0:
            raise SAMIRInputError(f"refine iterations must be a non-negative integer, got {self.refine_iterations!r}")
        if self.refine_iterations and self.mode != "network":
            raise SAMIRInputError("--refine continues from a trained network's field: it needs --mode network")
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


def encode_pair(fixed01: np.ndarray, moving01: np.ndarray, encoder: SliceEncoder, axis: int, device: torch.device,
                options: RegistrationOptions, stride: int, report: Callable[[str, float], None],
                cache: Optional[FeatureCache] = None, normalization: str = "", spacing_zyx=None,
                notes: Optional[List[str]] = None):
    """The encoder's raw features of the normalised fixed and moving volumes (slices along ``axis``).

    With ``cache``, features stored there for the same content, encoder, ``normalization``, axis and
    stride are reused, and new ones stored."""
    def encode(label: str, volume01: np.ndarray):
        batch = options.encoder_batch_size or default_encoder_batch_size(device)
        run = lambda: run_with_oom_fallback(
            lambda dev, b: encode_volume(volume01, encoder, axis, dev, b, lambda f: report(f"encode {label}", f), stride),
            device, batch, f"encoding the {label} image", notes if notes is not None else [])
        if cache is None:
            return run()
        return cache.fetch_or_encode(label, volume01, spacing_zyx, normalization, encoder, axis, stride, device, run)
    return encode("fixed", fixed01), encode("moving", moving01)


def reduce_pair(fixed_features, moving_features, options: RegistrationOptions):
    """Zero-shot guidance features: frame component removed, PCA shared by the pair."""
    fixed_features, moving_features = remove_frame_component([fixed_features, moving_features])
    reduction = fit_channel_reduction([fixed_features, moving_features], options.feature_channels, seed=options.seed)
    return reduce_channels(fixed_features, reduction), reduce_channels(moving_features, reduction)


def register(fixed: Volume, moving: Volume, options: Optional[RegistrationOptions] = None,
             fixed_mask: Optional[Volume] = None, moving_mask: Optional[Volume] = None,
             encoder: Optional[SliceEncoder] = None, progress: ProgressFn = None) -> RegistrationResult:
    """Deformably register ``moving`` to ``fixed`` (both validated 3D volumes)."""
    options = options or RegistrationOptions()
    options.validate()
    settings = options.settings()
    device = resolve_device(options.device)
    seed_everything(options.seed)
    timings: Dict[str, float] = {}
    notes: List[str] = []
    report = progress or (lambda stage, fraction: None)

    model = None
    if options.mode == "network":
        from .checkpoint import load_model
        model = load_model(options.network, encoder=options.encoder, input_size=options.input_size)
    encoder_name = model.config.encoder if model is not None else (options.encoder or "litemedsam")
    input_size = model.config.input_size if model is not None else options.input_size
    normalization = options.normalization
    if model is not None and normalization == "auto":
        normalization = model.config.normalization

    axis = options.slicing_axis if options.slicing_axis is not None else choose_slicing_axis(fixed.shape, fixed.spacing_zyx)
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
    check_host_memory(estimate, fixed.shape)  # before any full-size copy is made
    t0 = time.perf_counter()
    norm = resolve_normalization(fixed.array, normalization)
    fixed01 = normalize_intensity(fixed.array, norm)
    fixed_mask_np = None if fixed_mask is None else resample_into(fixed_mask, fixed, labels=True).array > 0
    alignment = identity_alignment(options.alignment)
    if options.alignment != "none":
        report("align", 0.0)
        align = lambda dev, _batch: align_affine(
            fixed.with_array(fixed01), moving.with_array(normalize_intensity(moving.array, norm)), options.alignment,
            None if fixed_mask_np is None else fixed.with_array(fixed_mask_np.astype(np.float32)),
            None if moving_mask is None else resample_into(moving_mask, moving, labels=True),
            device=dev, progress=lambda f: report("align", f))
        # float64 maps: none on MPS, which aligns on the CPU
        alignment = run_with_oom_fallback(align, device if device.type == "cuda" else torch.device("cpu"), 1,
                                          "pre-alignment", notes)
        timings["align_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
    report("resample", 0.0)
    coverage = coverage_of(moving, fixed, alignment.matrix)
    overlap = float(coverage.mean())
    if overlap < MIN_OVERLAP:
        raise SAMIRInputError(
            f"fixed and moving images do not overlap in physical space: only {100 * overlap:.1f}% of the fixed"
            " image lies inside the moving image" + (" after the affine alignment" if alignment.used else "")
            + " (check origins and orientations, or align them first)")
    # cubic: linear interpolation blurs by an amount that varies with the sub-voxel offset, which NCC then
    # rewards (measured on a synthetic pair after an affine resampling: Dice 0.954 linear, 0.957 cubic)
    moving_on_fixed = resample_into(moving, fixed, affine_lps=alignment.matrix, cubic=True)
    moving01 = normalize_intensity(moving_on_fixed.array, norm, mask=coverage)
    rank_correlation = intensity_rank_correlation(fixed01, moving01, coverage, seed=options.seed)
    similarity = options.similarity
    if similarity == "auto":
        similarity = "ncc" if rank_correlation >= SAME_CONTRAST_MIN_CORRELATION else "mind"
    settings = replace(settings, similarity=similarity)
    # NCC forgives linear intensity changes only; on request a same-contrast pair with another intensity
    # response (gamma, scanner, protocol) is first brought onto one histogram over the region both images
    # cover. The network sees the intensities it was trained on; MIND-SSC needs no matching.
    histogram_matched = bool(options.histogram_matching and model is None and similarity == "ncc")
    if histogram_matched:
        moving01 = match_histogram(moving01, fixed01, source_valid=coverage, reference_valid=coverage)
    timings["resample_s"] = time.perf_counter() - t0
    report("resample", 1.0)

    fixed_features = moving_features = stride = cache = None
    if need_features:
        t0 = time.perf_counter()
        if encoder is None:
            report("load encoder", 0.0)
            encoder = build_encoder(encoder_name, options.weights, input_size)
        if model is not None and (encoder.name != model.config.encoder or encoder.input_size != model.config.input_size):
            raise SAMIRInputError(f"the network was trained on {model.config.encoder} (k = {model.config.input_size})"
                                  f" features, the encoder given is {encoder.name} (k = {encoder.input_size})")
        timings["encoder_load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stride = options.slice_stride or auto_slice_stride(fixed.shape, fixed.spacing_zyx, axis, encoder.feature_size)
        cache = FeatureCache() if options.use_cache else None
        fixed_features, moving_features = encode_pair(fixed01, moving01, encoder, axis, device, options, stride, report,
                                                      cache=cache, normalization=norm, spacing_zyx=fixed.spacing_zyx,
                                                      notes=notes)
        timings["encoder_s"] = time.perf_counter() - t0

    moving_valid = coverage
    if moving_mask is not None:
        moving_valid = coverage * (resample_into(moving_mask, fixed, labels=True, affine_lps=alignment.matrix).array > 0)
    guide = model is None and fixed_features is not None
    if guide:
        fixed_features, moving_features = reduce_pair(fixed_features, moving_features, options)
    elif model is not None and fixed_features is not None:
        from .inference import prepare_features  # the raw 256-channel features are not needed any more
        fixed_features, moving_features = prepare_features(model, fixed_features, moving_features)
    if model is not None:
        settings = replace(settings, optimised_levels=2, iterations=(options.refine_iterations,))

    def compute_field(dev: torch.device, _batch: int):
        """Network forward pass and/or pyramid optimisation on ``dev``; returns (field, level reports)."""
        t_start = time.perf_counter()
        used_device[0] = dev
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None].to(dev)
        fixed_t, moving_t = as_tensor(fixed01), as_tensor(moving01)
        initial_field = None
        if model is not None:
            from .inference import predict_field
            report("network", 0.0)
            initial_field = predict_field(model, fixed_t, moving_t, fixed_features, moving_features,
                                          fixed.spacing_zyx, axis, prepared=True)
            report("network", 1.0)
            timings["network_s"] = time.perf_counter() - t_start
            t_start = time.perf_counter()
            if not options.refine_iterations:
                return initial_field, []
        field_, reports = optimize_pyramid(
            fixed_t, moving_t, fixed.spacing_zyx, settings, fixed_features if guide else None,
            moving_features if guide else None, axis, None if fixed_mask_np is None else as_tensor(fixed_mask_np),
            None if moving_valid.min() > 0 else as_tensor(moving_valid), initial_field=initial_field,
            feature_spacing_mm=fixed_features.feature_spacing_mm(fixed.spacing_zyx) if guide else 0.0,
            progress=lambda f: report("optimise", f))
        timings["optimise_s"] = time.perf_counter() - t_start
        return field_, reports

    used_device = [device]
    u, levels = run_with_oom_fallback(compute_field, device, 1, "registration", notes)
    device = used_device[0]
    def finish(dev: torch.device, _batch: int):
        """The affine map folded into the field, and its Jacobian determinant (on the field's device)."""
        total = u.detach().float().to(dev)
        if alignment.used:
            total = compose_with_affine(total, alignment.matrix, fixed)
        return total.cpu(), jacobian_determinant(total)[0].cpu()
    u, jac = run_with_oom_fallback(finish, u.device, 1, "composition and Jacobian", notes)
    jac = jac.numpy()
    info = {
        "mode": options.mode, "encoder": encoder.describe() if encoder is not None else None,
        "network": model.describe() if model is not None else None, "refine_iterations": options.refine_iterations,
        "device": str(device), "preset": options.preset, "normalization": norm, "slicing_axis_zyx": axis,
        "slice_stride": stride, "overlap_fraction": overlap, "similarity": similarity,
        "intensity_rank_correlation": rank_correlation, "histogram_matching": histogram_matched,
        "alignment": alignment.describe(),
        "optimizer": settings.to_dict(),
        "feature_cache": cache.report() if cache is not None else ({"enabled": False} if stride is not None else None),
        "levels": [asdict(level) for level in levels], "notes": notes, "estimated_peak_host_mb": estimate,
        **peak_memory_mb(device),
    }
    return RegistrationResult(fixed, u, jac, timings, info)


def stage_times(summary: dict) -> str:
    """One line: total time and the main stages, from a summary's ``timings_s``."""
    t = summary["timings_s"]
    parts = [f"{name} {t[key]:.1f} s" for key, name in (("encoder", "encoder"), ("optimise", "optimisation"))
             if key in t]
    return f"time {t['total']:.1f} s ({', '.join(parts)}) on {summary['device']}"
