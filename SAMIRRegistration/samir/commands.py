"""Training and evaluation commands: ``samir features | train | train-head | evaluate | register-batch``.

Each command is a :class:`Command` (help, its arguments, what it runs); :mod:`samir.cli` puts these
beside its own in the one command table it dispatches from. This module does not import the CLI.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Dict, NamedTuple

from .errors import SAMIRInputError
from .options import add_registration_arguments
from .progress import PROGRESS_STYLES


class Command(NamedTuple):
    """One ``samir`` command: its help line, what adds its arguments, what runs it (-> exit code)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    log_level: int = logging.WARNING  # of the "samir" logger while it runs


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a configuration value (TOML syntax), e.g. --set loss.hfc=0; repeatable")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the configuration's train.device)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_features_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training configuration (TOML or YAML)")
    parser.add_argument("--splits", default="", help="comma-separated splits (default: every split of the config)")
    _config_arguments(parser)


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training configuration (TOML or YAML); see configs/ and the README")
    parser.add_argument("--restart", action="store_true",
                        help="start over even if the output folder holds a training state (default: resume it)")
    _config_arguments(parser)


def _add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="training configuration whose data (and output folder) to use")
    parser.add_argument("--pairs", help="CSV/JSON of pairs (fixed, moving, fixed_seg, moving_seg) instead of a"
                                        " configuration")
    parser.add_argument("--weights", help="SAMIR network checkpoint (default: model_best.pt in train.output_dir)")
    parser.add_argument("--name", default="SAMIR", help="name of that network in the report (default SAMIR)")
    parser.add_argument("--baseline", action="append", default=[], metavar="METHOD",
                        help="also evaluate: identity, zeroshot[:PRESET], or NAME=CKPT (another checkpoint,"
                             " e.g. an ablation); repeatable")
    parser.add_argument("--split", help="split to evaluate (default: evaluation.split of the config, 'all' for --pairs)")
    parser.add_argument("--hd95-units", choices=("mm", "voxels", "both"),
                        help="HD95 in mm (MemWarp protocol) or voxels (Learn2Reg protocol); default: mm for ACDC"
                             " and pairs, voxels for AbdomenCTCT")
    parser.add_argument("--robustness", action="append", default=[], metavar="KIND[=S1,S2,...]",
                        help="robustness sweep: gamma or noise with strengths, e.g. gamma=0.5,1,2; repeatable")
    parser.add_argument("--perturb", default="moving", choices=("moving", "both"),
                        help="robustness: perturb the moving image (default) or both")
    parser.add_argument("--max-pairs", type=int, default=0, help="evaluate only the first N pairs")
    parser.add_argument("--no-cache", action="store_true", help="encode features afresh (true encoder runtime)")
    parser.add_argument("--out", help="report folder (default: <train.output_dir>/evaluation-<split>)")
    _config_arguments(parser)


def _add_register_batch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pairs", help="CSV/JSON with fixed, moving[, fixed_seg, moving_seg, fixed_mask, moving_mask,"
                                      " name, out]")
    parser.add_argument("--out", default="samir_batch", help="output folder (default: samir_batch)")
    parser.add_argument("--progress", default="none", choices=PROGRESS_STYLES)
    parser.add_argument("--transform-format", default="h5", choices=("h5", "tfm"))
    add_registration_arguments(parser)


def _load(args: argparse.Namespace):
    from .training import load_config
    config = load_config(args.config, args.overrides)
    if args.device:
        config.train.device = args.device
    if args.no_progress:
        config.train.progress = False
    return config


