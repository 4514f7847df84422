"""File-to-file registration: read and validate everything, register, write all outputs at once.

Output folder (all on the fixed image's grid, physical space of the fixed image):

* ``transform.h5`` (or ``transform.tfm`` with ``transform_format="tfm"``) — ITK displacement-field
  transform (LPS; fixed point -> moving point); SimpleITK, ANTs and 3D Slicer read it and resample
  the moving image onto the fixed one with it. ``.tfm`` is text: many times larger, slower to read.
* ``displacement.nii.gz`` — the same field as a 3-component vector image in LPS millimetres.
* ``warped.nii.gz`` — the moving image resampled onto the fixed grid.
* ``warped_seg.nii.gz`` — the moving segmentation propagated to the fixed grid (if given).
* ``jacobian.nii.gz`` — Jacobian determinant of the transform.
* ``summary.json`` — settings, timings per stage, peak memory, SDlogJ, folding %, Dice.

Inputs are validated before anything is written; the output folder is locked for the run (a second
run writing there is refused); outputs are written to a staging folder and moved into place only
when all of them succeeded, replacing every output of an earlier run in that folder
(:func:`samir.io.staged_output_dir`).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from . import __version__
from .geometry import SAMIRInputError, Volume
from .io import (PathLike, check_labels_on_image, output_folder_lock, read_image, read_labels, staged_output_dir,
                 write_displacement, write_transform, write_volume)
from .metrics import dice_per_label, mean_dice
from .register import ProgressFn, RegistrationOptions, RegistrationResult, peak_memory_mb, register
from .resampling import resample_into, warp_labels, warp_volume

OUTPUT_FILES = {
    "transform": "transform.h5", "displacement": "displacement.nii.gz", "warped": "warped.nii.gz",
    "warped_seg": "warped_seg.nii.gz", "jacobian": "jacobian.nii.gz", "summary": "summary.json",
}


def dice_summary(fixed_seg: Volume, moving_seg_on_fixed: np.ndarray, warped_seg: np.ndarray) -> dict:
    labels = sorted(set(np.unique(fixed_seg.array).tolist()) - {0})
    before = dice_per_label(fixed_seg.array, moving_seg_on_fixed, labels)
    after = dice_per_label(fixed_seg.array, warped_seg, labels)
    return {"dice_before": {str(k): v for k, v in before.items()}, "dice_after": {str(k): v for k, v in after.items()},
            "dice_before_mean": mean_dice(before), "dice_after_mean": mean_dice(after)}


TRANSFORM_FORMATS = ("h5", "tfm")


def all_output_names() -> List[str]:
    """Every file name a run may write (an earlier run's outputs that a new run does not write are removed)."""
    return sorted({name for fmt in TRANSFORM_FORMATS for name in output_files(fmt).values()})


def output_files(transform_format: str = "h5") -> Dict[str, str]:
    if transform_format not in TRANSFORM_FORMATS:
        raise SAMIRInputError(f"unknown transform format '{transform_format}'; choose one of {', '.join(TRANSFORM_FORMATS)}")
    return {**OUTPUT_FILES, "transform": f"transform.{transform_format}"}


def strict_json(value):
    """``value`` with every NaN or infinity replaced by None (JSON has no NaN; strict readers reject it)."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return None
    return value


def write_outputs(stage: Path, result: RegistrationResult, moving: Volume, moving_seg: Optional[Volume],
                  fixed_seg: Optional[Volume], device: str = "cpu", transform_format: str = "h5") -> dict:
    """Write every output of ``result`` into ``stage``; returns the metric part of the summary."""
    fixed = result.fixed
    displacement = result.displacement_lps
    write_transform(displacement, fixed, stage / output_files(transform_format)["transform"])
    write_displacement(displacement, fixed, stage / OUTPUT_FILES["displacement"])
    write_volume(warp_volume(moving, fixed, displacement, device=device), stage / OUTPUT_FILES["warped"])
    write_volume(fixed.with_array(result.jacobian.astype(np.float32)), stage / OUTPUT_FILES["jacobian"])
    metrics: Dict[str, object] = {"sdlogj": result.sdlogj, "folding_percent": result.folding_percent}
    if moving_seg is not None:
        warped_seg = warp_labels(moving_seg, fixed, displacement, device=device)
        out = warped_seg.with_array(warped_seg.array.astype(np.uint16 if warped_seg.array.max() < 2 ** 16 else np.int32))
        write_volume(out, stage / OUTPUT_FILES["warped_seg"])
        if fixed_seg is not None:
            fixed_seg_on_grid = resample_into(fixed_seg, fixed, labels=True)
            moving_seg_on_fixed = resample_into(moving_seg, fixed, labels=True).array
            metrics.update(dice_summary(fixed_seg_on_grid, moving_seg_on_fixed, warped_seg.array))
    return metrics


def read_inputs(fixed_path: PathLike, moving_path: PathLike, moving_seg_path: Optional[PathLike] = None,
                fixed_seg_path: Optional[PathLike] = None, fixed_mask_path: Optional[PathLike] = None,
                moving_mask_path: Optional[PathLike] = None) -> Dict[str, Optional[Volume]]:
    """Read and validate every input file (label maps also against the image they belong to)."""
    volumes: Dict[str, Optional[Volume]] = {"fixed": read_image(fixed_path, "fixed"),
                                            "moving": read_image(moving_path, "moving")}
    for key, path, role, kind in (("moving_seg", moving_seg_path, "moving", "segmentation"),
                                  ("fixed_seg", fixed_seg_path, "fixed", "segmentation"),
                                  ("fixed_mask", fixed_mask_path, "fixed", "mask"),
                                  ("moving_mask", moving_mask_path, "moving", "mask")):
        volumes[key] = read_labels(path, role, kind) if path else None
        if volumes[key] is not None:
            check_labels_on_image(volumes[key], volumes[role], f"{role} {kind}", f"{role} image")
    if volumes["fixed_seg"] is not None and volumes["moving_seg"] is None:
        raise SAMIRInputError("a fixed segmentation was given without a moving segmentation: Dice needs both")
    return volumes


def run_registration(fixed_path: PathLike, moving_path: PathLike, out_dir: PathLike, *,
                     moving_seg_path: Optional[PathLike] = None, fixed_seg_path: Optional[PathLike] = None,
                     fixed_mask_path: Optional[PathLike] = None, moving_mask_path: Optional[PathLike] = None,
                     options: Optional[RegistrationOptions] = None, progress: ProgressFn = None,
                     transform_format: str = "h5") -> dict:
    """Register two image files and write the output folder; returns the summary."""
    options = options or RegistrationOptions()
    start = time.perf_counter()
    options.validate()
    files = output_files(transform_format)
    paths = {"fixed": fixed_path, "moving": moving_path, "moving_seg": moving_seg_path,
             "fixed_seg": fixed_seg_path, "fixed_mask": fixed_mask_path, "moving_mask": moving_mask_path}
    with output_folder_lock(out_dir):  # a second run into this folder is refused now, not after registering
        inputs = read_inputs(**{f"{key}_path": path for key, path in paths.items()})
        fixed, moving = inputs["fixed"], inputs["moving"]
        read_s = time.perf_counter() - start

        result = register(fixed, moving, options, fixed_mask=inputs["fixed_mask"], moving_mask=inputs["moving_mask"],
                          progress=progress)
        report = progress or (lambda stage, fraction: None)
        report("write outputs", 0.0)
        t0 = time.perf_counter()
        with staged_output_dir(out_dir, replaces=all_output_names()) as stage:
            metrics = write_outputs(stage, result, moving, inputs["moving_seg"], inputs["fixed_seg"],
                                    device=result.info["device"], transform_format=transform_format)
            summary = {
                "samir_version": __version__,
                "inputs": {key: str(path or "") for key, path in paths.items()},
                "fixed_grid": {"shape_zyx": list(fixed.shape), "spacing_xyz": list(fixed.spacing)},
                **{k: v for k, v in result.info.items() if k not in ("host_peak_rss_mb", "device_peak_allocated_mb")},
                "timings_s": {"read": read_s, **{k[:-2]: v for k, v in result.timings.items()},
                              "write": time.perf_counter() - t0},
                **metrics,
                "outputs": {k: v for k, v in files.items() if (stage / v).exists() or k == "summary"},
            }
            summary["timings_s"]["total"] = time.perf_counter() - start
            summary.update(peak_memory_mb(torch.device(result.info["device"])))
            (stage / files["summary"]).write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False))
    report("write outputs", 1.0)
    return summary
