"""Command line: ``samir register``, ``samir demo`` (training and evaluation commands: :mod:`samir.commands`)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

from .affine import ALIGNMENT_MODES
from .encoders import ENCODERS
from .geometry import SAMIRInputError
from .intensity import NORMALIZATIONS
from .register import PRESETS, RegistrationOptions, stage_times

STAGES = ("align", "resample", "load encoder", "encode fixed", "encode moving", "optimise", "write outputs")


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
    parser.add_argument("--mode", default="zeroshot", choices=("zeroshot", "network"),
                        help="zeroshot (default): optimise the pyramid for this pair; network: one forward pass of a"
                             " trained SAMIR network (--weights CKPT), optionally refined (--refine N)")
    parser.add_argument("--encoder", choices=ENCODERS,
                        help="frozen image encoder (default: litemedsam, or the encoder the network was trained on)")
    parser.add_argument("--weights", help="zeroshot: encoder checkpoint file (SAM / MedSAM); network: the trained"
                                          " SAMIR network checkpoint")
    parser.add_argument("--network", help="trained SAMIR network checkpoint (same as --weights in network mode)")
    parser.add_argument("--encoder-weights", help="encoder checkpoint file, in any mode")
    parser.add_argument("--refine", type=int, default=0, metavar="N",
                        help="network mode: N instance-optimisation steps per level (two finest levels) from the"
                             " network's field")
    parser.add_argument("--k", type=int, dest="input_size", help="encoder input size (SAM ViT: multiple of 16, default 512)")
    parser.add_argument("--preset", default="balanced", choices=tuple(PRESETS), help="speed/accuracy trade-off")
    parser.add_argument("--similarity", default="auto", choices=("auto", "ncc", "mind"),
                        help="image similarity: ncc (local NCC, same contrast), mind (MIND-SSC, any contrast, e.g. T1 vs"
                             " T2) or auto (default: ncc unless fixed and moving intensities are anti-correlated)")
    parser.add_argument("--alignment", default="rigid", choices=ALIGNMENT_MODES,
                        help="pre-alignment in physical space before the deformable stage, kept only where it improves"
                             " the similarity: rigid (default: rotation and translation, e.g. two sessions, or origins"
                             " that disagree), affine (adds scaling and shear, e.g. subjects of different size) or none"
                             " (the images are aligned by their geometry)")
    parser.add_argument("--histogram-matching", action="store_true",
                        help="zero-shot with ncc: map the moving intensities onto the fixed image's histogram first"
                             " (for a non-linear intensity change between same-contrast scans, e.g. another scanner"
                             " or gamma; not where structures change size, e.g. cardiac phases)")
    parser.add_argument("--no-intensity-map", action="store_true",
                        help="zero-shot with ncc: do not map the moving intensities by the monotone map fitted on the"
                             " pair as aligned by the coarser levels (on by default)")
    parser.add_argument("--no-noise-smoothing", action="store_true",
                        help="zero-shot with ncc: do not smooth both images at the pyramid levels where the noisier"
                             " one's estimated white noise is strong (on by default)")
    parser.add_argument("--ssd-weight", type=float,
                        help="zero-shot with ncc: weight of the squared difference of the fixed and the intensity-mapped,"
                             " bias-corrected moving image beside local NCC (default 0.5; 0 turns it off)")
    parser.add_argument("--noise-smoothness-factor", type=float,
                        help="zero-shot with ncc: the diffusion weight of a pyramid level rises with its estimated"
                             " noise up to this many times the smoothness (default 4; 1 keeps it constant)")
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
    parser.add_argument("--no-cache", action="store_true",
                        help="neither reuse nor store encoder features in the feature cache (see samir cache)")


def options_from_args(args: argparse.Namespace) -> RegistrationOptions:
    if args.mode == "network":
        network, encoder_weights = args.network or args.weights, args.encoder_weights
        if args.network and args.weights and args.network != args.weights:
            raise SAMIRInputError("network mode: give the network checkpoint once (--weights or --network); the"
                                  " encoder checkpoint goes with --encoder-weights")
    else:
        network, encoder_weights = args.network, args.encoder_weights or args.weights
    return RegistrationOptions(
        mode=args.mode, network=network, refine_iterations=args.refine,
        encoder=args.encoder, weights=encoder_weights, input_size=args.input_size, preset=args.preset,
        similarity=args.similarity, histogram_matching=args.histogram_matching, alignment=args.alignment,
        device=args.device, normalization=args.normalization, slicing_axis=args.slicing_axis,
        slice_stride=args.slice_stride, use_features=args.features, seed=args.seed, use_cache=not args.no_cache,
        optimizer={"levels": args.levels, "finest_level": args.finest_level, "iterations": args.iterations,
                   "smoothness": args.smoothness, "feature_weight": args.feature_weight,
                   "joint_intensity_map": False if args.no_intensity_map else None,
                   "noise_smoothing": False if args.no_noise_smoothing else None, "ssd_weight": args.ssd_weight,
                   "noise_smoothness_factor": args.noise_smoothness_factor})


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
    reg.add_argument("--transform-format", default="h5", choices=("h5", "tfm"),
                     help="file format of the displacement-field transform (tfm is text, ~20x larger)")
    add_registration_arguments(reg)

    info = sub.add_parser("info", help="describe a trained SAMIR network checkpoint: config, parameters, multiply-adds")
    info.add_argument("checkpoint")
    info.add_argument("--shape", default="160,192,224", help="volume size z,y,x for the multiply-add count")
    info.add_argument("--json", action="store_true", help="print JSON")

    demo = sub.add_parser("demo", help="register MNI152 to a deformed, contrast-changed, noisy copy of itself")
    demo.add_argument("--out", default="samir_demo", help="output folder (default: samir_demo)")
    demo.add_argument("--resolution", type=int, default=2, help="template voxel size in mm (default 2)")
    demo.add_argument("--progress", default="bar", choices=("bar", "json", "none"))
    add_registration_arguments(demo)
    add_store_parsers(sub)
    from .commands import add_parsers as add_training_parsers  # features, train, evaluate, register-batch
    add_training_parsers(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the same clean-up, its own exit code."""


