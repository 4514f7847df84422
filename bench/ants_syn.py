"""ANTs SyN (CC metric) on the brain pair, run once and cached as the reference of bench/brain_pair.py.

    python bench/ants_syn.py run --data DIR --work DIR [--threads N]     # needs antspyx (pip install antspyx)
    python bench/ants_syn.py score --data DIR --work DIR --out FILE.json   # needs samir

``run`` registers subject B (moving) to subject A (fixed) with ANTs' standard SyN stage for
affinely pre-aligned brains: CC metric radius 4, 100x70x50x20 iterations over shrink factors
8x4x2x1 with smoothing 3x2x1x0 voxels (antsRegistrationSyN.sh's SyN stage), labels propagated with
ANTs' genericLabel interpolation. ``score`` reads its outputs and computes the same metrics as the
other rows (Dice over the 30 labels, SDlogJ and folding from the written displacement field).
It takes over an hour on 2 cores, so its result is cached in ``bench/results/ants_syn_brain_pair.json``
with the command and the machine it ran on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

COMMAND = ("ants.registration(fixed, moving, type_of_transform='SyNOnly', syn_metric='CC', syn_sampling=4, "
           "reg_iterations=(100, 70, 50, 20), grad_step=0.1, flow_sigma=3, total_sigma=0)")


def run(data: Path, work: Path, threads: int) -> None:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import ants
    work.mkdir(parents=True, exist_ok=True)
    fixed = ants.image_read(str(data / "subjectA_t1.nii.gz"))
    moving = ants.image_read(str(data / "subjectB_t1.nii.gz"))
    moving_seg = ants.image_read(str(data / "subjectB_aseg.nii.gz"))
    start, cpu_start = time.perf_counter(), time.process_time()
    reg = ants.registration(fixed, moving, type_of_transform="SyNOnly", syn_metric="CC", syn_sampling=4,
                            reg_iterations=(100, 70, 50, 20), grad_step=0.1, flow_sigma=3, total_sigma=0,
                            outprefix=str(work / "syn_"))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    warped = ants.apply_transforms(fixed, moving_seg, transformlist=reg["fwdtransforms"], interpolator="genericLabel")
    ants.image_write(warped, str(work / "warped_seg.nii.gz"))
    warp = [t for t in reg["fwdtransforms"] if t.endswith("Warp.nii.gz")][0]
    info = {"wall_s": wall, "cpu_s": cpu, "threads": threads, "warp": warp, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "antspyx": ants.__version__}
    (work / "run.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))


def score(data: Path, work: Path, out: Path) -> None:
    import numpy as np
    import SimpleITK as sitk
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from brain_pair import scores
    from samir.geometry import displacement_lps_to_zyx_voxels
    from samir.io import read_image, read_labels
    from samir.spatial import jacobian_determinant
    info = json.loads((work / "run.json").read_text())
    fixed = read_image(data / "subjectA_t1.nii.gz", "fixed")
    fixed_seg = read_labels(data / "subjectA_aseg.nii.gz", "fixed")
    labels = [int(v) for v in (data / "eval_labels.txt").read_text().split()]
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "warped_seg.nii.gz")))
    warp_path = Path(info["warp"])
    if not warp_path.exists():
        warp_path = work / warp_path.name
    disp = sitk.GetArrayFromImage(sitk.ReadImage(str(warp_path))).astype(np.float64)
    u = torch.from_numpy(displacement_lps_to_zyx_voxels(disp, fixed).astype(np.float32))[None]
    result = scores(fixed_seg.array, warped, labels, jacobian_determinant(u)[0].numpy())
    result.update(method="ANTs SyN (CC, 100x70x50x20)", wall_s=info["wall_s"], cpu_s=info.get("cpu_s"),
                  peak_rss_mb=info["peak_rss_mb"],
                  command=f"bench/ants_syn.py run (antspyx {info['antspyx']}: {COMMAND})",
                  machine=f"{info['machine']}, {info['threads']} threads", date=time.strftime("%Y-%m-%d"))
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "dice_per_label"}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "score"))
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-pair")
    parser.add_argument("--work", type=Path, default=Path("ants_work"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "ants_syn_brain_pair.json")
    args = parser.parse_args()
    if args.action == "run":
        run(args.data, args.work, args.threads)
    else:
        score(args.data, args.work, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
