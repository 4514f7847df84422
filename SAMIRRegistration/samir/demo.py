"""``samir demo``: MNI152 (shipped in nilearn's wheel) against a deformed, contrast-changed, noisy copy.

The moving image is the template under a random smooth deformation of several millimetres, with a
gamma contrast change and Gaussian noise (the paper's robustness setting). Grey/white matter labels
(thresholded probability maps) are propagated and scored with Dice.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import SimpleITK as sitk

from .geometry import Volume, displacement_lps_to_zyx_voxels, from_sitk, volume_from_ras_affine
from .io import output_folder_lock, signals_deferred, write_volume
from .register import ProgressFn, RegistrationOptions, stage_times

LABEL_NAMES = {1: "grey matter", 2: "white matter"}


def load_mni152(resolution: int = 2) -> Tuple[Volume, Volume]:
    """MNI152 2009 T1 template and a GM (1) / WM (2) label map, from nilearn (no download)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets
        resolution = int(resolution)
        t1 = datasets.load_mni152_template(resolution=resolution)
        gm = datasets.load_mni152_gm_template(resolution=resolution)
        wm = datasets.load_mni152_wm_template(resolution=resolution)
    as_zyx = lambda img: np.ascontiguousarray(np.asarray(img.get_fdata(), dtype=np.float32).transpose(2, 1, 0))
    image = volume_from_ras_affine(as_zyx(t1), t1.affine, name="mni152_t1")
    gm_p, wm_p = as_zyx(gm), as_zyx(wm)
    labels = np.zeros(image.shape, dtype=np.int32)
    labels[(gm_p > 0.5) & (gm_p >= wm_p)] = 1
    labels[(wm_p > 0.5) & (wm_p > gm_p)] = 2
    return image, image.with_array(labels, name="mni152_gm_wm")