def run_features(args: argparse.Namespace) -> int:
    from .datasets import PairDataset
    from .distributed import init_distributed, shutdown_distributed
    from .training import FeatureProvider, precompute_features
    config = _load(args)
    if config.image_only:
        raise SAMIRInputError("model.encoder is 'none' (image-only): there are no encoder features to compute")
    splits = [s for s in args.splits.split(",") if s] or list(config.data.resolved().splits)
    context = init_distributed(config.train.device)
    try:
        datasets = [PairDataset(config.data, split) for split in splits]
        provider = FeatureProvider(config.model, config.features, context.device)
        counts = precompute_features(datasets, provider, context, config.train.progress)
        if context.is_main:
            stats = provider.cache.stats()
            print(f"features of {counts['volumes']} volumes ({', '.join(splits)}): {counts['encoded']} encoded,"
                  f" {counts['reused']} already cached (this rank); cache {stats['directory']}:"
                  f" {stats['entries']} entries, {stats['bytes'] / 1e9:.2f} GB of at most"
                  f" {stats['max_bytes'] / 1e9:.1f} GB")
    finally:
        shutdown_distributed(context)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from .training import train
    config = _load(args)
    result = train(config, restart=args.restart)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    best = f"{result.best_val_dice:.4f}" if result.best_val_dice > -1 else "n/a (no validation split)"
    print(f"trained {result.step} steps ({result.epoch} epochs); best validation Dice {best}")
    print(f"best model {result.best_model}; last model {result.last_model}; log {result.output_dir / 'log.jsonl'}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .datasets import DataConfig, PairDataset
    from .evaluation import (NetworkMethod, evaluate, parse_method, parse_sweep, robustness_sweep, write_report)
    from .checkpoint import load_model
    from .resources import resolve_device
    from .training import BEST_MODEL, FeatureSection, TrainingConfig
    if not args.config and not args.pairs:
        raise SAMIRInputError("samir evaluate needs a training configuration or --pairs PAIRS.csv")
    config = _load(args) if args.config else TrainingConfig()
    weights = args.weights or (str(Path(config.train.output_dir) / BEST_MODEL) if args.config else None)
    if args.pairs:
        normalization = load_model(weights).config.normalization if weights else "mr"
        config.data = DataConfig(layout="pairs", pairs_file=args.pairs, normalization=normalization)
    data = config.data.resolved()
    split = args.split or ("all" if args.pairs else config.evaluation.split)
    units = args.hd95_units or config.evaluation.hd95_units or ("voxels" if data.layout == "abdomenctct" else "mm")
    device = resolve_device(args.device or config.train.device)
    methods = []
    features: FeatureSection = config.features
    if weights:
        network = NetworkMethod(weights, args.name, features, device, use_cache=not args.no_cache)
        if network.model.config.normalization != data.normalization:
            raise SAMIRInputError(f"{Path(weights).name} was trained on"
                                  f" '{network.model.config.normalization}'-normalised images, the data section normalises with '{data.normalization}': set"
                                  f" data.normalization = \"{network.model.config.normalization}\"")
        methods.append(network)
    methods += [parse_method(text, features, str(device)) for text in args.baseline]
    dataset = PairDataset(config.data, split)
    out = Path(args.out) if args.out else (Path(config.train.output_dir) / f"evaluation-{split}" if args.config
                                          else Path("samir_eval"))
    report = evaluate(dataset, methods, units, args.max_pairs, progress=config.train.progress and not args.no_progress)
    write_report(report, out, f"SAMIR evaluation: {data.layout}, split {split}",
                 extra={"weights": weights, "split": split, "device": str(device)})
    for name, entry in report.summary.items():
        dice = entry.get("dice", {}).get("mean", float("nan"))
        hd_key = "hd95_mm" if units in ("mm", "both") else "hd95_voxels"
        hd = entry.get(hd_key, {}).get("mean", float("nan"))
        spread = entry.get("sdlogj", {}).get("mean", float("nan"))
        print(f"{name}: Dice {dice:.4f}, {hd_key} {hd:.2f}, SDlogJ {spread:.4f}"
              f" over {entry['pairs']} pairs")
    if args.robustness:
        sweeps = dict(parse_sweep(text) for text in args.robustness)
        robustness_sweep(dataset, methods, sweeps, args.perturb, args.max_pairs, out_dir=out)
    print(f"report in {out}: summary.md, per_pair.csv, per_label.csv, dice_boxplot.png"
          + (", robustness.csv, robustness.png" if args.robustness else ""))
    return 0


def run_register_batch(args: argparse.Namespace) -> int:
    from .batch import register_batch
    from .progress import StageProgress
    from .register import RegistrationOptions
    options = RegistrationOptions.from_arguments(args)
    progress = StageProgress(args.progress) if args.progress != "none" else None
    rows = register_batch(args.pairs, args.out, options, progress=progress, transform_format=args.transform_format)
    failed = [r for r in rows if r["status"] != "ok"]
    for row in failed:
        print(f"samir: pair {row['name']} failed: {row.get('error')}", file=sys.stderr)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{len(rows) - len(failed)} of {len(rows)} pairs registered; summary in"
              f" {Path(args.out) / 'batch_summary.csv'}")
    return 1 if failed else 0



