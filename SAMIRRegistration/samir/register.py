"""Register two volumes: resampling into the fixed frame, SAFE features, zero-shot pyramid.

Everything happens on the fixed image's grid. The moving image is first resampled into that grid
in physical space (so any size, spacing, origin and direction is accepted); the result is a
displacement field on the fixed grid, in voxels for the engine and in LPS millimetres for files
(ITK convention: fixed point ``p`` maps to moving point ``p + d(p)``).
"""
from __future__ import annotations

import random
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, Optional

import numpy as np
import SimpleITK as sitk
import torch

from .encoders import ENCODERS, SliceEncoder, build_encoder
from .features import (auto_slice_stride, choose_slicing_axis, encode_volume, fit_channel_reduction, reduce_channels,
                       remove_frame_component)
from .geometry import SAMIRInputError, Volume, displacement_zyx_voxels_to_lps, from_sitk, to_sitk
from .intensity import normalize_intensity, resolve_normalization
from .spatial import folding_fraction, jacobian_determinant, sdlogj
from .zeroshot import OptimizerSettings, optimize_pyramid

ProgressFn = Optional[Callable[[str, float], None]]

# Presets bound the finest optimised grid by its voxel count, so the same preset costs about the
# same on a 2 mm and a 1 mm scan (a 1 mm brain stops at 1/2 resolution with "balanced").
PRESETS: Dict[str, dict] = {
    "fast": dict(max_voxels=300_000, iterations=(60, 50, 40, 40, 30)),
    "balanced": dict(max_voxels=1_500_000, iterations=(80, 80, 60, 50, 40)),
    "accurate": dict(max_voxels=None, iterations=(100, 100, 80, 60, 40)),
}
MODES = ("zeroshot",)
MIN_OVERLAP = 0.05


