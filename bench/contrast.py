"""Contrast suite: the moving image in another MR contrast than the fixed T1, SAMIR against the peers.

    .venv/bin/python bench/contrast.py [--parts brain,templates] [--maps same,t2like,pdlike,flairlike]
                                       [--tissue-maps same,t2like,pdlike] [--anatomies mni152,colin27]
                                       [--methods samir:balanced,samir:balanced+image-only,ants-mi,elastix,demons]

Part ``brain`` — the real inter-subject pair of suite 1 (``bench/brain_pair.py``: subject B -> subject A,
30 labels; skipped with a message when ``../shared/data/brain-pair`` is absent) with subject B
re-contrasted by the named maps of ``bench/contrasts.py`` (T1 intensity -> T2-like, PD-like, FLAIR-like,
each with that module's default smooth bias field and noise, one seed for every map so that only the map
differs). ``same`` is subject B unchanged, the reference every drop is measured from.

Part ``templates`` — warp 1 of suite 2's MNI152 and Colin27 pairs (2 mm, known field,
``bench/synthetic.py``) with the moving image re-contrasted per tissue (``recontrast_by_tissue``):
each tissue moved to a new mean intensity, keeping its texture, on the warped 1 mm anatomy before it is
block-averaged to 2 mm; then the default bias field and noise at 2 mm. Tissues: MNI152 GM = 1, WM = 2 (its
probability maps), every other brain voxel (CSF, partial volumes) = 3; Colin27: inside its brain mask
(``ch2bet`` or an AAL region) three intensity classes (darkest = 3, middle = GM, brightest = WM); the head
outside the brain keeps its T1 intensities. ``t2like`` reverses T1's order (CSF > GM > WM), ``pdlike``
scrambles it (GM > CSF > WM). These anatomies are in-distribution for the trained feature head (it is
trained on MNI152 and Colin27); the brain pair's subjects are not.

Methods: SAMIR's default (``samir:balanced``), its image-only variant (``+image-only``; both variants'
arguments live in ``harness.SAMIR_OPTIONS``), ANTs SyN MI, elastix MI and demons. Dice per map, the drop
from the same-contrast Dice, whether the default is above ANTs MI on every map, wall time.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Case, add_run_arguments, evaluate, fmt, header, markdown_table, method_name, reused_note, write_results  # noqa: E402
import brain_pair  # noqa: E402
import synthetic  # noqa: E402
from contrasts import recontrast, recontrast_by_tissue  # noqa: E402

DEFAULT_METHODS = "samir:balanced,samir:balanced+image-only,ants-mi,elastix,demons"
DEFAULT_METHOD, REFERENCE_PEER = "samir:balanced", "ants-mi"
SAME = "same"
BRAIN_MAPS = (SAME, "t2like", "pdlike", "flairlike")
GM, WM, CSF_OTHER = 1, 2, 3
# tissue means on the [0, 1] scale of the normalised T1 (where CSF < GM < WM)
TISSUE_MEANS = {
    "t2like": {CSF_OTHER: 0.9, GM: 0.6, WM: 0.35},
    "pdlike": {GM: 0.9, CSF_OTHER: 0.7, WM: 0.5},
}
TISSUE_MAPS = (SAME,) + tuple(TISSUE_MEANS)
SEED = 1
IN_DISTRIBUTION = "in-distribution"  # for the feature head, trained on MNI152 and Colin27
UNSEEN = "unseen subjects"


def brain_contrast_case(contrast: str, work: Path, seed: int = SEED) -> Case:
    """Suite 1's pair with subject B (moving) under the named contrast map (``same``: unchanged)."""
    base = brain_pair.brain_case()
    if contrast == SAME:
        return base
    from samir.io import read_image, write_volume
    moving = read_image(base.moving, "moving")
    # the pair is skull-stripped: its foreground (image > 0) is the head, and the background stays 0
    array = recontrast(moving.array, contrast, mask=moving.array > 0, seed=seed)
    path = work / "cases" / f"brain_pair_{contrast}" / "moving.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_volume(moving.with_array(array), path)
    return replace(base, name=f"brain_pair_{contrast}", moving=path, description=f"{base.description}; subject B "
                   f"{contrast}-contrasted (bias and noise at their defaults)")


