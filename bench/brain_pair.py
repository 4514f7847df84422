"""Suite 1: the real inter-subject brain pair, SAMIR against the peers in one run.

    .venv/bin/python bench/brain_pair.py [--methods samir:balanced,demons,elastix,ants-mi] [--threads 2]
                                         [--measure-ants-cc] [--cache-check] [--device cpu]

Subject B (moving) -> subject A (fixed) from ``../shared/data/brain-pair`` (``SAMIR_BRAIN_PAIR``),
30 FreeSurfer labels; skips with a message when that folder is absent. Every method runs in its own
process with the same number of threads (``bench/harness.py``). ANTs SyN with the CC metric takes
well over an hour here, so it is measured once per machine (``--measure-ants-cc``) and its result
cached in ``bench/results/ants_cc_brain_pair.json`` with its command; later runs show that row.
``--cache-check`` also times SAMIR's encoder stage with the on-disk feature cache cold and warm.

Writes ``bench/results/brain_pair.{md,json}`` and ``brain_pair_per_label.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_run_arguments, RESULTS, ROOT, Case, evaluate, fmt, header, initial_scores, markdown_table, method_name, reused_note, write_results  # noqa: E402

DATA = Path(os.environ.get("SAMIR_BRAIN_PAIR", ROOT.parent / "shared" / "data" / "brain-pair"))
ANTS_CC_CACHE = RESULTS / "ants_cc_brain_pair.json"
DEFAULT_METHODS = "samir:balanced,demons,elastix,ants-mi"


def brain_case() -> Case:
    return Case("brain_pair", DATA / "subjectA_t1.nii.gz", DATA / "subjectB_t1.nii.gz", DATA / "subjectA_aseg.nii.gz",
                DATA / "subjectB_aseg.nii.gz", [int(v) for v in (DATA / "eval_labels.txt").read_text().split()],
                description="subject B -> subject A, T1 1 mm, 160x192x224, 30 labels")


def cache_check(threads: int, device: str) -> dict:
    """Encoder stage (LiteMedSAM on both images) with an empty feature cache, then with it warm."""
    import torch
    torch.set_num_threads(threads)
    from samir.io import read_image
    from samir.register import RegistrationOptions, register
    case = brain_case()
    fixed, moving = read_image(case.fixed, "fixed"), read_image(case.moving, "moving")
    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["SAMIR_CACHE_DIR"] = cache_dir
        options = RegistrationOptions(preset="fast", device=device, use_features=True)
        times = [register(fixed, moving, options).timings["encoder_s"] for _ in range(2)]
    return {"cold_s": times[0], "warm_s": times[1], "speedup": times[0] / max(times[1], 1e-9)}


COLUMNS = [("method", "name", 0), ("Dice (30 labels)", "dice", 3), ("HD95 mm", "hd95_mm", 2), ("SDlogJ", "sdlogj", 3),
           ("folding %", "folding_percent", 4), ("wall s", "wall_s", 0), ("peak RSS MB", "peak_rss_mb", 0),
           ("time / demons", "vs_demons", 2), ("time / ANTs MI", "vs_ants_mi", 2), ("time / ANTs CC", "vs_ants_cc", 3)]


def per_label_plot(rows, labels, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    rows = [r for r in rows if r.get("dice_per_label")]
    fig, ax = plt.subplots(figsize=(14, 4.5))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        values = [r["dice_per_label"].get(str(v), np.nan) for v in labels]
        ax.bar(np.arange(len(labels)) + i * width, values, width, label=f"{r['name']} ({r['dice']:.3f})")
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, [str(v) for v in labels], fontsize=8)
    ax.set_xlabel("FreeSurfer label")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=3, loc="lower right")
    ax.set_title("Brain pair: Dice per label")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    parser.add_argument("--measure-ants-cc", action="store_true", help="run ANTs SyN CC (hours) and cache its row")
    parser.add_argument("--cache-check", action="store_true", help="time the encoder stage cold and warm")
    parser.add_argument("--device", default="cpu", help="SAMIR's device (peers run on the CPU)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if not DATA.exists():
        print(f"brain pair not found at {DATA}: skipping (set SAMIR_BRAIN_PAIR to its folder)")
        return 0
    case = brain_case()
    methods = [m for m in args.methods.split(",") if m] + (["ants-cc"] if args.measure_ants_cc else [])
    rows = []
    for method in methods:
        print(f"running {method_name(method)} ...", flush=True)
        row = evaluate(method, case, args.work, args.threads, device=args.device if method.startswith("samir") else "cpu",
                       reuse_peers=args.reuse_peers)
        print("  " + (str(row.get("error")) if "error" in row else
                      f"Dice {row['dice']:.3f}  HD95 {row['hd95_mm']:.2f} mm  folding {row['folding_percent']:.4f} %"
                      f"  {row['wall_s']:.0f} s  {fmt(row.get('peak_rss_mb'), 0)} MB"), flush=True)
        if method == "ants-cc" and "error" not in row:
            cached = {**row, "command": f"bench/brain_pair.py --measure-ants-cc --threads {args.threads}",
                      "measured": time.strftime("%Y-%m-%d"), "machine_info": __import__("harness").machine_info()}
            ANTS_CC_CACHE.write_text(json.dumps(cached, indent=2, default=str))
        rows.append(row)
    if "ants-cc" not in methods and ANTS_CC_CACHE.exists():
        cached = json.loads(ANTS_CC_CACHE.read_text())
        cached["name"] = cached.get("name", method_name("ants-cc")) + " (cached: " + cached.get("measured", "?") + ")"
        rows.append(cached)
    timing = {r["method"]: r.get("wall_s") for r in rows if "error" not in r}
    for r in rows:
        if r.get("wall_s") and r["method"].startswith("samir"):
            for key, ref in (("vs_demons", "demons"), ("vs_ants_mi", "ants-mi"), ("vs_ants_cc", "ants-cc")):
                if timing.get(ref):
                    r[key] = r["wall_s"] / timing[ref]
    before = initial_scores(case)
    ok = [r for r in rows if "error" not in r]
    reused = reused_note(ok)
    md = "\n".join([
        header("Suite 1 — real inter-subject brain pair", args.threads, f"SAMIR on {args.device}"),
        f"{case.description}; before registration: Dice {before['dice']:.3f}, HD95 {before['hd95_mm']:.2f} mm.\n",
        markdown_table(ok, COLUMNS), "", *reused,
        *[f"- {r['name']}: error {r['error']}" for r in rows if "error" in r],
        *[f"- {method_name(r['method'])} stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["stages_s"].items())
          for r in ok if r.get("stages_s")],
        "- time ratios: wall time of the SAMIR row divided by the peer's row above "
        "(ANTs CC: its cached measurement, see below).",
        *[(f"- ANTs CC row: measured on {r.get('measured')} with `{r.get('command')}`" if r.get("measured_here", True)
           else f"- ANTs CC row: {r.get('source')}; not re-measured here (`bench/brain_pair.py --measure-ants-cc`"
                " measures it, over an hour on 2 cores, and caches it)") for r in ok if r["method"] == "ants-cc"],
        "", "![Dice per label](brain_pair_per_label.png)", ""])
    if args.cache_check:
        check = cache_check(args.threads, args.device)
        md += (f"\nFeature cache (encoder stage, LiteMedSAM on both images): {check['cold_s']:.1f} s cold, "
               f"{check['warm_s']:.2f} s warm ({check['speedup']:.0f}x).\n")
        rows.append({"method": "feature-cache", **check})
    per_label_plot(ok, case.labels, args.out / "brain_pair_per_label.png")
    write_results("brain_pair", md, {"before": before, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
