"""Make the Slicer extension's icon (128 x 128) and its screenshot from a real SAMIR result.

    .venv/bin/python scripts/make_slicer_images.py [RESULT_FOLDER]

RESULT_FOLDER is the output folder of ``samir demo`` (default ``samir_demo``; run ``bash scripts/demo.sh``
first). The screenshot shows what the module shows after a run, in Slicer's slice-view style: fixed and
warped moving faded, the checkerboard, and the Jacobian map with its colour legend and the propagated
segmentation — using the module's own checkerboard and Jacobian colour map (SAMIRRegistrationLib.display).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk
from matplotlib.colors import LinearSegmentedColormap

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "SAMIRRegistration"))

from samir.geometry import from_sitk
from SAMIRRegistrationLib.display import JACOBIAN_COLOR_STOPS, JACOBIAN_RANGE
from SAMIRRegistrationLib.volumes import checkerboard

ICON = REPOSITORY / "SAMIRRegistration" / "Resources" / "Icons" / "SAMIRRegistration.png"
SCREENSHOT = REPOSITORY / "Screenshots" / "SAMIRRegistration.png"
SLICE_BARS = {"Red": "#f34a33", "Yellow": "#edd54c", "Green": "#6eb04b"}
SLICER_BACKGROUND = "#000000"


def jacobian_colormap() -> LinearSegmentedColormap:
    low, high = JACOBIAN_RANGE
    return LinearSegmentedColormap.from_list(
        "samir_jacobian", [((value - low) / (high - low), rgb) for value, rgb in JACOBIAN_COLOR_STOPS])


def make_icon(path: Path) -> None:
    """A deformed grid over a slice-like disc, with a propagated contour: registration at a glance."""
    size = 128
    fig = plt.figure(figsize=(1, 1), dpi=size)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(-1, 1)
    ax.set_ylim(-1, 1)
    ax.axis("off")
    ax.add_patch(plt.Circle((0, 0), 0.98, color="#1d2b3a"))
    t = np.linspace(-0.8, 0.8, 200)

    def warp(x, y):
        r2 = x ** 2 + y ** 2
        bump = 0.22 * np.exp(-r2 / 0.18)
        return x * (1 + bump), y * (1 + bump)

    for c in np.linspace(-0.8, 0.8, 7):
        for xs, ys in (warp(np.full_like(t, c), t), warp(t, np.full_like(t, c))):
            inside = xs ** 2 + ys ** 2 < 0.92 ** 2
            ax.plot(np.where(inside, xs, np.nan), np.where(inside, ys, np.nan), color="#9fc6ea", lw=1.1)
    angle = np.linspace(0, 2 * np.pi, 200)
    ax.plot(0.42 * np.cos(angle) * 1.2, 0.42 * np.sin(angle), color="#f34a33", lw=3.2)
    ax.plot(0.30 * np.cos(angle) * 1.2, 0.30 * np.sin(angle), color="#edd54c", lw=1.6, ls=(0, (2, 1.5)))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=size, transparent=True)
    plt.close(fig)


def middle_slice(array: np.ndarray) -> np.ndarray:
    return np.flipud(array[array.shape[0] // 2])


def window(image: np.ndarray, low_pct: float = 1, high_pct: float = 99) -> np.ndarray:
    low, high = np.percentile(image, [low_pct, high_pct])
    return np.clip((image - low) / max(high - low, 1e-6), 0, 1)


def slice_view(ax, bar_color: str, title: str) -> None:
    ax.set_facecolor(SLICER_BACKGROUND)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color(bar_color)
        spine.set_linewidth(3)
    ax.set_title(title, loc="left", fontsize=10, color="black", backgroundcolor=bar_color, pad=4)


def make_screenshot(result: Path, path: Path) -> None:
    read = lambda name: from_sitk(sitk.ReadImage(str(result / name)), name)
    fixed = read("inputs/fixed.nii.gz")
    warped = read("warped.nii.gz")
    jacobian = read("jacobian.nii.gz")
    propagated = read("warped_seg.nii.gz")
    summary = json.loads((result / "summary.json").read_text())
    board = checkerboard(fixed, fixed.with_array(warped.array.astype(np.float32)), squares=8)

    fixed_slice = window(middle_slice(fixed.array))
    warped_slice = window(middle_slice(warped.array))
    fig = plt.figure(figsize=(12.8, 5.0), dpi=100, facecolor="#f0f0f0")
    axes = [fig.add_axes([0.01 + i * 0.31, 0.08, 0.295, 0.8]) for i in range(3)]

    fade = 0.5 * fixed_slice + 0.5 * warped_slice
    axes[0].imshow(fade, cmap="gray", vmin=0, vmax=1)
    slice_view(axes[0], SLICE_BARS["Red"], " Fade: fixed + warped moving (50 %) ")

    axes[1].imshow(window(middle_slice(board.array)), cmap="gray", vmin=0, vmax=1)
    slice_view(axes[1], SLICE_BARS["Yellow"], " Checkerboard: fixed / warped moving ")

    axes[2].imshow(fixed_slice, cmap="gray", vmin=0, vmax=1)
    inside = fixed_slice > 0.15  # the head, not the air around it
    shown = axes[2].imshow(np.ma.masked_where(~inside, middle_slice(jacobian.array)), cmap=jacobian_colormap(),
                           vmin=JACOBIAN_RANGE[0], vmax=JACOBIAN_RANGE[1], alpha=0.7)
    labels = middle_slice(propagated.array)
    for value, color in ((1, "#edd54c"), (2, "#6ec6ff")):
        if np.any(labels == value):
            axes[2].contour(labels == value, levels=[0.5], colors=color, linewidths=0.9)
    slice_view(axes[2], SLICE_BARS["Green"], " Jacobian map + propagated segmentation ")
    legend_axes = fig.add_axes([0.93, 0.2, 0.012, 0.55])
    bar = fig.colorbar(shown, cax=legend_axes)
    bar.set_label("Jacobian determinant", fontsize=9)
    bar.ax.tick_params(labelsize=8)

    text = (f"SAMIR Registration — SDlogJ {summary['sdlogj']:.3f}, folding {summary['folding_percent']:.3f} %"
            + (f", mean Dice {summary['dice_before_mean']:.2f} → {summary['dice_after_mean']:.2f}"
               if "dice_after_mean" in summary else "")
            + f", {summary['timings_s']['total']:.0f} s on {summary['device']}")
    fig.text(0.01, 0.95, text, fontsize=11, color="#222222", weight="bold")
    fig.text(0.01, 0.02, "MNI152 T1 (fixed) and a deformed, contrast-changed, noisy copy (moving): samir demo output",
             fontsize=8, color="#444444")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, facecolor=fig.get_facecolor())
    plt.close(fig)


def main() -> int:
    result = Path(sys.argv[1]) if len(sys.argv) > 1 else REPOSITORY / "samir_demo"
    make_icon(ICON)
    if not (result / "summary.json").is_file():
        print(f"no SAMIR result in '{result}': run 'bash scripts/demo.sh' first (icon written: {ICON})")
        return 1
    make_screenshot(result, SCREENSHOT)
    print(f"wrote {ICON} and {SCREENSHOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
