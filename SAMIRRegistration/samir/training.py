"""Training a SAMIR network (paper protocol): configuration, cached encoder features, loss, loop.

``samir train CONFIG`` (TOML, or YAML when PyYAML is installed) trains the head + PDFP of
:class:`samir.samirnet.SAMIRNet` on frozen, precomputed encoder features with

    L = λ0 NCC(F, M∘φ) + λ1 HFC + λ2 Dice(S_F, S_M∘φ) (weakly supervised, optional) + λ3 smoothness

(all λ = 1 by default; HFC = paper eq. 3 on the frozen channel-reduced encoder features of every
pyramid level), Adam with learning rate 1e-4, augmentation by swapping fixed and moving and by
flips. Before training a channel reduction (PCA, ``encoder_channels -> feature_channels``) is
fitted on training-set features and stored in every checkpoint, so features mean the same at
inference; the feature path is exactly the one of :func:`samir.inference.predict_field` (frame
component removed per pair, projected, sampled onto the grid).

Output folder (``train.output_dir``): ``model_best.pt`` (best validation Dice) and
``model_last.pt`` (SAMIR checkpoints for ``samir register --mode network --weights``),
``training_state.pt`` (model, optimiser, step, position in the epoch, RNG states: an interrupted run
resumes exactly where its last checkpoint was), ``log.jsonl`` (one JSON object per logged step and
per validation), and the configuration as given (``config.toml``/``.yaml``) and as resolved
(``config.resolved.json``).

Random numbers: the augmentation of each step draws from a generator seeded by (seed, step, rank),
so a resumed run makes the same draws as an uninterrupted one; the global RNG states are saved too.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .checkpoint import IMAGE_ONLY, ModelConfig, build_network, count_parameters, save_model
from .datasets import DataConfig, PairDataset, PreparedPair, PreparedVolume, describe
from .distributed import DistributedContext, init_distributed, shutdown_distributed
from .encoders import ENCODERS, SliceEncoder, build_encoder
from .feature_cache import FeatureCache
from .features import (ChannelReduction, SliceFeatures, auto_slice_stride, choose_slicing_axis, encode_volume,
                       fit_channel_reduction, remove_frame_component, sample_features)
from .geometry import SAMIRInputError
from .losses import diffusion_loss, hierarchical_feature_consistency, local_ncc_loss, ncc_window, soft_dice_loss
from .metrics import dice_per_label
from .resampling import warp_labels_on_grid
from .samirnet import SAMIRNet
from .spatial import resize_volume, warp

log = logging.getLogger("samir.training")
PathLike = Union[str, os.PathLike]
STATE_FORMAT = "samir-training-state"
STATE_VERSION = 1
STATE_FILE, LAST_MODEL, BEST_MODEL, LOG_FILE = "training_state.pt", "model_last.pt", "model_best.pt", "log.jsonl"
StepCallback = Optional[Callable[[int, Dict[str, float]], None]]


# =========================================================================== configuration

@dataclass
class ModelSection:
    encoder: str = "litemedsam"  # a frozen encoder (samir.encoders.ENCODERS), or "none": image-only head (ablation)
    input_size: int = 0  # encoder k; 0: the encoder's default (256 LiteMedSAM, 512 SAM)
    feature_channels: int = 16  # channel reduction (PCA) of the encoder features
    head_widths: Tuple[int, ...] = (32, 64, 32)
    levels: int = 5
    hidden: int = 32
    integration_steps: int = 7
    remove_frame_component: bool = True


@dataclass
class FeatureSection:
    cache_dir: str = ""  # default: $SAMIR_CACHE_DIR, else the user cache folder
    cache_max_gb: float = 0.0  # 0: $SAMIR_CACHE_MAX_GB (default 2); raise it to hold a whole dataset
    encoder_weights: str = ""  # SAM / MedSAM checkpoint file (default: the weights folder)
    slicing_axis: int = -1  # -1: automatic (largest spacing, else fewest slices), as in `samir register`
    slice_stride: int = 0  # 0: automatic, as in `samir register`
    batch_size: int = 0  # slices per encoder batch; 0: 32 on CUDA, 1 on CPU
    pca_pairs: int = 32  # training pairs the channel reduction is fitted on
    pca_samples: int = 200_000  # feature vectors it is fitted on


@dataclass
class LossSection:
    ncc: float = 1.0  # λ0, local NCC of fixed and warped moving image
    hfc: float = 1.0  # λ1, hierarchical feature consistency (needs encoder features)
    dice: float = 1.0  # λ2, soft Dice of the warped moving labels (0: unsupervised; used when both have labels)
    smoothness: float = 1.0  # λ3, diffusion regulariser of the final displacement
    ncc_window: int = 9


@dataclass
class OptimSection:
    learning_rate: float = 1e-4
    batch_size: int = 1  # pairs per step and process (pairs of a batch must share a grid)
    epochs: int = 100
    max_steps: int = 0  # stop after this many steps (0: after `epochs`)


@dataclass
class AugmentSection:
    swap: bool = True  # exchange fixed and moving
    flip_axes: Tuple[int, ...] = (0, 1, 2)  # array axes (z, y, x) that may be flipped
    probability: float = 0.5  # of each swap / flip


@dataclass
class TrainSection:
    output_dir: str = "samir_runs/run"
    checkpoint_every: int = 500  # steps
    log_every: int = 10  # steps
    validate_every: int = 1  # epochs
    validate_at_start: bool = True  # log the untrained network's validation Dice (epoch 0)
    max_val_pairs: int = 0  # 0: all validation pairs
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    description: str = ""  # stored in the checkpoint as training_data (default: from the data section)


@dataclass
class EvaluationSection:
    split: str = "test"
    hd95_units: str = ""  # "mm" (MemWarp protocol), "voxels" (Learn2Reg protocol) or "both"; default per layout


SECTIONS = {"model": ModelSection, "features": FeatureSection, "loss": LossSection, "optim": OptimSection,
            "augment": AugmentSection, "train": TrainSection, "evaluation": EvaluationSection}


@dataclass
class TrainingConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    features: FeatureSection = field(default_factory=FeatureSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    train: TrainSection = field(default_factory=TrainSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    source: str = ""  # the file it was read from
    source_text: str = ""  # that file's text, saved next to the checkpoints
    overrides: Tuple[str, ...] = ()  # --set section.key=value applied on top of the file

    @property
    def image_only(self) -> bool:
        return self.model.encoder == IMAGE_ONLY

    def to_dict(self) -> dict:
        out = {name: asdict(getattr(self, name)) for name in ("data", *SECTIONS)}
        return json.loads(json.dumps(out, default=list))

    def validate(self) -> None:
        self.data.resolved()
        problems = []
        m, o, lo, a, t = self.model, self.optim, self.loss, self.augment, self.train
        if m.encoder not in ENCODERS and m.encoder != IMAGE_ONLY:
            problems.append(f"model.encoder '{m.encoder}' is not one of {', '.join(ENCODERS)} or '{IMAGE_ONLY}'")
        if not self.image_only and m.feature_channels < 1:
            problems.append("model.feature_channels must be at least 1 (or model.encoder = 'none')")
        for name, value in (("model.levels", m.levels), ("model.hidden", m.hidden),
                            ("model.integration_steps", m.integration_steps), ("optim.batch_size", o.batch_size),
                            ("optim.epochs", o.epochs), ("train.checkpoint_every", t.checkpoint_every),
                            ("train.log_every", t.log_every), ("train.validate_every", t.validate_every),
                            ("loss.ncc_window", lo.ncc_window), ("features.pca_pairs", self.features.pca_pairs)):
            if value < 1:
                problems.append(f"{name} must be at least 1, got {value}")
        if not m.head_widths or min(m.head_widths) < 1:
            problems.append(f"model.head_widths must be positive, got {list(m.head_widths)}")
        if o.learning_rate <= 0:
            problems.append(f"optim.learning_rate must be positive, got {o.learning_rate}")
        if o.max_steps < 0:
            problems.append("optim.max_steps must be >= 0")
        for name in ("ncc", "hfc", "dice", "smoothness"):
            if getattr(lo, name) < 0:
                problems.append(f"loss.{name} must be >= 0")
        if self.image_only and lo.hfc > 0:
            problems.append("loss.hfc needs encoder features: set loss.hfc = 0 for the image-only ablation"
                            " (model.encoder = 'none')")
        if lo.ncc + lo.hfc + lo.dice == 0:
            problems.append("loss: ncc, hfc and dice are all 0 — nothing to learn from")
        if any(axis not in (0, 1, 2) for axis in a.flip_axes):
            problems.append(f"augment.flip_axes must be array axes 0, 1, 2, got {list(a.flip_axes)}")
        if not 0 <= a.probability <= 1:
            problems.append(f"augment.probability must be in [0, 1], got {a.probability}")
        if self.features.slicing_axis not in (-1, 0, 1, 2):
            problems.append("features.slicing_axis must be -1 (automatic), 0, 1 or 2")
        if self.evaluation.hd95_units not in ("", "mm", "voxels", "both"):
            problems.append(f"evaluation.hd95_units '{self.evaluation.hd95_units}' is not mm, voxels or both")
        if problems:
            raise SAMIRInputError("invalid training configuration: " + "; ".join(problems))


def _coerce(value, annotation: str, where: str):
    """``value`` from a config file as the type a dataclass field is annotated with."""
    ann = annotation.replace("typing.", "")
    optional = ann.startswith("Optional[")
    if optional:
        ann = ann[len("Optional["):-1]
    if value is None:
        if optional:
            return None
        raise SAMIRInputError(f"{where} must not be empty")
    if ann == "bool":
        if not isinstance(value, bool):
            raise SAMIRInputError(f"{where} must be true or false, got {value!r}")
        return value
    if ann == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SAMIRInputError(f"{where} must be an integer, got {value!r}")
        return value
    if ann == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SAMIRInputError(f"{where} must be a number, got {value!r}")
        return float(value)
    if ann == "str":
        if not isinstance(value, str):
            raise SAMIRInputError(f"{where} must be a string, got {value!r}")
        return value
    if ann.startswith("Tuple["):
        if not isinstance(value, (list, tuple)):
            raise SAMIRInputError(f"{where} must be a list, got {value!r}")
        element = "int" if "int" in ann else ("float" if "float" in ann else "str")
        return tuple(_coerce(v, element, where) for v in value)
    if ann.startswith("Dict["):
        if not isinstance(value, dict):
            raise SAMIRInputError(f"{where} must be a table of key = value, got {value!r}")
        return dict(value)
    return value


def _section(cls, values: dict, name: str):
    if not isinstance(values, dict):
        raise SAMIRInputError(f"[{name}] must be a table, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SAMIRInputError(f"unknown setting(s) in [{name}]: {', '.join(unknown)} (known: {', '.join(known)})")
    return cls(**{key: _coerce(value, str(known[key].type), f"{name}.{key}") for key, value in values.items()})


def config_from_dict(values: dict, source: str = "", source_text: str = "") -> TrainingConfig:
    unknown = sorted(set(values) - {"data", *SECTIONS})
    if unknown:
        raise SAMIRInputError(f"unknown section(s) {', '.join(unknown)}; sections: data, {', '.join(SECTIONS)}")
    data = _section(DataConfig, values.get("data", {}), "data")
    data.splits = {str(k): str(v) for k, v in data.splits.items()}
    data.labels = {int(k): str(v) for k, v in data.labels.items()}
    config = TrainingConfig(data, **{name: _section(cls, values.get(name, {}), name) for name, cls in SECTIONS.items()},
                            source=source, source_text=source_text)
    config.validate()
    return config


def parse_override(text: str) -> Tuple[List[str], object]:
    """``section.key=value`` (value in TOML syntax; a bare word is a string) -> (path, value)."""
    import tomllib
    if "=" not in text:
        raise SAMIRInputError(f"--set '{text}': expected section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise SAMIRInputError(f"--set '{text}': name the section, e.g. loss.hfc=0")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


RELATIVE_PATHS = (("data", "root"), ("data", "pairs_file"), ("features", "cache_dir"), ("features", "encoder_weights"),
                  ("train", "output_dir"))


def load_config(path: PathLike, overrides: Sequence[str] = ()) -> TrainingConfig:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``, needs PyYAML) configuration, apply ``--set`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise SAMIRInputError(f"configuration file '{path}' does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SAMIRInputError(f"'{path.name}' is YAML but PyYAML is not installed: pip install pyyaml, or use"
                                  " TOML") from None
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise SAMIRInputError(f"'{path}' is not valid YAML: {exc}") from None
    else:
        import tomllib
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SAMIRInputError(f"'{path}' is not valid TOML: {exc}") from None
    if not isinstance(values, dict):
        raise SAMIRInputError(f"'{path}' must hold sections (tables) of settings")
    for override in overrides:
        keys, value = parse_override(override)
        target = values
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise SAMIRInputError(f"--set '{override}': '{key}' is not a section")
        target[keys[-1]] = value
    for section, key in RELATIVE_PATHS:  # relative paths are relative to the configuration file
        table = values.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str) and table[key]:
            candidate = Path(table[key]).expanduser()
            table[key] = str(candidate if candidate.is_absolute() else (path.parent / candidate).resolve())
    config = config_from_dict(values, str(path), text)
    config.overrides = tuple(overrides)
    return config


# =========================================================================== features

@dataclass
class ReducedFeatures:
    """A volume's channel-reduced encoder features, split so the per-pair frame removal stays exact.

    ``centred`` = (x - mean) @ basis per slice, ``slice_sum`` = sum over slices of x @ basis; for a pair,
    the frame component of :func:`samir.features.remove_frame_component` projects to
    ``(slice_sum_f + slice_sum_m) / (N_f + N_m)``.
    """
    centred: SliceFeatures  # (N, n, f, f) float16
    slice_sum: torch.Tensor  # (n, f, f) float32


class FeatureProvider:
    """Encoder features of prepared volumes through the on-disk cache, and their reduced form in memory."""

    def __init__(self, model: ModelSection, features: FeatureSection, device: torch.device,
                 encoder: Optional[SliceEncoder] = None, use_cache: bool = True):
        self.model, self.settings, self.device = model, features, device
        self._encoder = encoder
        self.use_cache = use_cache
        max_bytes = int(features.cache_max_gb * 1e9) if features.cache_max_gb > 0 else None
        self.cache = FeatureCache(features.cache_dir or None, max_bytes)
        self._reduced: Dict[str, ReducedFeatures] = {}
        self.encoded = self.reused = 0

    @property
    def encoder(self) -> SliceEncoder:
        if self._encoder is None:
            weights = self.settings.encoder_weights or None
            self._encoder = build_encoder(self.model.encoder, weights, self.model.input_size or None)
        if self._encoder.name != self.model.encoder:
            raise SAMIRInputError(f"model.encoder is '{self.model.encoder}' but the encoder given is "
                                  f"'{self._encoder.name}'")
        return self._encoder

    def plan(self, volume: PreparedVolume) -> Tuple[int, int]:
        """Slicing axis and slice stride, chosen as `samir register` chooses them for this grid."""
        axis = self.settings.slicing_axis if self.settings.slicing_axis >= 0 else \
            choose_slicing_axis(volume.shape, volume.spacing_zyx)
        stride = self.settings.slice_stride or auto_slice_stride(volume.shape, volume.spacing_zyx, axis,
                                                                  self.encoder.feature_size)
        return axis, stride

    def raw(self, volume: PreparedVolume) -> SliceFeatures:
        """The encoder's features of ``volume`` (fp16), from the cache or encoded (and cached)."""
        axis, stride = self.plan(volume)
        batch = self.settings.batch_size or None
        encode = lambda: encode_volume(volume.image, self.encoder, axis, self.device, batch, None, stride)
        if volume.perturbed or not self.use_cache:  # robustness sweeps: one-off images, not worth caching
            self.encoded += 1
            return encode()
        features = self.cache.fetch_or_encode(volume.key, volume.image, volume.spacing_zyx, volume.normalization,
                                              self.encoder, axis, stride, self.device, encode)
        if self.cache.lookups.get(volume.key):
            self.reused += 1
        else:
            self.encoded += 1
        return features

    def reduced(self, volume: PreparedVolume, reduction: ChannelReduction) -> ReducedFeatures:
        if volume.key in self._reduced and not volume.perturbed:
            return self._reduced[volume.key]
        raw = self.raw(volume)
        x = raw.features.float()
        projected = torch.einsum("nchw,ck->nkhw", x, reduction.basis)
        offset = (reduction.mean @ reduction.basis).view(1, -1, 1, 1)
        out = ReducedFeatures(SliceFeatures((projected - offset).half(), raw.axis, raw.volume_shape, raw.pad_before,
                                            raw.padded_size), projected.sum(0))
        if not volume.perturbed:
            self._reduced[volume.key] = out
        return out


