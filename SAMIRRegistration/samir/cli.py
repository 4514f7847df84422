"""Command line: ``samir register``, ``samir demo``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

from .encoders import ENCODERS
from .geometry import SAMIRInputError
from .intensity import NORMALIZATIONS
from .register import PRESETS, RegistrationOptions, stage_times

STAGES = ("resample", "load encoder", "encode fixed", "encode moving", "optimise", "write outputs")


class StageProgress:
    """One progress bar per stage on stderr (``bar``), JSON lines on stdout (``json``) or nothing."""

    def __init__(self, style: str = "bar"):
        self.style = style
        self.stage = None
        self.bar = None
        self.started = time.perf_counter()

    def __call__(self, stage: str, fraction: float) -> None:
        if self.style == "none":
            return
        if self.style == "json":
            print(json.dumps({"stage": stage, "fraction": round(float(fraction), 4),
                              "elapsed_s": round(time.perf_counter() - self.started, 2)}), flush=True)
            return
        from tqdm import tqdm
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=100, desc=f"{stage:<14}", unit="%", file=sys.stderr, leave=True,
                            bar_format="{desc} {bar} {percentage:3.0f}% [{elapsed}]")
        self.bar.n = int(round(100 * fraction))
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def add_registration_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", default="litemedsam", choices=ENCODERS, help="frozen image encoder (default: litemedsam)")
    parser.add_argument("--weights", help="encoder checkpoint file (needed for SAM / MedSAM encoders)")
    parser.add_argument("--k", type=int, dest="input_size", help="encoder input size (SAM ViT: multiple of 16, default 512)")
    parser.add_argument("--preset", default="balanced", choices=tuple(PRESETS), help="speed/accuracy trade-off")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--normalization", default="auto", choices=NORMALIZATIONS,
                        help="intensity normalisation: mr = percentile clip, ct = HU window [-500, 800]")
    parser.add_argument("--slicing-axis", type=int, choices=(0, 1, 2),
                        help="array axis (z=0, y=1, x=2) the 2D encoder slices along (default: largest spacing,"
                             " or the axis with the fewest slices for isotropic volumes)")
    parser.add_argument("--slice-stride", type=int, help="encode every n-th slice (default: automatic)")
    parser.add_argument("--features", action="store_true",
                        help="guide the coarse levels with frozen encoder features (SAFE); off by default until it"
                             " measurably helps (see README)")
    parser.add_argument("--levels", type=int, help="pyramid levels (default 5)")
    parser.add_argument("--finest-level", type=int, help="finest optimised level (1 = full resolution)")
    parser.add_argument("--iterations", type=lambda s: tuple(int(x) for x in s.split(",")),
                        help="iterations per level, coarsest first, e.g. 80,80,60,50")
    parser.add_argument("--smoothness", type=float, help="weight of the diffusion regulariser")
    parser.add_argument("--feature-weight", type=float, help="weight of the feature similarity")
    parser.add_argument("--seed", type=int, default=0)


def options_from_args(args: argparse.Namespace) -> RegistrationOptions:
    return RegistrationOptions(
        encoder=args.encoder, weights=args.weights, input_size=args.input_size, preset=args.preset,
        device=args.device, normalization=args.normalization, slicing_axis=args.slicing_axis,
        slice_stride=args.slice_stride, use_features=args.features, seed=args.seed,
        optimizer={"levels": args.levels, "finest_level": args.finest_level, "iterations": args.iterations,
                   "smoothness": args.smoothness, "feature_weight": args.feature_weight})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samir", description="SAMIR deformable 3D registration with frozen SAM-family encoders")
    sub = parser.add_subparsers(dest="command", required=True)

    reg = sub.add_parser("register", help="register MOVING onto FIXED")
    reg.add_argument("fixed")
    reg.add_argument("moving")
    reg.add_argument("--moving-seg", help="label map on the moving image, propagated to the fixed grid")
    reg.add_argument("--fixed-seg", help="label map on the fixed image (Dice in summary.json)")
    reg.add_argument("--fixed-mask", help="restrict the similarity to this mask on the fixed image")
    reg.add_argument("--moving-mask", help="restrict the similarity to this mask on the moving image")
    reg.add_argument("--out", default="samir_out", help="output folder (default: samir_out)")
    reg.add_argument("--progress", default="bar", choices=("bar", "json", "none"))
    add_registration_arguments(reg)

    demo = sub.add_parser("demo", help="register MNI152 to a deformed, contrast-changed, noisy copy of itself")
    demo.add_argument("--out", default="samir_demo", help="output folder (default: samir_demo)")
    demo.add_argument("--resolution", type=int, default=2, help="template voxel size in mm (default 2)")
    demo.add_argument("--progress", default="bar", choices=("bar", "json", "none"))
    add_registration_arguments(demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import torch
        torch.set_num_threads(max(1, int(os.environ.get("SAMIR_THREADS", os.cpu_count() or 1))))
        progress = StageProgress(args.progress)
        options = options_from_args(args)
        if args.command == "register":
            from .pipeline import run_registration
            summary = run_registration(args.fixed, args.moving, args.out, moving_seg_path=args.moving_seg,
                                       fixed_seg_path=args.fixed_seg, fixed_mask_path=args.fixed_mask,
                                       moving_mask_path=args.moving_mask, options=options, progress=progress)
            progress.close()
            print_summary(summary, args.out)
        else:
            from .demo import run_demo
            run_demo(args.out, options=options, resolution=args.resolution, progress=progress)
            progress.close()
    except SAMIRInputError as exc:
        print(f"samir: error: {exc}", file=sys.stderr)
        return 2
    return 0


def print_summary(summary: dict, out_dir: str) -> None:
    print(stage_times(summary))
    print(f"SDlogJ {summary['sdlogj']:.4f}, folding {summary['folding_percent']:.4f} %")
    if "dice_after_mean" in summary:
        print(f"mean Dice {summary['dice_before_mean']:.3f} -> {summary['dice_after_mean']:.3f}")
    print(f"outputs in {out_dir}: " + ", ".join(summary["outputs"].values()))


if __name__ == "__main__":
    sys.exit(main())
