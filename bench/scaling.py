"""Suite 4: time per stage and peak memory against volume size.

    .venv/bin/python bench/scaling.py [--sizes acdc,brain,abdomen] [--device cpu|cuda] [--threads 2]

Sizes (z, y, x voxels):
- ``acdc``: 16 x 128 x 128 at 10 x 1.8 x 1.8 mm, dipy's ``S0_10slices`` (a real 128 x 128 x 10
  diffusion b0 volume) resampled to the ACDC cine grid;
- ``brain``: 224 x 192 x 160 at 1 mm, the brain pair (or MNI152 1 mm resampled when it is absent);
- ``abdomen``: 256 x 160 x 192 (Learn2Reg AbdomenCTCT's grid), Colin27's head resampled to fill it
  (abdominal CT is not available here; the cost depends on the grid, not on the anatomy).
The moving image is the fixed one under a known smooth warp (``bench/synthetic.py``), so every size
has a real registration to do. Each configuration runs through ``samir register`` in its own
process: zero-shot with the ``fast`` and ``balanced`` presets, and the trained-network mode with a
network of the default architecture (LiteMedSAM encoder, head, 5-level PDFP) whose weights are
random — its timings and memory are those of a trained one; its accuracy is not reported.
Stages: read, resample, encoder, network (head + pyramid forward), optimise, write; peak host RSS and,
on a GPU, peak device memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_run_arguments, Case, header, markdown_table, run_method, save_case_volumes, write_results  # noqa: E402
from synthetic import WARP_MAX_MM, find_colin27, inverse_field  # noqa: E402

SIZES = {  # name: (shape zyx, spacing zyx mm)
    "acdc": ((16, 128, 128), (10.0, 1.8, 1.8)),
    "brain": ((224, 192, 160), (1.0, 1.0, 1.0)),
    "abdomen": ((256, 160, 192), (2.0, 2.0, 2.0)),
}
BRAIN_PAIR = Path(os.environ.get("SAMIR_BRAIN_PAIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-pair"))


def source_image(size: str):
    from samir.io import read_image
    if size == "acdc":
        import dipy
        import nibabel
        from samir.geometry import Volume
        # its affine is not orthonormal (SimpleITK refuses it); the voxel grid and spacing are what matter here
        image = nibabel.load(Path(dipy.__file__).parent / "data" / "files" / "S0_10slices.nii.gz")
        data = np.asarray(image.get_fdata(), dtype=np.float32).reshape(image.shape[:3])  # (128, 128, 10, 1)
        # its third zoom (53 mm) is the b-value table's, not a slice distance: take 10 mm, like cine MRI
        spacing = tuple(float(z) for z in image.header.get_zooms()[:2]) + (10.0,)
        return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)), spacing=spacing, name="dipy S0")
    if size == "brain" and (BRAIN_PAIR / "subjectA_t1.nii.gz").exists():
        return read_image(BRAIN_PAIR / "subjectA_t1.nii.gz", "brain")
    if size == "brain":
        from samir.demo import load_mni152
        return load_mni152(1)[0]
    return read_image(find_colin27() / "ch2.nii.gz", "colin27")


def fit_to_grid(volume, shape_zyx, spacing_zyx):
    """Resample ``volume`` onto a grid of that shape and spacing centred on its own centre."""
    import SimpleITK as sitk
    from samir.geometry import from_sitk, to_sitk
    image = to_sitk(volume)
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    size, spacing = list(shape_zyx[::-1]), list(spacing_zyx[::-1])
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    origin = np.asarray(centre) - direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2)
    out = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin.tolist(), spacing,
                        image.GetDirection(), 0.0, sitk.sitkFloat32)
    return from_sitk(out, volume.name)


def make_size_case(size: str, work: Path, reuse: bool = False) -> Case:
    """The size's fixed/moving pair under ``work/scaling/SIZE`` (``reuse``: keep one already written there, e.g.
    copied to a GPU machine that lacks the source images' packages)."""
    import torch
    from samir.demo import random_smooth_displacement
    from samir.spatial import warp
    shape, spacing = SIZES[size]
    description = f"{'x'.join(map(str, shape))} voxels at {'x'.join(f'{s:g}' for s in spacing)} mm"
    case_dir = work / "scaling" / size
    if reuse and (case_dir / "fixed.nii.gz").exists() and (case_dir / "moving.nii.gz").exists():
        print(f"{size}: reusing the pair in {case_dir}", flush=True)
        return Case(f"scaling_{size}", case_dir / "fixed.nii.gz", case_dir / "moving.nii.gz", description=description)
    fixed = fit_to_grid(source_image(size), shape, spacing)
    array = fixed.array.astype(np.float32)
    fixed = fixed.with_array(np.clip(array / max(float(np.percentile(array, 99.5)), 1e-6), 0, 1))
    d = random_smooth_displacement(fixed.shape, fixed.spacing_zyx, WARP_MAX_MM, control_points=6, seed=1)
    moved = warp(torch.from_numpy(fixed.array)[None, None], inverse_field(d))[0, 0].numpy()
    paths = save_case_volumes(case_dir, fixed, fixed.with_array(moved))
    return Case(f"scaling_{size}", paths["fixed"], paths["moving"], description=description)