def intensity_classes(image: np.ndarray, mask: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Three intensity classes inside ``mask`` (1-D k-means): darkest ``CSF_OTHER``, then ``GM``, brightest ``WM``."""
    values = image[mask].astype(np.float64)
    centres = np.percentile(values, [10, 50, 90])
    for _ in range(iterations):
        nearest = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
        centres = np.array([values[nearest == k].mean() if (nearest == k).any() else centres[k] for k in range(3)])
    order = np.argsort(centres)
    nearest = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
    out = np.zeros(image.shape, dtype=np.int32)
    out[mask] = np.array([CSF_OTHER, GM, WM])[np.argsort(order)][nearest]
    return out


def colin27_brain(shape: Sequence[int]) -> np.ndarray:
    """Colin27's brain mask (``ch2bet`` > 0) on the 1 mm grid of ``synthetic.load_anatomy('colin27')``."""
    from samir.io import read_image
    bet = synthetic._resample(read_image(synthetic.find_colin27() / "ch2bet.nii.gz", "ch2bet"), 1.0, labels=False)
    return bet.array[tuple(slice(0, n) for n in shape)] > 0


def tissue_labels(anatomy: str, image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """GM / WM / other-brain labels of a 1 mm anatomy (0 outside the brain)."""
    if anatomy == "mni152":  # GM = 1, WM = 2 already; the template is skull-stripped
        return np.where((labels == 0) & (image > 0), CSF_OTHER, labels).astype(np.int32)
    if anatomy == "colin27":  # AAL names regions, not tissues: classes by intensity inside the brain
        return intensity_classes(image, colin27_brain(image.shape) | (labels > 0))
    raise ValueError(f"no tissue labels for {anatomy}")


def tissue_contrast_cases(anatomy: str, maps: Sequence[str], work: Path, seed: int = SEED) -> Dict[str, Case]:
    """Suite 2's warp ``seed`` of ``anatomy`` with the moving image re-contrasted per tissue, by map name
    (``same``: suite 2's case itself, so that ``--reuse-peers`` finds suite 2's peer outputs)."""
    import torch
    from samir.spatial import warp
    cases = {SAME: synthetic.make_case(anatomy, seed, work)} if SAME in maps else {}
    other = [m for m in maps if m != SAME]
    if not other:
        return cases
    pair = synthetic.warp_anatomy(anatomy, seed)
    tissues = tissue_labels(anatomy, pair.fine_image.array, pair.fine_labels.array)
    moved_tissues = warp(torch.from_numpy(tissues)[None, None], pair.w_fine, mode="nearest")[0, 0].numpy()
    for name in other:
        # the tissue map on the warped 1 mm anatomy (partial volumes then come from the acquisition, as in a
        # scanner); bias field and noise on the acquired 2 mm image (no tissue moved: an empty map)
        fine = recontrast_by_tissue(pair.moved_fine, moved_tissues, TISSUE_MEANS[name], bias=0.0, noise=0.0)
        coarse = pair.acquired(fine)
        moved = recontrast_by_tissue(coarse, np.zeros(coarse.shape, np.int32), {}, seed=seed)
        means = ", ".join(f"{label} {mean:g}" for label, mean in TISSUE_MEANS[name].items())
        cases[name] = synthetic.save_warped_case(
            pair, f"{anatomy}_warp{seed}_{name}_tissue", moved, work,
            f"{anatomy}, warp seed {seed}, max {synthetic.WARP_MAX_MM:g} mm; moving tissue means {means} "
            f"(GM {GM}, WM {WM}, other brain {CSF_OTHER}), default bias and noise")
    return cases


def contrast_table(rows: Sequence[dict], data_sets: Sequence[str], maps: Sequence[str],
                   methods: Sequence[str]) -> List[dict]:
    """One row per data set and method: Dice per map with its drop from the same-contrast Dice."""
    table = []
    for data in data_sets:
        dice = {(r["method"], r["contrast"]): r["dice"] for r in rows if r["data"] == data and "dice" in r}
        changed = [m for m in maps if m != SAME]
        for method in methods:
            reference = dice.get((method, SAME))
            entry = {"data": data, "distribution": next(r["distribution"] for r in rows if r["data"] == data),
                     "name": method_name(method), SAME: reference, "verdict": ""}
            drops = []
            for m in changed:
                value = dice.get((method, m))
                drop = None if value is None or reference is None else reference - value
                drops.append(drop)
                entry[m] = fmt(value) + ("" if drop is None else f" ({drop:.3f})")
            known = [d for d in drops if d is not None]
            entry["worst_drop"] = max(known) if known else None
            walls = [r["wall_s"] for r in rows if r["data"] == data and r["method"] == method and "wall_s" in r]
            entry["wall_s"] = float(np.mean(walls)) if walls else None
            if method == DEFAULT_METHOD:
                entry["verdict"] = above_reference(dice, changed)
            table.append(entry)
    return table


def above_reference(dice: dict, maps: Sequence[str]) -> str:
    """Whether the default's Dice is above ANTs MI's on every re-contrasted map (``n/a`` when one is missing)."""
    pairs = [(m, dice.get((DEFAULT_METHOD, m)), dice.get((REFERENCE_PEER, m))) for m in maps]
    if not pairs or any(ours is None or ants is None for _, ours, ants in pairs):
        return "n/a"
    below = [m for m, ours, ants in pairs if ours <= ants]
    return "yes" if not below else "no (" + ", ".join(below) + ")"


def render(rows: Sequence[dict], parts: Sequence[tuple], methods: Sequence[str], threads: int, notes: List[str]) -> str:
    """``parts``: (title, data sets, maps) per table."""
    ok = [r for r in rows if "error" not in r]
    reused = reused_note(ok)
    sections = []
    for title, data_sets, maps in parts:
        changed = [m for m in maps if m != SAME]
        columns = [("data", "data", 0), ("feature head", "distribution", 0), ("method", "name", 0),
                   ("same contrast", SAME, 3)] + [(f"{m} (drop)", m, 0) for m in changed] + \
                  [("worst drop", "worst_drop", 3), (f"default above {method_name(REFERENCE_PEER)} on every map",
                                                     "verdict", 0), ("wall s (mean)", "wall_s", 1)]
        sections += [f"### {title}", "", markdown_table(contrast_table(ok, data_sets, maps, methods), columns), ""]
    return "\n".join([
        header("Contrast — the moving image in another MR contrast", threads),
        "Dice per contrast map of the moving image; in brackets the drop from the same-contrast Dice of that method. "
        f"Feature head: `{IN_DISTRIBUTION}` = anatomies the trained feature head was trained on (MNI152, Colin27). "
        f"Default = {method_name(DEFAULT_METHOD)}.\n", *notes, "", *sections, "All runs:", "",
        markdown_table(ok, [("case", "case", 0), ("method", "name", 0), ("Dice", "dice", 3), ("EPE mm", "epe_mm", 2),
                            ("SDlogJ", "sdlogj", 3), ("folding %", "folding_percent", 4), ("wall s", "wall_s", 1)]),
        "", *reused, *[f"- {r['case']} {r['name']}: error {r['error']}" for r in rows if "error" in r], ""])


def build_cases(args, notes: List[str]) -> List[tuple]:
    """(case, data set, contrast, distribution) for every part asked for."""
    parts = args.parts.split(",")
    out = []
    if "brain" in parts:
        if brain_pair.DATA.exists():
            out += [(brain_contrast_case(m, args.work), "brain pair", m, UNSEEN) for m in args.maps.split(",")]
        else:
            notes.append(f"- Part `brain` skipped: the brain pair is not at {brain_pair.DATA} (`SAMIR_BRAIN_PAIR`).")
            print(notes[-1][2:], flush=True)
    if "templates" in parts:
        maps = args.tissue_maps.split(",")
        for anatomy in args.anatomies.split(","):
            cases = tissue_contrast_cases(anatomy, maps, args.work)
            out += [(case, f"{anatomy} warp {SEED}", m, IN_DISTRIBUTION) for m, case in cases.items()]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--parts", default="brain,templates")
    parser.add_argument("--maps", default=",".join(BRAIN_MAPS), help="brain part: same and maps of bench/contrasts.py")
    parser.add_argument("--tissue-maps", default=",".join(TISSUE_MAPS),
                        help=f"templates part: {', '.join(TISSUE_MAPS)}")
    parser.add_argument("--anatomies", default="mni152,colin27")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    notes: List[str] = []
    rows = []
    for case, data, contrast, distribution in build_cases(args, notes):
        for method in methods:
            print(f"{case.name}: {method_name(method)} ...", flush=True)
            row = evaluate(method, case, args.work, args.threads, with_hd95=False, reuse_peers=args.reuse_peers)
            rows.append({**row, "data": data, "contrast": contrast, "distribution": distribution})
    parts = []
    if any(r["distribution"] == UNSEEN for r in rows):
        parts.append(("Real brain pair, subject B re-contrasted (maps of `bench/contrasts.py`)", ["brain pair"],
                      args.maps.split(",")))
    templates = list(dict.fromkeys(r["data"] for r in rows if r["distribution"] == IN_DISTRIBUTION))
    if templates:
        parts.append(("Known warps of MNI152 and Colin27, moving image re-contrasted per tissue", templates,
                      args.tissue_maps.split(",")))
    md = render(rows, parts, methods, args.threads, notes)
    write_results("contrast", md, {"rows": rows, "tissue_means": TISSUE_MEANS, "notes": notes}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