def _add_train_head_arguments(parser: argparse.ArgumentParser) -> None:
    from .head_training import COLIN27_FOLDER, HeadTrainingSettings
    defaults = HeadTrainingSettings()
    parser.add_argument("--out", required=True, type=Path, help="the head file to write (.pt)")
    parser.add_argument("--colin27", type=Path, default=COLIN27_FOLDER,
                        help="folder with Colin27's ch2.nii.gz and aal.nii.gz (Debian mricron-data; default %(default)s)")
    parser.add_argument("--bank", type=Path, help="folder caching the encoded training views (reused when the"
                                                 " recipe is the same; default: none, encode every view)")
    parser.add_argument("--anchors", type=int, default=2, help="anchor views per anatomy (default %(default)s)")
    parser.add_argument("--warped", type=int, default=5, help="warped views per anatomy (default %(default)s)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of views and training (default %(default)s)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")


def run_train_head(args: argparse.Namespace) -> int:
    import torch
    from .encoders import build_encoder
    from .head_training import HeadTrainingSettings, build_bank, load_anatomies, save_head, train_head
    if not (args.colin27 / "ch2.nii.gz").is_file() or not (args.colin27 / "aal.nii.gz").is_file():
        raise SAMIRInputError(f"Colin27 not found: {args.colin27} has no ch2.nii.gz and aal.nii.gz (install Debian's"
                              " mricron-data, or give its templates folder with --colin27)")
    if args.threads:
        torch.set_num_threads(args.threads)
    log = logging.getLogger("samir")
    settings = HeadTrainingSettings(steps=args.steps, seed=args.seed)
    anatomies = load_anatomies(args.colin27)
    views = build_bank(anatomies, build_encoder("litemedsam"), torch.device("cpu"), args.anchors, args.warped,
                       args.seed, args.bank, progress=log.info)
    head = train_head(views, settings, progress=lambda step, loss: log.info("step %d: loss %.3f", step, loss))
    recipe = {"anatomies": [a.name for a in anatomies], "anchors": args.anchors, "warped": args.warped,
              "steps": args.steps, "seed": args.seed}
    digest = save_head(head, args.out, "litemedsam", recipe)
    print(f"wrote {args.out} (SHA-256 {digest})")
    return 0


TRAINING_COMMANDS: Dict[str, Command] = {
    "features": Command("precompute the encoder features of a dataset into the feature cache",
                        _add_features_arguments, run_features, logging.INFO),
    "train": Command("train a SAMIR network (head + PDFP) as a configuration file says", _add_train_arguments,
                     run_train, logging.INFO),
    "train-head": Command("train the SAFE head (contrast-invariant descriptors from the frozen encoder)",
                          _add_train_head_arguments, run_train_head, logging.INFO),
    "evaluate": Command("Dice, HD95, SDlogJ, folding, runtime of trained networks and baselines",
                        _add_evaluate_arguments, run_evaluate, logging.INFO),
    "register-batch": Command("register the pairs of a CSV/JSON file (spread over torchrun ranks)",
                              _add_register_batch_arguments, run_register_batch, logging.INFO),
}