@dataclass
class RegistrationOptions:
    mode: str = "zeroshot"
    encoder: str = "litemedsam"
    weights: Optional[str] = None  # encoder checkpoint (SAM / MedSAM)
    input_size: Optional[int] = None  # encoder k
    preset: str = "balanced"
    device: str = "auto"
    normalization: str = "auto"
    slicing_axis: Optional[int] = None  # in the fixed array's (z, y, x) axes
    feature_channels: int = 16
    use_features: bool = False  # encoder-feature guidance of the coarse levels (see README: not yet a gain)
    encoder_batch_size: Optional[int] = None  # None: 32 on CUDA, 1 on CPU
    slice_stride: Optional[int] = None  # encode every n-th slice; None: match the in-plane feature spacing
    seed: int = 0
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
        return settings

    def validate(self) -> None:
        if self.mode not in MODES:
            raise SAMIRInputError(f"unknown mode '{self.mode}'; choose one of {', '.join(MODES)}")
        if self.encoder not in ENCODERS:
            raise SAMIRInputError(f"unknown encoder '{self.encoder}'; choose one of {', '.join(ENCODERS)}")
        if self.slicing_axis not in (None, 0, 1, 2):
            raise SAMIRInputError(f"slicing axis must be 0, 1 or 2 (z, y, x), got {self.slicing_axis}")
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            try:
                torch.zeros(1, device="cuda")
                return torch.device("cuda")
            except RuntimeError:
                pass
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SAMIRInputError(f"device '{name}' was requested but CUDA is not available here; use --device cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SAMIRInputError(f"device '{name}' does not exist: {torch.cuda.device_count()} CUDA device(s) found")
        return dev
    raise SAMIRInputError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N")


def resample_into(moving: Volume, reference: Volume, labels: bool = False) -> Volume:
    """Resample ``moving`` onto ``reference``'s grid through the identity in physical space."""
    if moving.same_grid(reference):
        return replace(moving, array=moving.array)
    interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    out = sitk.Resample(to_sitk(moving), to_sitk(reference.with_array(np.zeros(reference.shape, np.uint8))),
                        sitk.Transform(), interp, 0.0)
    return from_sitk(out, moving.name)


def coverage_of(moving: Volume, reference: Volume) -> np.ndarray:
    """1 where a reference voxel lies inside the moving image's field of view."""
    ones = moving.with_array(np.ones(moving.shape, dtype=np.uint8))
    return resample_into(ones, reference, labels=True).array.astype(np.float32)


def peak_memory_mb(device: Optional[torch.device] = None) -> Dict[str, float]:
    out = {"host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device is not None and device.type == "cuda":
        out["device_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


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
    report = progress or (lambda stage, fraction: None)

    t0 = time.perf_counter()
    report("resample", 0.0)
    coverage = coverage_of(moving, fixed)
    overlap = float(coverage.mean())
    if overlap < MIN_OVERLAP:
        raise SAMIRInputError(
            f"fixed and moving images do not overlap in physical space: only {100 * overlap:.1f}% of the fixed"
            " image lies inside the moving image (check origins and orientations, or align them first)")
    moving_on_fixed = resample_into(moving, fixed)
    norm = resolve_normalization(fixed.array, options.normalization)
    fixed01 = normalize_intensity(fixed.array, norm)
    moving01 = normalize_intensity(moving_on_fixed.array, norm, mask=coverage)
    axis = options.slicing_axis if options.slicing_axis is not None else choose_slicing_axis(fixed.shape, fixed.spacing_zyx)
    timings["resample_s"] = time.perf_counter() - t0
    report("resample", 1.0)

    fixed_features = moving_features = stride = None
    if options.use_features and settings.feature_weight > 0:
        t0 = time.perf_counter()
        if encoder is None:
            report("load encoder", 0.0)
            encoder = build_encoder(options.encoder, options.weights, options.input_size)
        timings["encoder_load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stride = options.slice_stride or auto_slice_stride(fixed.shape, fixed.spacing_zyx, axis, encoder.feature_size)
        fixed_features = encode_volume(fixed01, encoder, axis, device, options.encoder_batch_size,
                                       lambda f: report("encode fixed", f), stride)
        moving_features = encode_volume(moving01, encoder, axis, device, options.encoder_batch_size,
                                        lambda f: report("encode moving", f), stride)
        fixed_features, moving_features = remove_frame_component([fixed_features, moving_features])
        reduction = fit_channel_reduction([fixed_features, moving_features], options.feature_channels, seed=options.seed)
        fixed_features = reduce_channels(fixed_features, reduction)
        moving_features = reduce_channels(moving_features, reduction)
        timings["encoder_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None].to(device)
    fixed_mask_t = None
    if fixed_mask is not None:
        fixed_mask_t = as_tensor(resample_into(fixed_mask, fixed, labels=True).array > 0)
    moving_valid = coverage
    if moving_mask is not None:
        moving_valid = coverage * (resample_into(moving_mask, fixed, labels=True).array > 0)
    u, levels = optimize_pyramid(as_tensor(fixed01), as_tensor(moving01), fixed.spacing_zyx, settings,
                                 fixed_features, moving_features, axis, fixed_mask_t, as_tensor(moving_valid),
                                 feature_spacing_mm=fixed_features.feature_spacing_mm(fixed.spacing_zyx)
                                 if fixed_features is not None else 0.0, progress=lambda f: report("optimise", f))
    timings["optimise_s"] = time.perf_counter() - t0
    u = u.detach().float().cpu()
    jac = jacobian_determinant(u)[0].numpy()
    info = {
        "mode": options.mode, "encoder": encoder.describe() if encoder is not None else None,
        "device": str(device), "preset": options.preset, "normalization": norm, "slicing_axis_zyx": axis,
        "slice_stride": stride if fixed_features is not None else None, "overlap_fraction": overlap, "optimizer": settings.to_dict(),
        "levels": [asdict(level) for level in levels], **peak_memory_mb(device),
    }
    return RegistrationResult(fixed, u, jac, timings, info)


def stage_times(summary: dict) -> str:
    """One line: total time and the main stages, from a summary's ``timings_s``."""
    t = summary["timings_s"]
    parts = [f"{name} {t[key]:.1f} s" for key, name in (("encoder", "encoder"), ("optimise", "optimisation"))
             if key in t]
    return f"time {t['total']:.1f} s ({', '.join(parts)}) on {summary['device']}"