def pair_feature_maps(fixed: ReducedFeatures, moving: ReducedFeatures, shape: Sequence[int], device: torch.device,
                      remove_frame: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reduced features of a pair on the full grid ``(1, n, D, H, W)``, as :func:`predict_field` makes them."""
    maps = []
    frame = None
    if remove_frame:
        count = fixed.centred.features.shape[0] + moving.centred.features.shape[0]
        frame = (fixed.slice_sum + moving.slice_sum) / count
    for item in (fixed, moving):
        features = item.centred.features.float()
        if frame is not None:
            features = features - frame
        sliced = SliceFeatures(features, item.centred.axis, item.centred.volume_shape, item.centred.pad_before,
                               item.centred.padded_size)
        maps.append(sample_features(sliced, shape, device))
    return maps[0], maps[1]


def fit_training_reduction(dataset: PairDataset, provider: FeatureProvider, n_components: int,
                           max_pairs: int = 32, max_samples: int = 200_000, seed: int = 0,
                           remove_frame: bool = True) -> ChannelReduction:
    """PCA of encoder features over (up to ``max_pairs``, evenly chosen) training pairs, frame removed per pair."""
    if len(dataset) == 0:
        raise SAMIRInputError("the training split has no pairs: cannot fit the channel reduction")
    count = min(max_pairs, len(dataset))
    chosen = sorted({int(round(i)) for i in np.linspace(0, len(dataset) - 1, count)})
    per_volume = max(1, max_samples // (2 * len(chosen)))
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for index in chosen:
        pair = dataset[index]
        sets = [provider.raw(pair.fixed), provider.raw(pair.moving)]
        if remove_frame:
            sets = remove_frame_component(sets)
        for fs in sets:
            vectors = fs.features.permute(0, 2, 3, 1).reshape(-1, fs.features.shape[1])
            take = torch.randperm(vectors.shape[0], generator=generator)[:per_volume]
            samples.append(vectors[take])
    vectors = torch.cat(samples)
    if n_components > vectors.shape[1]:
        raise SAMIRInputError(f"model.feature_channels = {n_components} exceeds the encoder's"
                              f" {vectors.shape[1]} channels")
    as_features = SliceFeatures(vectors.view(-1, vectors.shape[1], 1, 1), 0, (vectors.shape[0], 1, 1), (0, 0), 1)
    return fit_channel_reduction([as_features], n_components, max_samples=max_samples, seed=seed)


def precompute_features(datasets: Sequence[PairDataset], provider: FeatureProvider,
                        context: Optional[DistributedContext] = None, progress: bool = True) -> Dict[str, int]:
    """Encode every volume of ``datasets`` into the feature cache (this rank's share); resumable:
    volumes already in the cache are skipped. Returns counts of encoded / reused volumes."""
    context = context or DistributedContext(device=provider.device)
    volumes, seen = [], set()
    for dataset in datasets:
        for record, pair in dataset.volume_records():
            if record.key not in seen:
                seen.add(record.key)
                volumes.append((dataset, record, pair))
    mine = context.shard(volumes)
    before_encoded, before_reused = provider.encoded, provider.reused
    bar = None
    if progress and context.is_main:
        from tqdm import tqdm
        bar = tqdm(total=len(mine), desc="features", unit="volume")
    estimate_checked = False
    for dataset, record, pair in mine:
        features = provider.raw(dataset.volume(record, pair))
        if not estimate_checked:
            estimate_checked = True
            total = features.features.numel() * 2 * len(volumes)
            if total > provider.cache.max_bytes:
                log.warning("the features of %d volumes need about %.1f GB but the cache holds at most %.1f GB: older"
                            " entries will be evicted and re-encoded; raise features.cache_max_gb (or"
                            " SAMIR_CACHE_MAX_GB)", len(volumes), total / 1e9, provider.cache.max_bytes / 1e9)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(encoded=provider.encoded - before_encoded, cached=provider.reused - before_reused)
    if bar is not None:
        bar.close()
    context.barrier()
    return {"volumes": len(volumes), "this_rank": len(mine), "encoded": provider.encoded - before_encoded,
            "reused": provider.reused - before_reused}


# =========================================================================== loss

class RegistrationObjective(nn.Module):
    """The training loss around a :class:`SAMIRNet` (one module, so DistributedDataParallel can wrap it)."""

    def __init__(self, net: SAMIRNet, weights: LossSection):
        super().__init__()
        self.net = net
        self.weights = weights

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, fixed_features: torch.Tensor,
                moving_features: torch.Tensor, fixed_onehot: Optional[torch.Tensor],
                moving_onehot: Optional[torch.Tensor], slicing_axis: Optional[int],
                spacing_zyx: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns the total loss and its parts ``(ncc, hfc, dice, smoothness)`` (unweighted, detached)."""
        w = self.weights
        out = self.net(fixed_features, fixed, moving_features, moving, slicing_axis, spacing_zyx)
        u = out.final
        zero = u.new_zeros(())
        ncc = local_ncc_loss(fixed, warp(moving, u), ncc_window(spacing_zyx, w.ncc_window)) if w.ncc > 0 else zero
        hfc = zero
        if w.hfc > 0 and fixed_features.shape[1] > 0:
            fixed_levels, warped_levels = [], []
            for field_, shape in zip(reversed(out.fields), reversed(out.shapes)):  # level 1 (finest) first
                fixed_levels.append(resize_volume(fixed_features, shape))
                warped_levels.append(warp(resize_volume(moving_features, shape), field_))
            hfc = hierarchical_feature_consistency(fixed_levels, warped_levels)
        dice = zero
        if w.dice > 0 and fixed_onehot is not None and moving_onehot is not None:
            dice = soft_dice_loss(fixed_onehot, warp(moving_onehot, u))
        smooth = diffusion_loss(u, spacing_zyx) if w.smoothness > 0 else zero
        total = w.ncc * ncc + w.hfc * hfc + w.dice * dice + w.smoothness * smooth
        return total, torch.stack([ncc, hfc, dice, smooth]).detach()


LOSS_PARTS = ("ncc", "hfc", "dice", "smoothness")


def onehot(labels: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    """``(B, 1, D, H, W)`` label map -> ``(B, len(values), D, H, W)`` float masks of the given labels."""
    return torch.cat([(labels == v).float() for v in values], dim=1)


@dataclass
class PairTensors:
    fixed: torch.Tensor  # (1, 1, D, H, W)
    moving: torch.Tensor
    fixed_features: torch.Tensor  # (1, n, D, H, W)
    moving_features: torch.Tensor
    fixed_labels: Optional[torch.Tensor]  # (1, 1, D, H, W) int64
    moving_labels: Optional[torch.Tensor]
    spacing_zyx: Tuple[float, float, float]
    slicing_axis: int

    def swapped(self) -> "PairTensors":
        return PairTensors(self.moving, self.fixed, self.moving_features, self.fixed_features, self.moving_labels,
                           self.fixed_labels, self.spacing_zyx, self.slicing_axis)

    def flipped(self, axis: int) -> "PairTensors":
        dim = 2 + axis
        flip = lambda t: None if t is None else torch.flip(t, dims=(dim,))
        return PairTensors(flip(self.fixed), flip(self.moving), flip(self.fixed_features), flip(self.moving_features),
                           flip(self.fixed_labels), flip(self.moving_labels), self.spacing_zyx, self.slicing_axis)


class PairLoader:
    """Tensors of prepared pairs on a device: images, reduced feature maps, labels."""

    def __init__(self, provider: Optional[FeatureProvider], reduction: Optional[ChannelReduction],
                 remove_frame: bool, device: torch.device, slicing_axis: int = -1):
        self.provider, self.reduction, self.remove_frame, self.device = provider, reduction, remove_frame, device
        self.slicing_axis = slicing_axis

    def axis_for(self, volume: PreparedVolume) -> int:
        if self.provider is not None:
            return self.provider.plan(volume)[0]
        return self.slicing_axis if self.slicing_axis >= 0 else choose_slicing_axis(volume.shape, volume.spacing_zyx)

    def __call__(self, pair: PreparedPair) -> PairTensors:
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))[None, None].to(self.device)
        fixed, moving = as_tensor(pair.fixed.image), as_tensor(pair.moving.image)
        if self.provider is None:
            ff = mf = fixed.new_zeros((1, 0, *fixed.shape[2:]))
        else:
            ff, mf = pair_feature_maps(self.provider.reduced(pair.fixed, self.reduction),
                                       self.provider.reduced(pair.moving, self.reduction), pair.fixed.shape,
                                       self.device, self.remove_frame)
        labels = lambda v: None if v.labels is None else as_tensor(v.labels.astype(np.int64))
        spacing = tuple(float(s) for s in pair.fixed.spacing_zyx)
        return PairTensors(fixed, moving, ff, mf, labels(pair.fixed), labels(pair.moving), spacing,
                           self.axis_for(pair.fixed))


def augment(pair: PairTensors, settings: AugmentSection, generator: torch.Generator) -> PairTensors:
    """Random swap of fixed and moving, random flips (features flipped with the images, not re-encoded)."""
    if settings.swap and float(torch.rand((), generator=generator)) < settings.probability:
        pair = pair.swapped()
    for axis in settings.flip_axes:
        if float(torch.rand((), generator=generator)) < settings.probability:
            pair = pair.flipped(axis)
    return pair


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2 ** 63))