def random_smooth_displacement(shape, spacing_zyx, max_mm: float = 6.0, control_points: int = 5,
                               seed: int = 0) -> torch.Tensor:
    """Random smooth field ``(1, 3, D, H, W)`` in voxels whose largest displacement is ``max_mm``."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 3, control_points, control_points, control_points), generator=generator)
    # a control-point lattice whose corner points sit on the corner voxels, not a voxel grid (spatial.py)
    field_mm = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)
    field_mm = field_mm * (max_mm / field_mm.norm(dim=1).max())
    return field_mm / torch.tensor(spacing_zyx, dtype=torch.float32).view(1, 3, 1, 1, 1)


def make_demo_pair(resolution: int = 2, max_mm: float = 10.0, gamma: float = 1.5, noise: float = 0.03,
                   seed: int = 0) -> dict:
    from .spatial import warp
    fixed, fixed_seg = load_mni152(resolution)
    fixed = fixed.with_array(fixed.array / max(float(fixed.array.max()), 1e-6))
    u = random_smooth_displacement(fixed.shape, fixed.spacing_zyx, max_mm, seed=seed)
    image = torch.from_numpy(fixed.array)[None, None]
    moved = warp(image, u)[0, 0].clamp(0, 1) ** gamma
    moved = moved + noise * torch.randn(moved.shape, generator=torch.Generator().manual_seed(seed + 1))
    moving_seg = warp(torch.from_numpy(fixed_seg.array)[None, None], u, mode="nearest")[0, 0]
    return {"fixed": fixed, "fixed_seg": fixed_seg,
            "moving": fixed.with_array(moved.numpy().astype(np.float32), name="mni152_deformed"),
            "moving_seg": fixed_seg.with_array(moving_seg.numpy().astype(np.int32), name="mni152_deformed_gm_wm"),
            "true_displacement": u, "max_mm": max_mm, "gamma": gamma, "noise": noise}


def save_figure(path: Path, fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray,
                displacement_zyx: np.ndarray, jacobian: np.ndarray) -> None:
    """Mid-axial panels: fixed, moving, warped, checkerboards before/after, deformation grid, Jacobian."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    z = fixed.shape[0] // 2
    f, m, w = fixed[z], moving[z], warped[z]
    tiles = max(1, min(f.shape) // 8)
    yy, xx = np.indices(f.shape)
    board = ((yy // tiles + xx // tiles) % 2).astype(bool)
    fig, axes = plt.subplots(2, 4, figsize=(16, 8.5))
    panels = [("fixed", f), ("moving", m), ("warped moving", w), ("checkerboard before", np.where(board, f, m)),
              ("checkerboard after", np.where(board, f, w)), ("|fixed - warped|", np.abs(f - w))]
    for ax, (title, img) in zip(axes.flat, panels):
        ax.imshow(img, cmap="gray", origin="lower")
        ax.set_title(title)
    ax = axes.flat[6]
    dy, dx = displacement_zyx[1, z], displacement_zyx[2, z]
    step = max(1, min(f.shape) // 32)
    gy, gx = yy + dy, xx + dx
    for r in range(0, f.shape[0], step):
        ax.plot(gx[r], gy[r], color="tab:blue", lw=0.6)
    for c in range(0, f.shape[1], step):
        ax.plot(gx[:, c], gy[:, c], color="tab:blue", lw=0.6)
    ax.set_aspect("equal")
    ax.set_title("deformation grid")
    ax = axes.flat[7]
    im = ax.imshow(jacobian[z], cmap="RdBu_r", vmin=0, vmax=2, origin="lower")
    ax.set_title("Jacobian determinant")
    fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_demo(out_dir, options: Optional[RegistrationOptions] = None, resolution: int = 2,
             progress: ProgressFn = None) -> dict:
    from .pipeline import run_registration
    out_dir = Path(out_dir)
    pair = make_demo_pair(resolution)
    inputs = out_dir / "inputs"
    with output_folder_lock(out_dir):
        made = [folder for folder in (out_dir, inputs) if not folder.exists()]
        try:
            inputs.mkdir(parents=True, exist_ok=True)
            paths = {}
            for key in ("fixed", "moving", "fixed_seg", "moving_seg"):
                paths[key] = inputs / f"{key}.nii.gz"
                write_volume(pair[key], paths[key])
            summary = run_registration(paths["fixed"], paths["moving"], out_dir, moving_seg_path=paths["moving_seg"],
                                       fixed_seg_path=paths["fixed_seg"], options=options, progress=progress)
        except BaseException:  # interrupted or failed: take away the folders this run made
            with signals_deferred():
                if made:
                    shutil.rmtree(made[0], ignore_errors=True)
            raise
    if hasattr(progress, "close"):
        progress.close()
    warped = from_sitk(sitk.ReadImage(str(out_dir / "warped.nii.gz"))).array
    jac = from_sitk(sitk.ReadImage(str(out_dir / "jacobian.nii.gz"))).array
    disp_lps = sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / "displacement.nii.gz")))
    u = displacement_lps_to_zyx_voxels(disp_lps, pair["fixed"])
    save_figure(out_dir / "demo.png", pair["fixed"].array, pair["moving"].array, warped, u, jac)
    print(f"SAMIR demo: MNI152 at {resolution:g} mm {pair['fixed'].shape[::-1]} vs. a copy under a random smooth"
          f" deformation (max {pair['max_mm']:g} mm), gamma {pair['gamma']:g} and Gaussian noise {pair['noise']:g}")
    for label, name in LABEL_NAMES.items():
        before, after = summary["dice_before"].get(str(label)), summary["dice_after"].get(str(label))
        print(f"  Dice {name:<13} {before:.3f} -> {after:.3f}")
    print(f"  mean Dice {summary['dice_before_mean']:.3f} -> {summary['dice_after_mean']:.3f}")
    print(f"  SDlogJ {summary['sdlogj']:.4f}   folding {summary['folding_percent']:.4f} %")
    print(f"  {stage_times(summary)}")
    print(f"  outputs and figure in {out_dir} (demo.png)")
    return summary