def random_network(path: Path) -> Path:
    """A checkpoint of the default architecture with random weights (for timing only)."""
    import torch
    from samir.features import ChannelReduction
    from samir.checkpoint import ModelConfig, build_network, save_model
    if path.exists():
        return path
    config = ModelConfig(training_data="random weights: timing only (bench/scaling.py)")
    torch.manual_seed(0)
    net = build_network(config)
    g = torch.Generator().manual_seed(1)
    reduction = ChannelReduction(torch.zeros(config.encoder_channels),
                                 torch.randn(config.encoder_channels, config.feature_channels, generator=g) / 16)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_model(path, net, config, reduction)


STAGES = ("read", "align", "resample", "encoder", "network", "optimise", "write")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="acdc,brain,abdomen")
    parser.add_argument("--configs", default="samir:fast,samir:balanced,network",
                        help="samir:PRESET (zero-shot) and/or network (random-weight default network)")
    parser.add_argument("--device", default="cpu")
    add_run_arguments(parser, reuse_peers=False)
    parser.add_argument("--tag", default="", help="suffix of the result files (e.g. the GPU's name)")
    parser.add_argument("--reuse-cases", action="store_true", help="keep size pairs already in --work/scaling")
    parser.add_argument("--rerender", type=Path, metavar="JSON",
                        help="only rewrite the markdown of an earlier result (e.g. bench/results/scaling.json)")
    args = parser.parse_args(argv)
    if args.rerender:
        rerender(args.rerender)
        return 0
    rows = []
    network = None
    for size in args.sizes.split(","):
        case = make_size_case(size, args.work, reuse=args.reuse_cases)
        for config in args.configs.split(","):
            extra = []
            if config == "network":
                network = network or random_network(args.work / "scaling" / "random_network.pt")
                extra = ["--mode", "network", "--network", str(network)]
            method = "samir:network" if config == "network" else config
            print(f"{case.name}: {config} ...", flush=True)
            run = run_method(method, case, args.work / "scaling" / size / config.replace(":", "_"), args.threads,
                             device=args.device, extra_args=extra)
            row = {"size": size, "grid": case.description, "config": "network (random weights)" if config == "network"
                   else f"zero-shot {config.split(':', 1)[1]}", **run}
            row["total_s"] = run.get("stages_s", {}).get("total")
            row["peak_rss_gb"] = run["peak_rss_mb"] / 1024 if run.get("peak_rss_mb") else None
            row["device_peak_gb"] = run["device_peak_mb"] / 1024 if run.get("device_peak_mb") else None
            rows.append(row)
    write_scaling(rows, args.threads, args.device, args.tag, args.out)
    return 0


def write_scaling(rows, threads: int, device: str, tag: str, out: Path, machine=None) -> None:
    """The suite's markdown and JSON from its rows (``machine``: keep an earlier run's date and commit)."""
    for row in rows:
        for stage in STAGES:
            row[f"{stage}_s"] = row.get("stages_s", {}).get(stage)
    columns = [("size", "size", 0), ("grid", "grid", 0), ("configuration", "config", 0),
               *[(f"{stage} s", f"{stage}_s", 2) for stage in STAGES], ("total s", "total_s", 2),
               ("peak RSS GB", "peak_rss_gb", 2)]
    if device != "cpu":
        columns.append(("device peak GB", "device_peak_gb", 2))
    ok = [r for r in rows if "error" not in r]
    md = "\n".join([header("Suite 4 — speed and memory against volume size", threads, f"device {device}", machine),
                    markdown_table(ok, columns), "",
                    *[f"- {r['size']} {r['config']}: error {r['error']}" for r in rows if "error" in r],
                    "- n/a: the stage does not run in that configuration (zero-shot needs no encoder by default, "
                    "the network mode does not optimise unless refined).", ""])
    write_results(f"scaling{('_' + tag) if tag else ''}", md, {"rows": rows, "device": device, "threads": threads},
                  out, machine)


def rerender(json_path: Path) -> None:
    """Rewrite a scaling result's markdown from its JSON (same measurements, date and commit)."""
    data = json.loads(json_path.read_text())
    device = data.get("device") or ("cpu" if all(r.get("device_peak_mb") is None for r in data["rows"]) else "cuda")
    tag = json_path.stem[len("scaling_"):] if json_path.stem.startswith("scaling_") else ""
    write_scaling(data["rows"], data.get("threads") or data["rows"][0].get("threads", 1), device, tag,
                  json_path.parent, data["machine"])


if __name__ == "__main__":
    sys.exit(main())