INTERRUPT_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as shells report it


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: Optional[List[str]] = None) -> int:
    """Run a command; exit code 0, 1 (outputs could not be written), 2 (bad input), 130 / 143 (interrupted)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="samir: %(message)s")
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
    if in_main_thread:
        signal.signal(signal.SIGTERM, _raise_terminated)
    progress, finished = None, False
    try:
        import torch
        torch.set_num_threads(max(1, int(os.environ.get("SAMIR_THREADS", os.cpu_count() or 1))))
        if args.command == "info":
            return print_network_info(args)
        if args.command in ("weights", "cache"):
            return run_store_command(args)
        from .commands import COMMANDS as TRAINING_COMMANDS, run as run_training_command
        if args.command in TRAINING_COMMANDS:
            return run_training_command(args)
        progress = StageProgress(args.progress)
        options = options_from_args(args)
        if args.command == "register":
            from .pipeline import run_registration
            summary = run_registration(args.fixed, args.moving, args.out, moving_seg_path=args.moving_seg,
                                       fixed_seg_path=args.fixed_seg, fixed_mask_path=args.fixed_mask,
                                       moving_mask_path=args.moving_mask, options=options, progress=progress,
                                       transform_format=args.transform_format)
            finished = True
            progress.close()
            print_summary(summary, args.out)
        else:
            from .demo import run_demo
            run_demo(args.out, options=options, resolution=args.resolution, progress=progress)
            finished = True
            progress.close()
    except SAMIRInputError as exc:
        from .io import SAMIROutputError
        if progress is not None:
            progress.close()
        print(f"samir: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, SAMIROutputError) else 2
    except KeyboardInterrupt as exc:
        return _report_interrupt(args, progress, "SIGTERM" if isinstance(exc, Terminated) else "SIGINT", finished)
    finally:
        for number, handler in previous.items():
            if handler is not None:
                signal.signal(number, handler)
    return 0


def _report_interrupt(args: argparse.Namespace, progress: Optional[StageProgress], name: str, finished: bool) -> int:
    """One line instead of a traceback; a second signal while it is printed is ignored."""
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
    if progress is not None:
        progress.close()
    out = getattr(args, "out", None)
    what = {"register": f"no outputs were written, '{out}' is as it was",
            "demo": f"no outputs were written, '{out}' is as it was",
            "register-batch": "pairs registered before it are kept, the batch summary was not written"}
    detail = f"after the outputs were written to '{out}'" if finished else what.get(args.command)
    print(f"samir: interrupted ({'Ctrl-C' if name == 'SIGINT' else 'SIGTERM'})" + (f": {detail}" if detail else ""),
          file=sys.stderr, flush=True)
    return INTERRUPT_EXIT_CODES[name]


def print_network_info(args: argparse.Namespace) -> int:
    from .network import info
    try:
        shape = tuple(int(v) for v in args.shape.split(","))
        assert len(shape) == 3 and min(shape) > 0
    except (ValueError, AssertionError):
        raise SAMIRInputError(f"--shape must be three positive integers z,y,x, got '{args.shape}'") from None
    details = info(args.checkpoint, shape)
    if args.json:
        print(json.dumps(details, indent=2))
        return 0
    config = details["config"]
    print(f"SAMIR network {details['path']} (format {details['format_version']})")
    print(f"  encoder {config['encoder']} (k = {config['input_size']}), {config['encoder_channels']} -> "
          f"{config['feature_channels']} channels, normalisation {config['normalization']}")
    print(f"  head widths {config['head_widths']}, {config['levels']} pyramid levels, {config['integration_steps']}"
          " integration steps")
    print(f"  trained on: {config['training_data'] or 'not described'}")
    print(f"  parameters {details['parameters']:,} (head {details['parameters_head']:,}, PDFP {details['parameters_pdfp']:,})")
    print(f"  multiply-adds {details['gmacs']:.1f} G for a {'x'.join(map(str, shape))} pair (convolutions)")
    return 0


def print_summary(summary: dict, out_dir: str) -> None:
    print(stage_times(summary))
    for note in summary.get("notes", []):
        print(f"note: {note}")
    print(f"SDlogJ {summary['sdlogj']:.4f}, folding {summary['folding_percent']:.4f} %")
    if "dice_after_mean" in summary:
        print(f"mean Dice {summary['dice_before_mean']:.3f} -> {summary['dice_after_mean']:.3f}")
    print(f"outputs in {out_dir}: " + ", ".join(summary["outputs"].values()))


def add_store_parsers(sub) -> None:
    """``samir weights`` (encoder checkpoints) and ``samir cache`` (encoder features)."""
    from .weights import REGISTRY
    weights = sub.add_parser("weights", help="SAM / MedSAM encoder checkpoints: list, download, verify")
    actions = weights.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="known checkpoints, where they go and whether they are there")
    fetch = actions.add_parser("fetch", help="download and verify a checkpoint into the weights folder")
    fetch.add_argument("name", choices=tuple(REGISTRY))
    fetch.add_argument("--force", action="store_true", help="download again even if the file is there")
    verify = actions.add_parser("verify", help="check checkpoints against their pinned checksums")
    verify.add_argument("name", nargs="?", choices=tuple(REGISTRY), help="one checkpoint (default: all present)")
    verify.add_argument("--file", help="check this file instead of the one in the weights folder (needs NAME)")
    cache = sub.add_parser("cache", help="encoder-feature cache: info, clear")
    actions = cache.add_subparsers(dest="action", required=True)
    actions.add_parser("info", help="where the cache is, how many entries, how large")
    actions.add_parser("clear", help="delete every cached feature entry")


def run_store_command(args: argparse.Namespace) -> int:
    from . import weights
    if args.command == "cache":
        from .feature_cache import FeatureCache
        cache = FeatureCache()
        if args.action == "clear":
            count, freed = cache.clear()
            print(f"removed {count} entries ({freed / 1e6:.1f} MB) from {cache.directory}")
        else:
            stats = cache.stats()
            print(f"feature cache {stats['directory']}: {stats['entries']} entries, {stats['bytes'] / 1e6:.1f} MB"
                  f" of at most {stats['max_bytes'] / 1e9:.2f} GB")
        return 0
    if args.action == "list":
        print(f"weights folder {weights.weights_dir()} (set {weights.WEIGHTS_DIR_ENV} to move it)")
        for name in weights.REGISTRY:
            status = weights.weights_status(name)
            state = ("verified" if status["verified"] else "present, not yet verified") if status["present"] else (
                f"partial download, {status['partial_bytes'] / 1e6:.0f} MB" if status["partial_bytes"] else "missing")
            size = f"{status['size'] / 1e6:,.0f} MB" if status["size"] else "size unknown"
            print(f"  {name:<13} {status['file']:<22} {size:>10}  {state}")
        return 0
    if args.action == "fetch":
        if args.force:
            path = weights.download_weights(args.name, force=True)
        else:
            path = weights.resolve_encoder_weights(args.name)
        print(path)
        return 0
    if args.file and not args.name:
        raise SAMIRInputError("samir weights verify --file PATH needs the checkpoint NAME to check it against")
    names = [args.name] if args.name else [n for n in weights.REGISTRY if weights.cached_path(n).is_file()]
    if not names:
        print(f"no checkpoints in {weights.weights_dir()}")
        return 0
    failed = 0
    for name in names:
        path = Path(args.file) if args.file else weights.cached_path(name)
        if not path.is_file():
            print(f"{name}: MISSING {path}")
            failed += 1
            continue
        try:
            weights.verify_file(path, weights.REGISTRY[name])
        except weights.WeightsChecksumError as exc:
            print(f"{name}: MISMATCH {exc}")
            failed += 1
            continue
        if not args.file:
            weights.mark_verified(path)
        print(f"{name}: OK {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
