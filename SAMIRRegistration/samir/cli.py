"""Command line: ``samir register | demo | info | weights | cache`` and the training commands of
:mod:`samir.commands`, dispatched from one table (:data:`COMMANDS`).

Registration options come from the schema in :mod:`samir.options`; this module only adds the
commands' own arguments (inputs, output folder, progress style).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional

from .commands import TRAINING_COMMANDS, Command
from .errors import SAMIRInputError
from .options import add_registration_arguments
from .progress import PROGRESS_STYLES, StageProgress


def _add_register_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("fixed")
    parser.add_argument("moving")
    parser.add_argument("--moving-seg", help="label map on the moving image, propagated to the fixed grid")
    parser.add_argument("--fixed-seg", help="label map on the fixed image (Dice in summary.json)")
    parser.add_argument("--fixed-mask", help="restrict the similarity to this mask on the fixed image")
    parser.add_argument("--moving-mask", help="restrict the similarity to this mask on the moving image")
    parser.add_argument("--out", default="samir_out", help="output folder (default: samir_out)")
    parser.add_argument("--progress", default="bar", choices=PROGRESS_STYLES)
    parser.add_argument("--transform-format", default="h5", choices=("h5", "tfm"),
                        help="file format of the displacement-field transform (tfm is text, ~20x larger)")
    add_registration_arguments(parser)


def run_register(args: argparse.Namespace) -> int:
    from .pipeline import run_registration
    from .register import RegistrationOptions
    options = RegistrationOptions.from_arguments(args)
    progress = StageProgress(args.progress)
    try:
        summary = run_registration(args.fixed, args.moving, args.out, moving_seg_path=args.moving_seg,
                                   fixed_seg_path=args.fixed_seg, fixed_mask_path=args.fixed_mask,
                                   moving_mask_path=args.moving_mask, options=options, progress=progress,
                                   transform_format=args.transform_format)
        args.outputs_written = True
    finally:
        progress.close()
    print_summary(summary, args.out)
    return 0


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="samir_demo", help="output folder (default: samir_demo)")
    parser.add_argument("--resolution", type=int, default=2, help="template voxel size in mm (default 2)")
    parser.add_argument("--progress", default="bar", choices=PROGRESS_STYLES)
    add_registration_arguments(parser)


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo
    from .register import RegistrationOptions
    progress = StageProgress(args.progress)
    try:
        demo(args.out, options=RegistrationOptions.from_arguments(args), resolution=args.resolution,
             progress=progress)
        args.outputs_written = True
    finally:
        progress.close()
    return 0


def _add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint")
    parser.add_argument("--shape", default="160,192,224", help="volume size z,y,x for the multiply-add count")
    parser.add_argument("--json", action="store_true", help="print JSON")


def print_network_info(args: argparse.Namespace) -> int:
    from .checkpoint import info
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
    from .register import stage_times
    print(stage_times(summary))
    for note in summary.get("notes", []):
        print(f"note: {note}")
    print(f"SDlogJ {summary['sdlogj']:.4f}, folding {summary['folding_percent']:.4f} %")
    if "dice_after_mean" in summary:
        print(f"mean Dice {summary['dice_before_mean']:.3f} -> {summary['dice_after_mean']:.3f}")
    print(f"outputs in {out_dir}: " + ", ".join(summary["outputs"].values()))


def _add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    from .encoder_weights import REGISTRY
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="known checkpoints, where they go and whether they are there")
    fetch = actions.add_parser("fetch", help="download and verify a checkpoint into the weights folder")
    fetch.add_argument("name", choices=tuple(REGISTRY))
    fetch.add_argument("--force", action="store_true", help="download again even if the file is there")
    verify = actions.add_parser("verify", help="check checkpoints against their pinned checksums")
    verify.add_argument("name", nargs="?", choices=tuple(REGISTRY), help="one checkpoint (default: all present)")
    verify.add_argument("--file", help="check this file instead of the one in the weights folder (needs NAME)")


def _add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("info", help="where the cache is, how many entries, how large")
    actions.add_parser("clear", help="delete every cached feature entry")


def run_store_command(args: argparse.Namespace) -> int:
    from . import encoder_weights as weights
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


COMMANDS: Dict[str, Command] = {
    "register": Command("register MOVING onto FIXED", _add_register_arguments, run_register),
    "info": Command("describe a trained SAMIR network checkpoint: config, parameters, multiply-adds",
                    _add_info_arguments, print_network_info),
    "demo": Command("register MNI152 to a deformed, contrast-changed, noisy copy of itself", _add_demo_arguments,
                    run_demo),
    "weights": Command("SAM / MedSAM encoder checkpoints: list, download, verify", _add_weights_arguments,
                       run_store_command),
    "cache": Command("encoder-feature cache: info, clear", _add_cache_arguments, run_store_command),
    **TRAINING_COMMANDS,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samir",
                                     description="SAMIR deformable 3D registration with frozen SAM-family encoders")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help))
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the same clean-up, its own exit code."""


INTERRUPT_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as shells report it


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: Optional[List[str]] = None) -> int:
    """Run a command; exit code 0, 1 (outputs could not be written), 2 (bad input), 130 / 143 (interrupted)."""
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    logging.basicConfig(level=logging.WARNING, format="samir: %(message)s")
    logging.getLogger("samir").setLevel(command.log_level)
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
    if in_main_thread:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        import torch
        torch.set_num_threads(max(1, int(os.environ.get("SAMIR_THREADS", os.cpu_count() or 1))))
        return command.run(args)
    except SAMIRInputError as exc:
        from .io import SAMIROutputError
        print(f"samir: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, SAMIROutputError) else 2
    except KeyboardInterrupt as exc:
        return _report_interrupt(args, "SIGTERM" if isinstance(exc, Terminated) else "SIGINT")
    finally:
        for number, handler in previous.items():
            if handler is not None:
                signal.signal(number, handler)


def _report_interrupt(args: argparse.Namespace, name: str) -> int:
    """One line instead of a traceback; a second signal while it is printed is ignored."""
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
    out = getattr(args, "out", None)
    what = {"register": f"no outputs were written, '{out}' is as it was",
            "demo": f"no outputs were written, '{out}' is as it was",
            "register-batch": "pairs registered before it are kept, the batch summary was not written"}
    written = getattr(args, "outputs_written", False)
    detail = f"after the outputs were written to '{out}'" if written else what.get(args.command)
    print(f"samir: interrupted ({'Ctrl-C' if name == 'SIGINT' else 'SIGTERM'})" + (f": {detail}" if detail else ""),
          file=sys.stderr, flush=True)
    return INTERRUPT_EXIT_CODES[name]


if __name__ == "__main__":
    sys.exit(main())
