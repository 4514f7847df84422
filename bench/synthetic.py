"""Suites 2 and 3: known smooth warps of real anatomy, and robustness to gamma and noise.

    .venv/bin/python bench/synthetic.py accuracy   [--warps 2] [--methods samir:balanced,demons,elastix,ants-mi]
    .venv/bin/python bench/synthetic.py robustness [--anatomies mni152]

Anatomy (no network access needed):
- MNI152 2009a T1 with its GM/WM maps (nilearn, shipped in the wheel): labels GM = 1, WM = 2.
- Colin27 (``ch2.nii.gz``) with the AAL atlas (116 regions) on the same grid, from Debian's
  ``mricron-data``: found under ``/usr/share/mricron/templates`` when installed, else fetched with
  ``apt-get download mricron-data`` into ``bench/.data`` and unpacked there (said on the console).
Cases are at 2 mm (so that the every-run peers finish in minutes on 2 cores).

A case is the anatomy (fixed) and a copy warped by a known random smooth displacement ``d``
(moving, ``moving(p + d(p)) = fixed(p)``; built with the numerically inverted field), with labels
warped alike. Both images are "acquired" the same way: the 1 mm anatomy (warped, for the moving one)
is averaged over 2×2×2 blocks; the fixed labels take the nearest 1 mm voxel and the moving labels are
the fixed ones warped on the 2 mm grid. Warping the 2 mm image itself would
blur the moving image by an amount that varies with the warp's sub-voxel phase (trilinear
interpolation), a cue that real scans do not carry and that methods sampling on the same grid can lock
onto. Accuracy: Dice and endpoint error (mm, inside the labels) against ``d``.
Robustness (paper Fig. 5): the first warp of each anatomy with gamma ``moving ** g`` and Gaussian
noise of std ``s`` (intensities in [0, 1], clipped) applied to the moving image; Dice against the
strength for every method on one plot, and the Dice loss from clean to the strongest setting.
The warp and acquisition (``smooth_warp``, ``warp_anatomy``, ``save_warped_case``) are shared with
``bench/large_deformation.py`` and ``bench/contrast.py``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_run_arguments, BENCH, Case, evaluate, header, initial_scores, markdown_table, method_name, reused_note, save_case_volumes, write_results  # noqa: E402

DEFAULT_METHODS = "samir:balanced,demons,elastix,ants-mi"
SPACING_MM = 2.0
WARP_MAX_MM = 8.0
GAMMAS = (0.5, 2.0)
NOISES = (0.05, 0.1)
MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")


def find_colin27() -> Path:
    """Folder holding ``ch2.nii.gz`` and ``aal.nii.gz`` (Debian mricron-data), installed or fetched."""
    for folder in (MRICRON_TEMPLATES, BENCH / ".data" / "usr" / "share" / "mricron" / "templates"):
        if (folder / "ch2.nii.gz").exists() and (folder / "aal.nii.gz").exists():
            print(f"Colin27 + AAL: using {folder}", flush=True)
            return folder
    target = BENCH / ".data"
    target.mkdir(parents=True, exist_ok=True)
    print(f"Colin27 + AAL: mricron-data is not installed; fetching the Debian package into {target}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "mricron-data"], cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob("mricron-data_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    return target / "usr" / "share" / "mricron" / "templates"


def _resample(volume, spacing: float, labels: bool):
    import SimpleITK as sitk
    from samir.geometry import from_sitk, to_sitk
    image = to_sitk(volume)
    size = [int(round(n * s / spacing)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    out = sitk.Resample(image, size, sitk.Transform(), sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
                        image.GetOrigin(), [spacing] * 3, image.GetDirection(), 0, image.GetPixelID())
    return from_sitk(out, volume.name)


def load_anatomy(name: str):
    """(image in [0, 1], labels) at 1 mm, cropped to a whole number of 2 mm voxels."""
    from samir.io import read_image, read_labels
    if name == "mni152":
        from samir.demo import load_mni152
        image, labels = load_mni152(1)
    elif name == "colin27":
        folder = find_colin27()
        image = _resample(read_image(folder / "ch2.nii.gz", "colin27"), 1.0, labels=False)
        labels = _resample(read_labels(folder / "aal.nii.gz", "aal"), 1.0, labels=True)
    else:
        raise ValueError(f"unknown anatomy {name}")
    factor = int(SPACING_MM)
    crop = tuple(slice(0, n - n % factor) for n in image.shape)
    array = image.array[crop].astype(np.float32)
    array = np.clip(array / max(float(np.percentile(array, 99.5)), 1e-6), 0, 1)
    # cropping from index 0 keeps the origin
    return replace(image, array=array), replace(labels, array=labels.array[crop].astype(np.int32))


def acquire(image, labels=None):
    """The 2 mm image (2×2×2 block averages of the 1 mm ``image``) and, if given, the ``labels`` on its grid
    (nearest 1 mm voxel; else None)."""
    import SimpleITK as sitk
    from samir.geometry import from_sitk, to_sitk
    factor = int(SPACING_MM)
    shrunk = sitk.BinShrink(to_sitk(image.with_array(image.array.astype(np.float32))), [factor] * 3)
    if labels is None:
        return from_sitk(shrunk, image.name), None
    coarse_labels = sitk.Resample(to_sitk(labels.with_array(labels.array.astype(np.int32))), shrunk, sitk.Transform(),
                                  sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
    return from_sitk(shrunk, image.name), from_sitk(coarse_labels, labels.name)


def inverse_field(u, iterations: int = 30):
    """Displacement ``w`` with ``q + w(q)`` inverting ``p -> p + u(p)`` (fixed-point iteration)."""
    from samir.spatial import warp
    w = -u
    for _ in range(iterations):
        w = -warp(u, w)
    return w


def smooth_warp(shape, spacing_zyx, max_mm: float, seed: int, control_points: int = 6, stretch: float = 1.0,
                region: Optional[np.ndarray] = None):
    """The suites' random smooth displacement ``(1, 3, D, H, W)`` in voxels (``samir.demo``'s lattice generator).

    ``stretch`` > 1 spaces the control points ``stretch`` times farther apart (a smoother field of the same
    largest displacement): the lattice is laid over a grid ``stretch`` times larger and its central window kept.
    ``region`` (boolean, on the grid): the largest displacement inside it is ``max_mm`` (else over the grid)."""
    import torch
    from samir.demo import random_smooth_displacement
    if stretch == 1.0 and region is None:
        return random_smooth_displacement(shape, spacing_zyx, max_mm, control_points=control_points, seed=seed)
    big = [int(round(n * stretch)) for n in shape]
    d = random_smooth_displacement(big, spacing_zyx, max_mm, control_points=control_points, seed=seed)
    start = [(b - n) // 2 for b, n in zip(big, shape)]
    d = d[:, :, start[0]:start[0] + shape[0], start[1]:start[1] + shape[1], start[2]:start[2] + shape[2]]
    length_mm = (d * torch.tensor(np.asarray(spacing_zyx), dtype=d.dtype).view(1, 3, 1, 1, 1)).norm(dim=1)[0]
    largest = length_mm[torch.from_numpy(np.asarray(region, dtype=bool))].max() if region is not None else length_mm.max()
    return (d * (max_mm / largest)).contiguous()


@dataclass
class WarpedAnatomy:
    """An anatomy at 2 mm (fixed) and the 1 mm anatomy under a known warp, before it is acquired at 2 mm."""
    anatomy: str
    seed: int
    fine_image: object  # samir.geometry.Volume, 1 mm
    fine_labels: object  # 1 mm
    image: object  # 2 mm, the fixed image
    labels: object  # 2 mm, the fixed labels
    d: object  # true displacement (1, 3, D, H, W), voxels of the 2 mm grid
    w_fine: object  # its inverse resized to the 1 mm grid (moving = fine image warped by it)
    moved_fine: np.ndarray
    moved_labels: np.ndarray

    def acquired(self, fine_array: Optional[np.ndarray] = None) -> np.ndarray:
        """The moving image at 2 mm: ``fine_array`` (default: the warped 1 mm anatomy) block-averaged."""
        array = self.moved_fine if fine_array is None else fine_array
        return acquire(self.fine_image.with_array(array.astype(np.float32)))[0].array


def warp_anatomy(anatomy: str, seed: int, max_mm: float = WARP_MAX_MM, control_points: int = 6,
                 stretch: float = 1.0, max_inside_labels: bool = False) -> WarpedAnatomy:
    """``anatomy`` warped by :func:`smooth_warp` at 1 mm; ``max_inside_labels``: ``max_mm`` is reached inside the labels."""
    import torch
    from samir.spatial import resize_field, warp
    fine_image, fine_labels = load_anatomy(anatomy)
    image, labels = acquire(fine_image, fine_labels)
    d = smooth_warp(image.shape, image.spacing_zyx, max_mm, seed, control_points, stretch,
                    labels.array > 0 if max_inside_labels else None)
    w = inverse_field(d)
    w_fine = resize_field(w, fine_image.shape)
    moved_fine = warp(torch.from_numpy(fine_image.array)[None, None], w_fine)[0, 0].numpy()
    # the labels are the annotation, not an acquisition: the fixed one warped on its own grid, so that the
    # true field carries one onto the other up to nearest-neighbour sampling only
    moved_labels = warp(torch.from_numpy(labels.array)[None, None], w, mode="nearest")[0, 0].numpy()
    return WarpedAnatomy(anatomy, seed, fine_image, fine_labels, image, labels, d, w_fine, moved_fine, moved_labels)


def save_warped_case(pair: WarpedAnatomy, name: str, moved: np.ndarray, work: Path, description: str) -> Case:
    """Write the fixed image and labels, ``moved`` (the 2 mm moving image), its labels and the true field."""
    from samir.geometry import displacement_zyx_voxels_to_lps
    image, labels = pair.image, pair.labels
    paths = save_case_volumes(work / "cases" / name, image, image.with_array(moved.astype(np.float32)), labels,
                              labels.with_array(pair.moved_labels.astype(np.int32)),
                              displacement_zyx_voxels_to_lps(pair.d[0].numpy(), image))
    return Case(name, paths["fixed"], paths["moving"], paths["fixed_labels"], paths["moving_labels"],
                true_displacement=paths["true_displacement"], description=description)


def apply_gamma_noise(moved: np.ndarray, gamma: float = 1.0, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """``moved ** gamma`` (intensities clipped to [0, 1]), then Gaussian noise of std ``noise``, clipped."""
    if gamma != 1.0:
        moved = np.power(np.clip(moved, 0, 1), gamma)
    if noise > 0:
        moved = np.clip(moved + np.random.default_rng(seed + 1000).normal(0, noise, moved.shape), 0, 1)
    return moved


def make_case(anatomy: str, seed: int, work: Path, gamma: float = 1.0, noise: float = 0.0) -> Case:
    pair = warp_anatomy(anatomy, seed)
    moved = apply_gamma_noise(pair.acquired(), gamma, noise, seed)
    suffix = "" if gamma == 1.0 and noise == 0 else (f"_gamma{gamma:g}" if gamma != 1.0 else f"_noise{noise:g}")
    return save_warped_case(pair, f"{anatomy}_warp{seed}{suffix}", moved, work,
                            f"{anatomy}, warp seed {seed}, max {WARP_MAX_MM:g} mm, gamma {gamma:g}, noise {noise:g}")


ACCURACY_COLUMNS = [("case", "case", 0), ("method", "name", 0), ("Dice", "dice", 3), ("HD95 mm", "hd95_mm", 2),
                    ("EPE mm", "epe_mm", 2), ("EPE 95% mm", "epe_95_mm", 2), ("SDlogJ", "sdlogj", 3),
                    ("folding %", "folding_percent", 4), ("wall s", "wall_s", 1), ("peak RSS MB", "peak_rss_mb", 0)]


def accuracy(args) -> None:
    rows, before = [], []
    for anatomy in args.anatomies.split(","):
        for seed in range(1, args.warps + 1):
            case = make_case(anatomy, seed, args.work)
            before.append({"case": case.name, "name": "before registration", **initial_scores(case)})
            for method in args.methods.split(","):
                print(f"{case.name}: {method_name(method)} ...", flush=True)
                rows.append(evaluate(method, case, args.work, args.threads, reuse_peers=args.reuse_peers))
    ok = [r for r in rows if "error" not in r]
    reused = reused_note(ok)
    summary = []
    for method in args.methods.split(","):
        mine = [r for r in ok if r["method"] == method]
        if mine:
            summary.append({"name": method_name(method), **{k: float(np.mean([r[k] for r in mine]))
                            for k in ("dice", "hd95_mm", "epe_mm", "sdlogj", "folding_percent", "wall_s")},
                            "n": len(mine)})
    summary.insert(0, {"name": "before registration", "n": len(before), **{
        k: float(np.mean([r[k] for r in before])) for k in ("dice", "hd95_mm", "epe_mm")}})
    md = "\n".join([
        header("Suite 2 — known smooth warps of real anatomy (2 mm)", args.threads),
        f"MNI152 (GM/WM) and Colin27 (AAL, 116 regions), {args.warps} random smooth warps each (max {WARP_MAX_MM:g} mm); "
        "Dice over the labels, endpoint error inside them. Mean over the cases:\n",
        markdown_table(summary, [("method", "name", 0), ("cases", "n", 0), ("Dice", "dice", 3), ("HD95 mm", "hd95_mm", 2),
                                 ("EPE mm", "epe_mm", 2), ("SDlogJ", "sdlogj", 3), ("folding %", "folding_percent", 4),
                                 ("wall s", "wall_s", 1)]),
        "", "Per case:", "", markdown_table(before + ok, ACCURACY_COLUMNS), "", *reused,
        *[f"- {r['case']} {r['name']}: error {r['error']}" for r in rows if "error" in r], ""])
    write_results("synthetic_accuracy", md, {"rows": rows, "before": before, "summary": summary}, args.out)


def robustness_plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    anatomies = sorted({r["anatomy"] for r in rows})
    fig, axes = plt.subplots(len(anatomies), 2, figsize=(11, 4 * len(anatomies)), squeeze=False)
    for i, anatomy in enumerate(anatomies):
        for j, (kind, label) in enumerate((("gamma", "gamma applied to the moving image"),
                                           ("noise", "Gaussian noise std (intensities in [0, 1])"))):
            ax = axes[i][j]
            for method in dict.fromkeys(r["method"] for r in rows):
                points = sorted((r["strength"], r["dice"]) for r in rows if r["anatomy"] == anatomy and r["method"] == method
                                and r["kind"] == kind and "dice" in r)
                if points:
                    ax.plot(*zip(*points), marker="o", label=method_name(method))
            ax.set_xlabel(label)
            ax.set_ylabel("Dice")
            ax.set_title(f"{anatomy}: {kind}")
            ax.grid(alpha=0.3)
            if kind == "gamma":
                ax.set_xscale("log", base=2)
                ax.set_xticks([0.5, 1, 2], ["0.5", "1", "2"])
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def robustness(args) -> None:
    rows = []
    methods = args.methods.split(",")
    for anatomy in args.anatomies.split(","):
        settings = [("clean", 1.0, 1.0, 0.0)] + [("gamma", g, g, 0.0) for g in GAMMAS] + \
                   [("noise", s, 1.0, s) for s in NOISES]
        for kind, strength, gamma, noise in settings:
            case = make_case(anatomy, 1, args.work, gamma, noise)
            for method in methods:
                print(f"{case.name}: {method_name(method)} ...", flush=True)
                row = evaluate(method, case, args.work, args.threads, with_hd95=False, reuse_peers=args.reuse_peers)
                rows.append({**row, "anatomy": anatomy, "kind": kind, "strength": strength})
    losses = []
    for anatomy in args.anatomies.split(","):
        for method in methods:
            mine = {(r["kind"], r["strength"]): r.get("dice") for r in rows if r["anatomy"] == anatomy
                    and r["method"] == method}
            clean = mine.get(("clean", 1.0))
            if clean is None:
                continue
            strongest_gamma = [mine.get(("gamma", g)) for g in (GAMMAS[0], GAMMAS[-1])]
            strongest_gamma = [v for v in strongest_gamma if v is not None]
            worst_gamma = min(strongest_gamma) if strongest_gamma else None
            noisiest = mine.get(("noise", NOISES[-1]))
            losses.append({"anatomy": anatomy, "name": method_name(method), "method": method, "clean": clean,
                           "gamma_loss": None if worst_gamma is None else clean - worst_gamma,
                           "noise_loss": None if noisiest is None else clean - noisiest})
    for entry in losses:
        ants = next((e for e in losses if e["anatomy"] == entry["anatomy"] and e["method"] == "ants-mi"), None)
        for kind in ("gamma", "noise"):
            mine, ref = entry[f"{kind}_loss"], ants and ants[f"{kind}_loss"]
            entry[f"{kind}_vs_ants"] = mine / ref if mine is not None and ref and ref > 1e-3 else None
    robustness_plot(_with_clean(rows), args.out / "robustness.png")
    ok = [r for r in rows if "error" not in r]
    reused = reused_note(ok)
    md = "\n".join([
        header("Suite 3 — robustness to intensity changes of the moving image (2 mm)", args.threads),
        f"Warp 1 of each anatomy; gamma {', '.join(map(str, GAMMAS))}; noise std {', '.join(map(str, NOISES))}. "
        "Dice loss = clean Dice minus the Dice at the strongest setting (gamma: the worse of "
        f"{GAMMAS[0]} and {GAMMAS[-1]}; noise: {NOISES[-1]}).\n",
        markdown_table(losses, [("anatomy", "anatomy", 0), ("method", "name", 0), ("clean Dice", "clean", 3),
                                ("Dice loss, gamma", "gamma_loss", 3), ("/ ANTs MI's", "gamma_vs_ants", 2),
                                ("Dice loss, noise", "noise_loss", 3), ("/ ANTs MI's", "noise_vs_ants", 2)]),
        "(a ratio is shown where ANTs MI loses more than 0.001 Dice)",
        "", "![robustness](robustness.png)", "", "All runs:", "",
        markdown_table(ok, [("case", "case", 0), ("method", "name", 0), ("Dice", "dice", 3), ("EPE mm", "epe_mm", 2),
                            ("folding %", "folding_percent", 4), ("wall s", "wall_s", 1)]), "", *reused,
        *[f"- {r['case']} {r['name']}: error {r['error']}" for r in rows if "error" in r], ""])
    write_results("robustness", md, {"rows": rows, "losses": losses}, args.out)


def _with_clean(rows):
    """Rows for the plot: the clean run appears at gamma 1 and at noise 0."""
    out = []
    for r in rows:
        if r["kind"] == "clean":
            out.append(dict(r, kind="gamma", strength=1.0))
            out.append(dict(r, kind="noise", strength=0.0))
        else:
            out.append(r)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=("accuracy", "robustness"))
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--anatomies", default=None, help="default: mni152,colin27 (accuracy), mni152 (robustness)")
    parser.add_argument("--warps", type=int, default=2)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    args.anatomies = args.anatomies or ("mni152,colin27" if args.suite == "accuracy" else "mni152")
    args.out.mkdir(parents=True, exist_ok=True)
    (accuracy if args.suite == "accuracy" else robustness)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
