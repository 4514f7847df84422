"""Pre-alignment suite: the suite-2 pairs with the moving scan moved by its header (rotated and shifted).

    .venv/bin/python bench/alignment.py [--anatomies mni152,colin27] [--degrees 0,5,10,20]
                                        [--methods samir:balanced+align-none,samir:balanced,samir:balanced+align-affine]

Two scans of one patient from two sessions, or of two patients, rarely share a pose: the head is
turned, the table is elsewhere. This suite takes warp 1 of each anatomy of suite 2 (2 mm, known
random smooth warp) and moves the moving image and its labels physically, by rewriting their
header: a rotation of ``D`` degrees about the left-right axis and ``D/2`` about the anterior-posterior
axis, about the image centre, then a shift of ``D * (0.6, -0.5, 0.8)`` mm (5 deg: 5.6 mm, 20 deg:
22 mm). The voxels are untouched, so the only change is where the scan sits. The true field becomes
``x -> M(x + d(x)) - x`` for the rigid move ``M``; Dice and endpoint error are scored as in suite 2.

SAMIR's default is a rigid pre-alignment (``samir:balanced``); ``+align-none`` and ``+align-affine``
select the other ``--alignment`` modes. Peers can be given in ``--methods`` too, but they run here
as in suites 1-3: deformable only (ANTs ``SyNOnly``, elastix B-spline, demons), without the affine
stage one would add for a moved pair.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_run_arguments, Case, evaluate, header, markdown_table, method_dir, method_name, save_case_volumes, write_results  # noqa: E402
import synthetic  # noqa: E402

DEFAULT_METHODS = "samir:balanced+align-none,samir:balanced,samir:balanced+align-affine"
DEFAULT_DEGREES = "0,5,10,20"
SHIFT_MM_PER_DEGREE = np.array([0.6, -0.5, 0.8])


def rigid_move(degrees: float, centre: np.ndarray) -> np.ndarray:
    """4x4 LPS map ``y -> R (y - c) + c + t`` (``degrees`` about x, half of it about y)."""
    a, b = np.radians(degrees), np.radians(degrees / 2)
    about_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    about_y = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rotation = about_y @ about_x
    move = np.eye(4)
    move[:3, :3] = rotation
    move[:3, 3] = centre - rotation @ centre + degrees * SHIFT_MM_PER_DEGREE
    return move


def moved_volume(volume, move: np.ndarray):
    """The same voxels placed by ``move``: new direction ``R D``, new origin ``M(origin)``."""
    origin = move[:3, :3] @ np.asarray(volume.origin) + move[:3, 3]
    return replace(volume, origin=tuple(origin), direction=move[:3, :3] @ volume.direction)


def make_moved_case(base: Case, degrees: float, work: Path) -> Case:
    """``base`` (a suite-2 case) with its moving scan and labels moved ``degrees`` by their header."""
    import SimpleITK as sitk
    from samir.geometry import index_to_world, world_points_of_grid
    from samir.io import read_image, read_labels
    fixed, moving = read_image(base.fixed, "fixed"), read_image(base.moving, "moving")
    fixed_labels, moving_labels = read_labels(base.fixed_labels, "fixed"), read_labels(base.moving_labels, "moving")
    centre_index = np.r_[(np.array(moving.shape[::-1]) - 1) / 2.0, 1.0]
    move = rigid_move(degrees, (index_to_world(moving) @ centre_index)[:3])
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(base.true_displacement))).astype(np.float64)
    target = world_points_of_grid(fixed) + truth  # where each fixed voxel's anatomy sits in the moving scan
    moved_truth = target @ move[:3, :3].T + move[:3, 3] - world_points_of_grid(fixed)
    name = f"{base.name}_moved{degrees:g}deg"
    paths = save_case_volumes(work / "cases" / name, fixed, moved_volume(moving, move), fixed_labels,
                              moved_volume(moving_labels, move), moved_truth)
    return Case(name, paths["fixed"], paths["moving"], paths["fixed_labels"], paths["moving_labels"],
                true_displacement=paths["true_displacement"],
                description=f"{base.description}; moving scan moved {degrees:g} deg / "
                            f"{np.linalg.norm(degrees * SHIFT_MM_PER_DEGREE):.1f} mm by its header")


def alignment_found(work: Path, case: Case, method: str) -> dict:
    summary = method_dir(work, case, method) / "summary.json"
    if not method.startswith("samir") or not summary.exists():
        return {}
    data = json.loads(summary.read_text())
    alignment = data.get("alignment", {})
    return {"alignment_used": alignment.get("used"), "rotation_found_deg": alignment.get("rotation_deg"),
            "align_s": data["timings_s"].get("align")}


def alignment_plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    anatomies = sorted({r["anatomy"] for r in rows})
    fig, axes = plt.subplots(1, len(anatomies), figsize=(5.5 * len(anatomies), 4), squeeze=False)
    for ax, anatomy in zip(axes[0], anatomies):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = sorted((r["degrees"], r["dice"]) for r in rows if r["anatomy"] == anatomy
                            and r["method"] == method and "dice" in r)
            if points:
                ax.plot(*zip(*points), marker="o", label=method_name(method))
        ax.set_xlabel("moving scan rotated by (degrees; shifted 1.1 mm per degree)")
        ax.set_ylabel("Dice")
        ax.set_title(anatomy)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--anatomies", default="mni152,colin27")
    parser.add_argument("--degrees", default=DEFAULT_DEGREES)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    degrees = [float(d) for d in args.degrees.split(",")]
    rows = []
    for anatomy in args.anatomies.split(","):
        base = synthetic.make_case(anatomy, 1, args.work)
        for angle in degrees:
            case = make_moved_case(base, angle, args.work)
            for method in methods:
                print(f"{case.name}: {method_name(method)} ...", flush=True)
                row = evaluate(method, case, args.work, args.threads, with_hd95=False, reuse_peers=args.reuse_peers)
                rows.append({**row, **alignment_found(args.work, case, method), "anatomy": anatomy, "degrees": angle,
                             "shift_mm": float(np.linalg.norm(angle * SHIFT_MM_PER_DEGREE))})
    ok = [r for r in rows if "error" not in r]
    pivot = []
    for anatomy in args.anatomies.split(","):
        for method in methods:
            entry = {"anatomy": anatomy, "name": method_name(method)}
            for angle in degrees:
                mine = [r for r in ok if r["anatomy"] == anatomy and r["method"] == method and r["degrees"] == angle]
                entry[f"dice_{angle:g}"] = mine[0]["dice"] if mine else None
            pivot.append(entry)
    alignment_plot(ok, args.out / "alignment.png")
    md = "\n".join([
        header("Pre-alignment — the suite-2 pairs with the moving scan rotated and shifted (2 mm)", args.threads),
        f"Warp 1 of each anatomy; the moving scan and its labels moved by their header: D degrees about x, D/2 "
        f"about y, about the image centre, and shifted D × {tuple(SHIFT_MM_PER_DEGREE.tolist())} mm "
        "(`bench/alignment.py`). Dice over the labels:\n",
        markdown_table(pivot, [("anatomy", "anatomy", 0), ("method", "name", 0)] +
                       [(f"{angle:g}° / {np.linalg.norm(angle * SHIFT_MM_PER_DEGREE):.0f} mm", f"dice_{angle:g}", 3)
                        for angle in degrees]),
        "", "![alignment](alignment.png)", "", "All runs (rotation found: the angle of the fitted map's rotation):", "",
        markdown_table(ok, [("case", "case", 0), ("method", "name", 0), ("Dice", "dice", 3), ("EPE mm", "epe_mm", 2),
                            ("initial EPE mm", "initial_epe_mm", 1), ("rotation found °", "rotation_found_deg", 1),
                            ("folding %", "folding_percent", 4), ("align s", "align_s", 1), ("wall s", "wall_s", 1)]),
        "", *[f"- {r['case']} {r['name']}: error {r['error']}" for r in rows if "error" in r], ""])
    write_results("alignment", md, {"rows": rows, "pivot": pivot}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
