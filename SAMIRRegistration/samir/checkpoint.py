"""The versioned SAMIR network checkpoint: its configuration, saving and loading, the network's size and cost.

One forward pass of a loaded network is :func:`samir.inference.predict_field`.

A SAMIR checkpoint (``torch.save`` of plain tensors and Python scalars, loaded with
``weights_only=True``) holds:

* ``format`` = ``"samir-checkpoint"`` and ``format_version`` (see :data:`FORMAT_VERSION`);
* ``config``: :class:`ModelConfig` as a dict — the encoder and its input size ``k`` the head was
  trained on, the channel reduction size, head widths, pyramid levels, velocity hidden width,
  integration steps, intensity normalisation, whether the frame component was removed, and a free
  description of the training data;
* ``reduction``: the fixed linear map from the encoder's channels to ``feature_channels`` (mean and
  basis), so features mean the same at inference as in training;
* ``state_dict``: the :class:`samir.samirnet.SAMIRNet` weights (head + PDFP).

Loading checks every part and says what does not match (an older/newer format, a network trained on
other features than the encoder asked for, missing or misshapen weights).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from .encoders import ENCODERS
from .weights_only import load_checkpoint
from .features import ChannelReduction
from .geometry import SAMIRInputError
from .intensity import ALL_NORMALIZATIONS
from .samirnet import SAMIRNet
from .spatial import pyramid_shapes

FORMAT = "samir-checkpoint"
FORMAT_VERSION = 1
IMAGE_ONLY = "none"  # ``encoder`` of an image-only network (ablation): no encoder features, 0 feature channels
PathLike = Union[str, Path]


@dataclass
class ModelConfig:
    encoder: str = "litemedsam"
    input_size: int = 256  # encoder k the network was trained with
    encoder_channels: int = 256
    feature_channels: int = 16
    head_widths: Tuple[int, ...] = (32, 64, 32)
    levels: int = 5
    hidden: int = 32
    integration_steps: int = 7
    normalization: str = "mr"
    remove_frame_component: bool = True
    training_data: str = ""  # what the network was trained on (free text)

    def validate(self) -> None:
        problems = []
        image_only = self.encoder == IMAGE_ONLY
        if self.encoder not in ENCODERS and not image_only:
            problems.append(f"unknown encoder '{self.encoder}' (known: {', '.join(ENCODERS)}, or '{IMAGE_ONLY}')")
        if self.normalization not in ALL_NORMALIZATIONS:
            problems.append(f"unknown normalisation '{self.normalization}'")
        if image_only and (self.encoder_channels or self.feature_channels):
            problems.append("an image-only network (encoder 'none') has encoder_channels = feature_channels = 0")
        for name in ("input_size", "encoder_channels", "feature_channels", "levels", "hidden", "integration_steps"):
            if image_only and name in ("input_size", "encoder_channels", "feature_channels"):
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.head_widths or any(int(w) < 1 for w in self.head_widths):
            problems.append(f"head_widths must be positive integers, got {self.head_widths!r}")
        if problems:
            raise SAMIRInputError("invalid SAMIR model config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["head_widths"] = list(self.head_widths)
        return out

    @classmethod
    def from_dict(cls, values: dict, source: str = "checkpoint") -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SAMIRInputError(f"{source}: unknown model config field(s) {', '.join(unknown)}; it was written by a"
                                  " newer SAMIR — upgrade samir to use it")
        values = dict(values)
        if "head_widths" in values:
            values["head_widths"] = tuple(int(w) for w in values["head_widths"])
        config = cls(**values)
        config.validate()
        return config


@dataclass
class SAMIRModel:
    """A loaded network: weights, config and the channel reduction it expects."""
    net: SAMIRNet
    config: ModelConfig
    reduction: ChannelReduction
    path: Optional[str] = None
    extra: Dict[str, object] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"weights": self.path, "format_version": FORMAT_VERSION, **self.config.to_dict(),
                "parameters": count_parameters(self.net)}


def build_network(config: ModelConfig) -> SAMIRNet:
    config.validate()
    return SAMIRNet(config.feature_channels, config.head_widths, config.levels, config.hidden,
                    config.integration_steps)


def save_model(path: PathLike, net: SAMIRNet, config: ModelConfig, reduction: ChannelReduction,
               extra: Optional[dict] = None) -> Path:
    """Write a SAMIR checkpoint (atomically: a temporary file renamed into place)."""
    config.validate()
    path = Path(path)
    if reduction.basis.shape != (config.encoder_channels, config.feature_channels):
        raise SAMIRInputError(f"channel reduction is {tuple(reduction.basis.shape)}, the config says "
                              f"({config.encoder_channels}, {config.feature_channels})")
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict(),
               "reduction": {"mean": reduction.mean.detach().cpu().float(), "basis": reduction.basis.detach().cpu().float()},
               "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
               "extra": dict(extra or {})}
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_model(path: PathLike, encoder: Optional[str] = None, input_size: Optional[int] = None) -> SAMIRModel:
    """Load and validate a SAMIR checkpoint; ``encoder``/``input_size``: what the caller will extract."""
    path = Path(path)
    if not path.is_file():
        raise SAMIRInputError(f"SAMIR network weights not found: {path}")
    payload = load_checkpoint(path, "SAMIR network checkpoint")
    name = path.name
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        hint = " (it looks like an encoder checkpoint: pass it with --weights for the encoder, and the trained" \
               " SAMIR network with --network)" if isinstance(payload, dict) and any(
                   str(k).startswith(("image_encoder.", "mask_decoder.")) for k in payload) else ""
        raise SAMIRInputError(f"{name} is not a SAMIR network checkpoint{hint}")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SAMIRInputError(f"{name} has checkpoint format version {version!r}; this samir reads up to "
                              f"{FORMAT_VERSION} — upgrade samir")
    for key in ("config", "reduction", "state_dict"):
        if key not in payload:
            raise SAMIRInputError(f"{name} is incomplete: no '{key}' entry")
    config = ModelConfig.from_dict(payload["config"], name)
    if encoder is not None and encoder != config.encoder and config.encoder != IMAGE_ONLY:
        raise SAMIRInputError(
            f"{name} was trained on {config.encoder} features (k = {config.input_size}) but the {encoder} encoder"
            f" was asked for; its head does not understand another encoder's features. Use --encoder"
            f" {config.encoder}, or a network trained on {encoder}")
    if input_size is not None and input_size != config.input_size and config.encoder != IMAGE_ONLY:
        raise SAMIRInputError(f"{name} was trained with encoder input size k = {config.input_size}, not {input_size};"
                              f" features change with k — leave --k unset to use {config.input_size}")
    reduction = payload["reduction"]
    mean, basis = reduction.get("mean"), reduction.get("basis")
    if not (torch.is_tensor(mean) and torch.is_tensor(basis)) or tuple(basis.shape) != (
            config.encoder_channels, config.feature_channels) or tuple(mean.shape) != (config.encoder_channels,):
        raise SAMIRInputError(f"{name}: the channel reduction does not match its config "
                              f"({config.encoder_channels} -> {config.feature_channels} channels)")
    net = build_network(config)
    state = payload["state_dict"]
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise SAMIRInputError(f"{name}: weights do not fit the network its config describes: " + ", ".join(parts))
    net.load_state_dict(state)
    net.eval()
    return SAMIRModel(net, config, ChannelReduction(mean.float(), basis.float()), str(path), dict(payload.get("extra", {})))


def count_parameters(net: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in net.parameters()))


def _conv_macs(conv: torch.nn.Conv3d, shape: Sequence[int]) -> int:
    kernel = math.prod(conv.kernel_size)
    return math.prod(shape) * kernel * conv.in_channels // conv.groups * conv.out_channels


def count_macs(net: SAMIRNet, shape_zyx: Sequence[int], slicing_axis: Optional[int] = None,
               spacing_zyx: Optional[Sequence[float]] = None) -> int:
    """Multiply-adds of the convolutions of one forward pass on a ``shape_zyx`` pair.

    The head runs once per image (fixed and moving) at full resolution; each PDFP level's block runs
    once at that level's grid (all convolutions keep their input size: stride 1, same padding).
    Warping, integration and resizing are not counted (they are memory-bound, no multiply-adds to speak of).
    """
    head = sum(_conv_macs(m, shape_zyx) for m in net.head.modules() if isinstance(m, torch.nn.Conv3d))
    shapes = pyramid_shapes(shape_zyx, net.pdfp.levels, slicing_axis, spacing_zyx)
    pdfp = 0
    for level, block in enumerate(net.pdfp.blocks, start=1):
        pdfp += sum(_conv_macs(m, shapes[level - 1]) for m in block.modules() if isinstance(m, torch.nn.Conv3d))
    return 2 * head + pdfp


def info(path: PathLike, shape_zyx: Sequence[int] = (160, 192, 224)) -> dict:
    """What ``samir info CKPT`` prints: config, parameters, multiply-adds at ``shape_zyx``."""
    model = load_model(path)
    return {"path": str(path), "format_version": FORMAT_VERSION, "config": model.config.to_dict(),
            "parameters": count_parameters(model.net),
            "parameters_head": count_parameters(model.net.head), "parameters_pdfp": count_parameters(model.net.pdfp),
            "macs_shape_zyx": list(shape_zyx), "gmacs": count_macs(model.net, shape_zyx) / 1e9,
            "extra": model.extra}