def collate(pairs: Sequence[PairTensors], label_values: Sequence[int]):
    shapes = {tuple(p.fixed.shape[2:]) for p in pairs}
    if len(shapes) > 1:
        raise SAMIRInputError(f"pairs of one batch have different grids {sorted(shapes)}: use optim.batch_size = 1 or"
                              " a target grid (data.target_shape_zyx / target_spacing_zyx)")
    cat = lambda name: torch.cat([getattr(p, name) for p in pairs])
    with_labels = all(p.fixed_labels is not None and p.moving_labels is not None for p in pairs) and label_values
    fixed_onehot = onehot(cat("fixed_labels"), label_values) if with_labels else None
    moving_onehot = onehot(cat("moving_labels"), label_values) if with_labels else None
    return (cat("fixed"), cat("moving"), cat("fixed_features"), cat("moving_features"), fixed_onehot, moving_onehot,
            pairs[0].slicing_axis, pairs[0].spacing_zyx)


# =========================================================================== validation

@torch.no_grad()
def validation_dice(net: SAMIRNet, dataset: PairDataset, loader: PairLoader, indices: Sequence[int],
                    context: DistributedContext) -> Tuple[float, Dict[int, float]]:
    """Mean Dice over labels and pairs (each rank evaluates its share of ``indices``), and per label."""
    was_training = net.training
    net.eval()
    values = sorted(dataset.labels)
    sums = torch.zeros(2 * len(values) + 2, dtype=torch.float64, device=context.device)
    for index in context.shard(list(indices)):
        prepared = dataset[index]
        if prepared.fixed.labels is None or prepared.moving.labels is None:
            continue
        pair = loader(prepared)
        u = net(pair.fixed_features, pair.fixed, pair.moving_features, pair.moving, pair.slicing_axis,
                pair.spacing_zyx).final
        # the label rule of the reported Dice (samir evaluate), so the best model is chosen by it
        warped = warp_labels_on_grid(prepared.moving.labels, prepared.fixed.grid, u)
        scores = dice_per_label(prepared.fixed.labels, warped, values)
        if scores:
            sums[0] += float(np.mean(list(scores.values())))
            sums[1] += 1
        for j, v in enumerate(values):
            if v in scores:
                sums[2 + 2 * j] += scores[v]
                sums[3 + 2 * j] += 1
    context.all_reduce_sum(sums)
    net.train(was_training)
    sums = sums.cpu()
    mean = float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")
    per_label = {v: float(sums[2 + 2 * j] / sums[3 + 2 * j]) for j, v in enumerate(values) if sums[3 + 2 * j] > 0}
    return mean, per_label


