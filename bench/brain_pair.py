"""Zero-shot SAMIR on the real inter-subject brain pair against SimpleITK demons.

    .venv/bin/python bench/brain_pair.py [--presets fast,balanced,accurate] [--device cpu|cuda] [--out bench/results]

Subject B (moving) -> subject A (fixed) from ``../shared/data/brain-pair`` (30 FreeSurfer labels);
skips with a message when that folder is absent. Each method runs in its own process so peak memory
is measured per method. Writes a markdown table and JSON to ``--out`` (``brain_pair[_<device>].md``).

Also measured: the encoder stage with the on-disk feature cache, cold then warm (``--cache-check``),
and, when ``bench/results/ants_syn_brain_pair.json`` exists, the ANTs SyN reference it records
(``bench/ants_syn.py`` produced it; it takes over an hour on 2 cores, so it is run once and cached).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SAMIR_BRAIN_PAIR", ROOT.parent / "shared" / "data" / "brain-pair"))


def load_pair():
    from samir.io import read_image, read_labels
    return (read_image(DATA / "subjectA_t1.nii.gz", "fixed"), read_image(DATA / "subjectB_t1.nii.gz", "moving"),
            read_labels(DATA / "subjectA_aseg.nii.gz", "fixed"), read_labels(DATA / "subjectB_aseg.nii.gz", "moving"),
            [int(v) for v in (DATA / "eval_labels.txt").read_text().split()])


def scores(fixed_seg, warped_seg, labels, jacobian):
    import torch
    from samir.metrics import dice_per_label, mean_dice
    from samir.spatial import folding_fraction, sdlogj
    dice = dice_per_label(fixed_seg, warped_seg, labels)
    jac = torch.from_numpy(np.asarray(jacobian, dtype=np.float32))
    return {"dice": mean_dice(dice), "dice_per_label": dice, "sdlogj": sdlogj(jac),
            "folding_percent": 100 * folding_fraction(jac)}


def run_samir(preset: str, threads: int, device: str = "cpu") -> dict:
    import torch
    torch.set_num_threads(threads)
    from samir.register import RegistrationOptions, register
    from samir.transforms import warp_labels
    fixed, moving, fixed_seg, moving_seg, labels = load_pair()
    if device.startswith("cuda"):  # CUDA context and kernels are loaded once per process, not per registration
        register(fixed, moving, RegistrationOptions(preset="fast", device=device, optimizer={"iterations": (2,)}))
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = register(fixed, moving, RegistrationOptions(preset=preset, device=device))
    wall = time.perf_counter() - start
    warped = warp_labels(moving_seg, fixed, result.displacement_lps).array
    out = scores(fixed_seg.array, warped, labels, result.jacobian)
    out.update(method=f"SAMIR zero-shot {preset}", wall_s=wall, stages_s=result.timings,
               estimated_peak_host_mb=result.info.get("estimated_peak_host_mb"),
               device_peak_mb=result.info.get("device_peak_allocated_mb"))
    return out


def run_cache_check(threads: int, device: str = "cpu") -> dict:
    """Encoder stage (LiteMedSAM on both images) with an empty feature cache, then again with it warm."""
    import tempfile
    import torch
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["SAMIR_CACHE_DIR"] = cache_dir
        from samir.register import RegistrationOptions, register
        fixed, moving, *_ = load_pair()
        options = RegistrationOptions(preset="fast", device=device, use_features=True)
        times = []
        for _ in range(2):
            result = register(fixed, moving, options)
            times.append(result.timings["encoder_s"])
    return {"method": "encoder stage, feature cache cold -> warm", "cold_s": times[0], "warm_s": times[1],
            "speedup": times[0] / max(times[1], 1e-9), "slice_stride": result.info["slice_stride"]}


def run_demons(threads: int) -> dict:
    """Multi-resolution fast symmetric forces demons (SimpleITK), shrink 4-2-1, 100 iterations per level."""
    import SimpleITK as sitk
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    from samir.geometry import to_sitk
    from samir.spatial import jacobian_determinant
    from samir.geometry import displacement_lps_to_zyx_voxels
    import torch
    fixed, moving, fixed_seg, moving_seg, labels = load_pair()
    start = time.perf_counter()
    f = to_sitk(fixed)
    m = sitk.HistogramMatching(to_sitk(moving), f, 256, 7)
    field = None
    for shrink in (4, 2, 1):
        fs = sitk.Shrink(sitk.SmoothingRecursiveGaussian(f, 0.5 * shrink), [shrink] * 3) if shrink > 1 else f
        ms = sitk.Shrink(sitk.SmoothingRecursiveGaussian(m, 0.5 * shrink), [shrink] * 3) if shrink > 1 else m
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfIterations(100)
        demons.SetStandardDeviations(1.5)
        if field is None:
            field = demons.Execute(fs, ms)
        else:
            init = sitk.Resample(field, fs, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
            field = demons.Execute(fs, ms, init)
    wall = time.perf_counter() - start
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    warped = sitk.GetArrayFromImage(sitk.Resample(to_sitk(moving_seg), f, transform, sitk.sitkNearestNeighbor, 0))
    disp = sitk.GetArrayFromImage(field)
    u = torch.from_numpy(displacement_lps_to_zyx_voxels(disp, fixed))[None]
    out = scores(fixed_seg.array, warped, labels, jacobian_determinant(u)[0].numpy())
    out.update(method="SimpleITK demons (fast symmetric forces, 4-2-1)", wall_s=wall)
    return out


def _worker(name, threads, queue, device="cpu"):
    try:
        if name == "demons":
            result = run_demons(threads)
        elif name == "cache":
            result = run_cache_check(threads, device)
        else:
            result = run_samir(name, threads, device)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        queue.put(result)
    except Exception as exc:  # reported in the table
        queue.put({"method": name, "error": repr(exc)})


def run_isolated(name, threads, device="cpu"):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(name, threads, queue, device))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def table(results, header):
    lines = [header, "", "| method | Dice (30 labels) | SDlogJ | folding % | wall s | peak RSS MB |",
             "| --- | --- | --- | --- | --- | --- |"]
    notes = []
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error']} | | | | |")
            continue
        if "speedup" in r:
            notes.append(f"Feature cache: encoder stage (LiteMedSAM, both images, slice stride {r['slice_stride']}) "
                         f"{r['cold_s']:.1f} s cold, {r['warm_s']:.2f} s warm: {r['speedup']:.0f}x faster.")
            continue
        if r.get("cached"):
            fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
            origin = "cached, measured with bench/ants_syn.py" if r.get("measured_here", True) else "reported, not re-measured"
            lines.append(f"| {r['method']} ({origin}) | {r['dice']:.3f} | {fmt(r.get('sdlogj'), '.3f')} | "
                         f"{fmt(r.get('folding_percent'), '.4f')} | {fmt(r.get('wall_s'), '.0f')} | "
                         f"{fmt(r.get('peak_rss_mb'), '.0f')} |")
            notes.append(f"{r['method']}: {r.get('source') or r.get('command')}")
            continue
        if r.get("stages_s"):
            stages = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in r["stages_s"].items() if v >= 0.05)
            notes.append(f"{r['method']}: stages (s) {stages}" + (
                f"; GPU peak {r['device_peak_mb']:.0f} MB" if r.get("device_peak_mb") else "") + (
                f"; estimated host peak {r['estimated_peak_host_mb']:.0f} MB" if r.get("estimated_peak_host_mb") else ""))
        lines.append(f"| {r['method']} | {r['dice']:.3f} | {r['sdlogj']:.3f} | {r['folding_percent']:.4f} | "
                     f"{r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="fast,balanced,accurate")
    parser.add_argument("--no-demons", action="store_true")
    parser.add_argument("--cache-check", action="store_true", help="time the encoder stage cold and warm")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (SAMIR rows only)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    if not DATA.exists():
        print(f"brain pair not found at {DATA}: skipping (it lives in the shared data folder beside the repo)")
        return 0
    names = [p for p in args.presets.split(",") if p] + ([] if args.no_demons else ["demons"]) + (
        ["cache"] if args.cache_check else [])
    results = []
    for name in names:
        print(f"running {name} ...", flush=True)
        results.append(run_isolated(name, args.threads, args.device))
        if "speedup" in results[-1]:
            print(f"  encoder {results[-1]['cold_s']:.1f} s cold, {results[-1]['warm_s']:.2f} s warm", flush=True)
            continue
        r = results[-1]
        print(r.get("error") or f"  Dice {r['dice']:.3f}  SDlogJ {r['sdlogj']:.3f}  folding {r['folding_percent']:.4f} %"
              f"  {r['wall_s']:.0f} s  {r['peak_rss_mb']:.0f} MB", flush=True)
    ants = ROOT / "bench" / "results" / "ants_syn_brain_pair.json"
    if ants.exists():
        results.append({**json.loads(ants.read_text()), "cached": True})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    header = (f"Brain pair (subject B -> A, 30 labels, Dice before 0.522), {time.strftime('%Y-%m-%d')}, "
              f"commit {commit}, {platform.processor() or platform.machine()}, {args.threads} threads, device {args.device}")
    md = table(results, header)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else f"_{args.device.replace(':', '')}"
    (out / f"brain_pair{suffix}.md").write_text(md + "\n")
    (out / f"brain_pair{suffix}.json").write_text(json.dumps(results, indent=2, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
