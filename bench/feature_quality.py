"""Feature quality: do descriptors of corresponding voxels agree across contrasts? (the gate for feature work)

    .venv/bin/python bench/feature_quality.py [--head PATH] [--maps t2like,pdlike,flairlike,inverted,gamma]
                                              [--subjects A,B] [--points 2000] [--radius 3]

A case is a subject's T1 (fixed) and a copy pulled through a known random smooth displacement (up to
8 mm) and re-contrasted by a map of ``bench/contrasts.py`` with its bias field and noise (moving). For
foreground voxels of the fixed image on a lattice one feature cell apart (the encoder's in-plane
feature spacing), each descriptor is compared with the moving image's descriptors at the true
corresponding point and at every offset of whole feature cells within ``--radius`` cells (a
(2r+1)^3 neighbourhood, chance = 1 / (2r+1)^3): **localisation** is the share of points whose best
match (cosine) is the true point; **offset** is the mean distance of the best match from it, in cells.

Descriptors, all sampled at the same points:
- ``raw``: the frozen encoder's features (LiteMedSAM, 256 channels), centred per image;
- ``pca24``: the same reduced by a PCA fitted jointly on both images (what ``--features`` used);
- ``head``: the trained SAFE head (``--head``, default the shipped one);
- ``mind``: MIND-SSC of the image at 2 mm (the registration's contrast-robust similarity);
- ``patch``: zero-mean, unit-norm 5x5x5 intensity patches with half-cell spacing (needs the contrast's sign);
- ``head+mind``: both, each unit length, concatenated (equal weight).

Subjects: the real brain pair's subjects A and B (``../shared/data/brain-pair``), never used to train the
head. Without that folder the MNI152 template is used instead and the table says it is in-distribution.
Writes ``bench/results/feature_quality.{md,json}``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from brain_pair import DATA  # noqa: E402
from contrasts import recontrast  # noqa: E402
from harness import header, markdown_table, write_results  # noqa: E402
from samir.spatial import sample_at_points  # noqa: E402

DESCRIPTORS = ("raw", "pca24", "head", "mind", "patch", "head+mind")
WARP_MAX_MM = 8.0


def load_subjects(names):
    """``{name: (image (D, H, W) in [0, 1], spacing, in_distribution)}``."""
    from samir.io import read_image
    if (DATA / "subjectA_t1.nii.gz").exists():
        out = {}
        for name in names:
            image = read_image(DATA / f"subject{name}_t1.nii.gz", f"subject {name}")
            out[f"subject{name}"] = (np.clip(image.array.astype(np.float32), 0, None), image.spacing, False)
        return out
    print(f"{DATA} is absent: using the MNI152 template (in-distribution for the head)", flush=True)
    from samir.demo import load_mni152
    image, _ = load_mni152(1)
    return {"mni152": (image.array.astype(np.float32), image.spacing, True)}


def make_case(image: np.ndarray, spacing, contrast: str, seed: int):
    """(moving image, w): moving(q) = contrast(image(q + u(q))); fixed p is found at q = p + w(p) (voxels)."""
    from synthetic import inverse_field
    from samir.demo import random_smooth_displacement
    from samir.spatial import warp
    u = random_smooth_displacement(image.shape, spacing, max_mm=WARP_MAX_MM, seed=seed)
    warped = warp(torch.from_numpy(image)[None, None], u)[0, 0].numpy()
    moving = recontrast(warped, contrast, mask=warped > 0.02, seed=seed)
    return moving, inverse_field(u)


def lattice_points(image: np.ndarray, cell: float, count: int, rng) -> torch.Tensor:
    axes = [np.arange(cell, n - cell, cell) for n in image.shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    inside = image[tuple(np.round(grid).astype(int).T)] > 0.05
    grid = grid[inside]
    return torch.from_numpy(grid[rng.choice(len(grid), min(count, len(grid)), replace=False)].astype(np.float32))


def offsets(radius: int) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).view(-1, 3)


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def dense_describer(volume: torch.Tensor, factor: float):
    """Descriptors from a dense ``(1, C, D/f, H/f, W/f)`` volume computed on a grid ``factor`` times coarser."""
    return lambda points: unit(sample_at_points(volume, (points + 0.5) / factor - 0.5))


def mind_describer(image: np.ndarray, spacing):
    from samir.losses import mind_ssc
    factor = max(1, int(round(2.0 / min(spacing))))
    coarse = F.avg_pool3d(torch.from_numpy(image)[None, None], factor) if factor > 1 else torch.from_numpy(image)[None, None]
    return dense_describer(mind_ssc(coarse), factor)


def patch_describer(image: np.ndarray, cell: float):
    from samir.spatial import gaussian_smooth
    smooth = gaussian_smooth(torch.from_numpy(image)[None, None], cell / 4)
    grid = offsets(2) * cell / 2

    def describe(points):
        values = sample_at_points(smooth, (points[:, None] + grid[None]).view(-1, 3)).view(len(points), -1)
        return unit(values - values.mean(1, keepdim=True))
    return describe


def feature_describer(features, centre: bool):
    from samir.features import sample_features_at

    def describe(points):
        values = sample_features_at(features, points)
        return unit(values - values.mean(0, keepdim=True) if centre else values)
    return describe


def describers(fixed: np.ndarray, moving: np.ndarray, spacing, encoder, head) -> tuple:
    """``({name: (fixed fn, moving fn)}, cell in voxels, encoder seconds)``; each fn maps points ``(P, 3)``
    to unit descriptors ``(P, C)``."""
    from samir.features import fit_channel_reduction, reduce_channels
    from samir.head_training import encode_view
    from samir.safe_head import apply_head
    start = time.perf_counter()
    encoded = [encode_view(image, spacing, encoder, torch.device("cpu")) for image in (fixed, moving)]
    seconds = time.perf_counter() - start
    reduction = fit_channel_reduction(encoded, 24)
    out = {"raw": [feature_describer(fs, True) for fs in encoded],
           "pca24": [feature_describer(reduce_channels(fs, reduction), True) for fs in encoded],
           "mind": [mind_describer(image, spacing) for image in (fixed, moving)]}
    cell = encoded[0].padded_size / encoded[0].features.shape[-1]
    out["patch"] = [patch_describer(image, cell) for image in (fixed, moving)]
    if head is not None:
        out["head"] = [feature_describer(apply_head(fs, head), False) for fs in encoded]
        out["head+mind"] = [(lambda p, h=h, m=m: unit(torch.cat([h(p), m(p)], 1))) for h, m in zip(out["head"], out["mind"])]
    return out, cell, seconds


def localisation(describe_fixed, describe_moving, points, targets, cell: float, radius: int, chunk: int = 200) -> dict:
    """Share of points whose best match among the offsets is the true point, and the mean offset (cells)."""
    grid = offsets(radius)
    centre = int((grid.abs().sum(1) == 0).nonzero())
    exact, distance = [], []
    for start in range(0, len(points), chunk):
        p, q = points[start:start + chunk], targets[start:start + chunk]
        f = describe_fixed(p)
        m = describe_moving((q[:, None] + grid[None] * cell).view(-1, 3)).view(len(p), len(grid), -1)
        best = (f[:, None] * m).sum(-1).argmax(1)
        exact.append(best == centre)
        distance.append(grid[best].norm(dim=1))
    return {"localisation": float(torch.cat(exact).float().mean()), "offset_cells": float(torch.cat(distance).mean())}


def run_case(image, spacing, contrast: str, seed: int, encoder, head, args) -> dict:
    moving, w = make_case(image, spacing, contrast, seed)
    described, cell, seconds = describers(image, moving, spacing, encoder, head)
    rng = np.random.default_rng(seed)
    points = lattice_points(image, cell, args.points, rng)
    targets = points + sample_at_points(w, points)
    scores = {name: localisation(*pair, points, targets, cell, args.radius) for name, pair in described.items()}
    return {"contrast": contrast, "points": len(points), "cell_voxels": cell, "encoder_s": seconds, "scores": scores}


def table(rows, descriptors, contrasts) -> str:
    lines = []
    for row_key in descriptors:
        line = {"descriptor": row_key}
        for contrast in contrasts:
            values = [r["scores"][row_key]["localisation"] for r in rows if r["contrast"] == contrast and row_key in r["scores"]]
            line[contrast] = 100 * float(np.mean(values)) if values else None
        present = [line[c] for c in contrasts if line[c] is not None]
        line["mean"] = float(np.mean(present)) if present else None
        offsets_ = [r["scores"][row_key]["offset_cells"] for r in rows if row_key in r["scores"]]
        line["offset"] = float(np.mean(offsets_)) if offsets_ else None
        lines.append(line)
    columns = [("descriptor", "descriptor", 0)] + [(f"{c} %", c, 1) for c in contrasts] + [
        ("mean %", "mean", 1), ("mean offset (cells)", "offset", 2)]
    return markdown_table(lines, columns)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", type=Path, help="SAFE head file (default: the shipped head)")
    parser.add_argument("--maps", default="t2like,pdlike,flairlike,inverted,gamma")
    parser.add_argument("--subjects", default="A,B")
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--radius", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from samir.encoders import build_encoder
    from samir.safe_head import load_head
    encoder = build_encoder("litemedsam")
    head = load_head(args.head)[0] if args.head or _shipped() else None
    contrasts = args.maps.split(",")
    rows = []
    for subject, (image, spacing, in_distribution) in load_subjects(args.subjects.split(",")).items():
        for seed, contrast in enumerate(contrasts, start=1):
            row = run_case(image, spacing, contrast, seed, encoder, head, args)
            row.update(subject=subject, in_distribution=in_distribution)
            rows.append(row)
            print(subject, contrast, {k: round(v["localisation"] * 100, 1) for k, v in row["scores"].items()}, flush=True)
    descriptors = [d for d in DESCRIPTORS if any(d in r["scores"] for r in rows)]
    subjects = sorted({r["subject"] for r in rows})
    markdown = "\n".join([
        header("Feature quality — localisation across contrast", args.threads),
        f"Subjects {', '.join(subjects)}{' (in-distribution for the head)' if rows[0]['in_distribution'] else ' (never seen by the head)'};"
        f" {rows[0]['points']} points per case, one feature cell = {rows[0]['cell_voxels']:.2f} voxels;"
        f" search radius {args.radius} cells (chance {100 / (2 * args.radius + 1) ** 3:.2f} %); head"
        f" {args.head or 'shipped'}. Localisation % (best match at the true point), mean over subjects:", "",
        table(rows, descriptors, contrasts), ""])
    write_results(f"feature_quality{args.tag}", markdown, {"rows": rows, "args": vars(args) | {"head": str(args.head)}})
    return 0


def _shipped() -> bool:
    from samir.safe_head import SHIPPED_HEAD, SHIPPED_HEAD_SHA256
    return SHIPPED_HEAD.is_file() and SHIPPED_HEAD_SHA256 is not None


if __name__ == "__main__":
    sys.exit(main())