# =========================================================================== state

def rng_states() -> dict:
    numpy_state = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": {"name": numpy_state[0], "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
                        "pos": int(numpy_state[2]), "has_gauss": int(numpy_state[3]), "gauss": float(numpy_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    python = states["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _atomic_save(payload: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_training_state(path: Path) -> dict:
    from .weights_only import load_checkpoint
    try:
        state = load_checkpoint(path, "training state")
    except SAMIRInputError as exc:
        raise SAMIRInputError(f"{exc}; delete it or pass --restart") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SAMIRInputError(f"'{path}' is not a SAMIR training state")
    if state.get("version", 0) > STATE_VERSION:
        raise SAMIRInputError(f"'{path}' was written by a newer SAMIR (state version {state.get('version')})")
    return state


# =========================================================================== the loop

@dataclass
class TrainingResult:
    output_dir: Path
    step: int
    epoch: int
    best_val_dice: float
    best_model: Path
    last_model: Path
    history: List[dict]
    model_config: ModelConfig
    resumed_from_step: int = 0
    net: Optional[SAMIRNet] = None  # the network as training left it (last step), on this process


def model_config_for(config: TrainingConfig, encoder: Optional[SliceEncoder], description: str) -> ModelConfig:
    m = config.model
    if config.image_only:
        return ModelConfig(encoder=IMAGE_ONLY, input_size=0, encoder_channels=0, feature_channels=0,
                           head_widths=tuple(m.head_widths), levels=m.levels, hidden=m.hidden,
                           integration_steps=m.integration_steps, normalization=config.data.resolved().normalization,
                           remove_frame_component=False, training_data=description)
    return ModelConfig(encoder=m.encoder, input_size=encoder.input_size, encoder_channels=encoder.out_channels,
                       feature_channels=m.feature_channels, head_widths=tuple(m.head_widths), levels=m.levels,
                       hidden=m.hidden, integration_steps=m.integration_steps,
                       normalization=config.data.resolved().normalization,
                       remove_frame_component=m.remove_frame_component, training_data=description)


def _write_config_copy(config: TrainingConfig, out: Path) -> None:
    if config.source_text:
        suffix = Path(config.source).suffix.lower() if config.source else ".toml"
        (out / f"config{suffix if suffix in ('.toml', '.yaml', '.yml') else '.toml'}").write_text(config.source_text)
    resolved = {"source": config.source, "overrides": list(config.overrides), **config.to_dict()}
    (out / "config.resolved.json").write_text(json.dumps(resolved, indent=2))


class JsonLog:
    """``log.jsonl`` on rank 0; on resume, records after the resumed step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: Optional[int]):
        self.path, self.enabled = path, enabled
        self.records: List[dict] = []
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.is_file():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= resume_step:
                    kept.append(record)
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self.records = kept

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def train(config: TrainingConfig, encoder: Optional[SliceEncoder] = None, restart: bool = False,
          on_step: StepCallback = None, context: Optional[DistributedContext] = None) -> TrainingResult:
    """Train (or resume training) as ``config`` says; see the module docstring for what is written.

    ``encoder``: the frozen encoder to use (default: built from ``model.encoder``); ``restart``: ignore
    a training state in the output folder; ``on_step(step, losses)``: called after every step.
    Under ``torchrun`` the processes share the work (DistributedDataParallel).
    """
    config.validate()
    own_context = context is None
    context = context or init_distributed(config.train.device)
    try:
        return Trainer(config, encoder, restart, on_step, context).run()
    finally:
        if own_context:
            shutdown_distributed(context)


def training_datasets(config: TrainingConfig) -> Tuple[PairDataset, Optional[PairDataset]]:
    """The training pairs and the validation pairs (None without a non-empty ``val`` split)."""
    train_set = PairDataset(config.data, "train")
    val_set = PairDataset(config.data, "val") if "val" in train_set.config.splits else None
    if len(train_set) == 0:
        raise SAMIRInputError(f"no training pairs: {describe(train_set)}")
    if val_set is not None and len(val_set) == 0:
        val_set = None
    return train_set, val_set


@dataclass
class RunPosition:
    """Where a run is: what a training state saves and a resumed run continues from."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_val: float = -math.inf
    best_step: int = -1


class LossWindow:
    """Mean losses since the last ``train`` log record, and the training throughput."""

    def __init__(self):
        self.started, self.steps_timed = time.perf_counter(), 0
        self._reset()

    def _reset(self) -> None:
        self.sums = {k: 0.0 for k in ("loss",) + LOSS_PARTS}
        self.steps = 0

    def add(self, losses: Dict[str, float]) -> None:
        for k, v in losses.items():
            self.sums[k] += v
        self.steps += 1

    def record(self, position: RunPosition, lr: float, pairs_per_step: int, validation_seconds: float) -> dict:
        """The ``train`` log record (then the window starts over)."""
        elapsed = time.perf_counter() - self.started
        training_seconds = max(elapsed - validation_seconds, 1e-9)  # training pairs/s, validation excluded
        out = {"event": "train", "step": position.step, "epoch": position.epoch,
               **{k: v / self.steps for k, v in self.sums.items()}, "lr": lr,
               "pairs_per_s": self.steps_timed * pairs_per_step / training_seconds, "elapsed_s": elapsed}
        self._reset()
        return out


class Trainer:
    """One training run: data, features, network, optimiser, and the run's position in its schedule.

    Built from a configuration (resuming from ``training_state.pt`` unless ``restart``), :meth:`run`
    trains to the end and writes the checkpoints and the log."""

    def __init__(self, config: TrainingConfig, encoder: Optional[SliceEncoder], restart: bool,
                 on_step: StepCallback, context: DistributedContext):
        self.config, self.on_step, self.context = config, on_step, context
        self.device = context.device
        self.out = Path(config.train.output_dir).expanduser()
        if context.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.train_set, self.val_set = training_datasets(config)
        self.label_values = sorted(self.train_set.labels)
        self.provider, encoder = self._feature_provider(encoder)
        self.model_config = model_config_for(config, encoder, config.train.description or describe(self.train_set))
        state = self._previous_state(restart)
        self.resuming = state is not None
        torch.manual_seed(config.train.seed)
        self.net = build_network(self.model_config).to(self.device)
        self.reduction = self._channel_reduction(state, encoder)
        self.loader = PairLoader(self.provider, self.reduction if self.provider is not None else None,
                                 config.model.remove_frame_component, self.device, config.features.slicing_axis)
        self.model, self.optimizer = self._optimisation()
        self.position = RunPosition()
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.position = RunPosition(state["step"], state["epoch"], state["batch_in_epoch"], state["best_val_dice"],
                                        state["best_step"])
            restore_rng_states(state["rng"])
        self.resumed_from = self.position.step
        self.journal = self._start_journal()
        self._schedule()
        self.validation_seconds = 0.0

    # ----------------------------------------------------------------------- set-up steps

    def _feature_provider(self, encoder: Optional[SliceEncoder]):
        """The encoder features of every volume, precomputed into the cache (none for an image-only network)."""
        if self.config.image_only:
            return None, encoder
        provider = FeatureProvider(self.config.model, self.config.features, self.device, encoder)
        encoder = provider.encoder
        precompute_features([d for d in (self.train_set, self.val_set) if d is not None], provider, self.context,
                            self.config.train.progress)
        if self.device.type == "cuda":  # training reads cached features: free the GPU memory the encoder holds
            encoder.cpu()
            torch.cuda.empty_cache()
        return provider, encoder

    def _previous_state(self, restart: bool) -> Optional[dict]:
        state_path = self.out / STATE_FILE
        if not state_path.is_file() or restart:
            return None
        state = load_training_state(state_path)
        if state["model_config"] != self.model_config.to_dict():
            raise SAMIRInputError(f"'{self.out}' holds a run of another model configuration; use another"
                                  " train.output_dir, or --restart to start over there")
        return state

    def _channel_reduction(self, state: Optional[dict], encoder: Optional[SliceEncoder]) -> ChannelReduction:
        """The saved reduction (and weights) of a resumed run, else a PCA fitted by rank 0 and broadcast."""
        if state is not None:
            self.net.load_state_dict(state["model"])
            return ChannelReduction(state["reduction"]["mean"], state["reduction"]["basis"])
        if self.provider is None:
            return ChannelReduction(torch.zeros(0), torch.zeros(0, 0))
        config, context = self.config, self.context
        if context.is_main:
            reduction = fit_training_reduction(self.train_set, self.provider, config.model.feature_channels,
                                               config.features.pca_pairs, config.features.pca_samples,
                                               config.train.seed, config.model.remove_frame_component)
        else:
            reduction = ChannelReduction(torch.zeros(encoder.out_channels),
                                         torch.zeros(encoder.out_channels, config.model.feature_channels))
        return ChannelReduction(context.broadcast(reduction.mean.to(self.device)).cpu(),
                                context.broadcast(reduction.basis.to(self.device)).cpu())

    def _optimisation(self):
        """The loss module (wrapped for DistributedDataParallel under torchrun) and Adam on the network."""
        objective = RegistrationObjective(self.net, self.config.loss).to(self.device)
        model = objective
        if self.context.enabled:
            from torch.nn.parallel import DistributedDataParallel
            model = DistributedDataParallel(objective,
                                            device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model, torch.optim.Adam(self.net.parameters(), lr=self.config.optim.learning_rate)

    def _start_journal(self) -> JsonLog:
        if self.context.is_main:
            _write_config_copy(self.config, self.out)
        position = self.position
        journal = JsonLog(self.out / LOG_FILE, self.context.is_main, position.step if self.resuming else None)
        val_pairs = len(self.val_set) if self.val_set is not None else 0
        journal.write({"event": "resume" if self.resuming else "start", "step": position.step,
                       "epoch": position.epoch, "world_size": self.context.world_size, "device": str(self.device),
                       "train_pairs": len(self.train_set), "val_pairs": val_pairs,
                       "trainable_parameters": count_parameters(self.net), "model": self.model_config.to_dict()})
        return journal

    def _schedule(self) -> None:
        """Each rank's share of every epoch, the number of steps, the validation pairs."""
        from torch.utils.data.distributed import DistributedSampler
        t, optim = self.config.train, self.config.optim
        self.sampler = DistributedSampler(range(len(self.train_set)), num_replicas=self.context.world_size,
                                          rank=self.context.rank, shuffle=True, seed=t.seed, drop_last=False)
        steps_per_epoch = math.ceil(len(self.sampler) / optim.batch_size)
        self.total_steps = optim.epochs * steps_per_epoch
        if optim.max_steps:
            self.total_steps = min(self.total_steps, optim.max_steps)
        val_indices = list(range(len(self.val_set))) if self.val_set is not None else []
        if t.max_val_pairs and len(val_indices) > t.max_val_pairs:
            val_indices = [int(round(i)) for i in np.linspace(0, len(val_indices) - 1, t.max_val_pairs)]
        self.val_indices = val_indices

    # ----------------------------------------------------------------------- checkpoints and validation

    def checkpoint_extra(self, val_dice: float) -> dict:
        """What a SAMIR checkpoint of this run records besides the weights."""
        grid = self.train_set[0].fixed
        return {"step": self.position.step, "epoch": self.position.epoch,
                "val_dice": float(val_dice) if math.isfinite(val_dice) else -1.0,
                "layout": self.train_set.config.layout, "grid_shape_zyx": [int(n) for n in grid.shape],
                "grid_spacing_zyx": [float(s) for s in grid.spacing_zyx],
                "slicing_axis": int(self.loader.axis_for(grid)),
                "loss_weights": {k: float(getattr(self.config.loss, k)) for k in LOSS_PARTS},
                "world_size": self.context.world_size}

    def save_state(self) -> None:
        """``training_state.pt`` and ``model_last.pt`` (rank 0)."""
        if not self.context.is_main:
            return
        p = self.position
        payload = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": p.step, "epoch": p.epoch,
                   "batch_in_epoch": p.batch_in_epoch, "best_val_dice": float(p.best_val),
                   "best_step": int(p.best_step),
                   "model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                   "optimizer": self.optimizer.state_dict(), "model_config": self.model_config.to_dict(),
                   "reduction": {"mean": self.reduction.mean.cpu(), "basis": self.reduction.basis.cpu()},
                   "rng": rng_states()}
        _atomic_save(payload, self.out / STATE_FILE)
        save_model(self.out / LAST_MODEL, self.net, self.model_config, self.reduction,
                   self.checkpoint_extra(float("nan")))

    def validate(self) -> Optional[float]:
        """Validation Dice, logged; a new best is saved as ``model_best.pt``."""
        if not self.val_indices:
            return None
        p = self.position
        t0 = time.perf_counter()
        dice, per_label = validation_dice(self.net, self.val_set, self.loader, self.val_indices, self.context)
        self.validation_seconds += time.perf_counter() - t0
        is_best = math.isfinite(dice) and dice > p.best_val
        if is_best:
            p.best_val, p.best_step = dice, p.step
            if self.context.is_main:
                save_model(self.out / BEST_MODEL, self.net, self.model_config, self.reduction,
                           self.checkpoint_extra(dice))
        self.journal.write({"event": "val", "step": p.step, "epoch": p.epoch, "val_dice": dice,
                            "val_dice_per_label": {str(k): v for k, v in per_label.items()},
                            "best_val_dice": p.best_val if math.isfinite(p.best_val) else None, "is_best": is_best})
        return dice

    # ----------------------------------------------------------------------- the loop

    def train_step(self, indices: Sequence[int]) -> Dict[str, float]:
        """One optimiser step on the pairs ``indices`` (augmented); returns the losses."""
        generator = step_generator(self.config.train.seed, self.position.step, self.context.rank)
        pairs = [augment(self.loader(self.train_set[i]), self.config.augment, generator) for i in indices]
        inputs = collate(pairs, self.label_values)
        self.optimizer.zero_grad(set_to_none=True)
        total, parts = self.model(*inputs)
        total.backward()
        self.optimizer.step()
        self.position.step += 1
        return {"loss": float(total.detach()), **{k: float(v) for k, v in zip(LOSS_PARTS, parts)}}

    def run_epoch(self, window: LossWindow, bar) -> bool:
        """The rest of the current epoch (validated at its end when due); True when the run is done."""
        t, p = self.config.train, self.position
        batch_size = self.config.optim.batch_size
        self.sampler.set_epoch(p.epoch)
        order = list(self.sampler)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        done = False
        for b in range(p.batch_in_epoch, len(batches)):
            losses = self.train_step(batches[b])
            window.steps_timed += 1
            p.batch_in_epoch = b + 1
            window.add(losses)
            if self.on_step is not None:
                self.on_step(p.step, losses)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses['loss']:.4f}", epoch=p.epoch)
            if p.step % t.log_every == 0 or p.step == self.total_steps:
                self.journal.write(window.record(p, self.optimizer.param_groups[0]["lr"],
                                                 batch_size * self.context.world_size, self.validation_seconds))
            if p.step % t.checkpoint_every == 0:
                self.save_state()
            if p.step >= self.total_steps:
                done = True
                break
        if p.batch_in_epoch == len(batches):  # the epoch is complete
            if (p.epoch + 1) % t.validate_every == 0 or done:
                self.validate()
            p.epoch += 1
            p.batch_in_epoch = 0
        self.save_state()
        return done

    def run(self) -> TrainingResult:
        bar = None
        if self.config.train.progress and self.context.is_main:
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=self.position.step, desc="train", unit="step")
        if not self.resuming and self.config.train.validate_at_start:
            self.validate()
        self.net.train()
        window = LossWindow()
        done = self.position.step >= self.total_steps
        while not done and self.position.epoch < self.config.optim.epochs:
            done = self.run_epoch(window, bar)
        if bar is not None:
            bar.close()
        self.finish()
        p = self.position
        return TrainingResult(self.out, p.step, p.epoch, p.best_val, self.out / BEST_MODEL,
                              self.out / LAST_MODEL, self.journal.records, self.model_config, self.resumed_from,
                              self.net.eval())

    def finish(self) -> None:
        """Both checkpoints present (the last one is the best without validation pairs); the ``end`` record."""
        out, p, provider = self.out, self.position, self.provider
        if self.context.is_main:
            if not (out / LAST_MODEL).is_file():
                self.save_state()
            if not (out / BEST_MODEL).is_file() or not self.val_indices:
                shutil.copyfile(out / LAST_MODEL, out / BEST_MODEL)
            self.journal.write({"event": "end", "step": p.step, "epoch": p.epoch,
                                "best_val_dice": p.best_val if math.isfinite(p.best_val) else None,
                                "best_step": p.best_step, "features_encoded": provider.encoded if provider else 0,
                                "features_reused": provider.reused if provider else 0})
        self.context.barrier()
