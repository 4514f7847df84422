"""Registration options: one typed schema, from which the command line, validation, the Slicer
runner's settings and the Slicer panel's choices are all derived.

Each :class:`Option` names a field of :class:`samir.register.RegistrationOptions` (``optimizer=False``)
or an override of the preset's :class:`samir.zeroshot.OptimizerSettings` (``optimizer=True``), with its
type, default, allowed values and help. ``None`` as a default means "the engine decides" (the preset's
value, the encoder's input size, ...). A value is checked by :meth:`Option.check`, a whole set of
values by :func:`check_values` (per option, then the rules that tie options together).

Pure Python (no torch, numpy or SimpleITK): the Slicer module builds its panel from this at
application start-up without loading the engine.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .errors import SAMIRInputError

MODES = ("zeroshot", "network")
PRESETS = ("fast", "balanced", "accurate")
ENCODERS = ("litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b")
NORMALIZATIONS = ("auto", "mr", "ct")
ALIGNMENTS = ("affine", "rigid", "none")
SIMILARITIES = ("auto", "ncc", "mind")
FEATURE_HEADS = ("auto", "trained", "pca")
GLOBAL_SEARCHES = ("off", "on")
DEVICES = ("auto", "cpu", "cuda", "mps")  # "cuda:N" picks a GPU
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
TYPES = ("str", "int", "float", "bool", "ints", "file")


@dataclass(frozen=True)
class Option:
    """One registration option. ``type``: str, int, float, bool, ints (comma-separated whole numbers)
    or file (a path that must exist)."""

    name: str
    type: str
    default: object = None
    help: str = ""
    choices: Optional[Tuple[object, ...]] = None
    minimum: Optional[float] = None  # inclusive; for "ints", of every number
    maximum: Optional[float] = None
    multiple_of: Optional[int] = None
    optimizer: bool = False
    flag: Optional[str] = None  # command-line flag (default: --name-with-dashes)
    metavar: Optional[str] = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def parse(self, text: str):
        """The value of ``text`` as typed on the command line or in the panel (empty: ``None``)."""
        text = str(text).strip()
        if not text:
            return None
        try:
            if self.type == "int":
                return int(text)
            if self.type == "float":
                return float(text)
            if self.type == "ints":
                return tuple(int(part) for part in text.replace(";", ",").split(",") if part.strip())
            if self.type == "bool":
                return {"true": True, "1": True, "false": False, "0": False}[text.lower()]
        except (ValueError, KeyError):
            raise SAMIRInputError(f"{self.cli_flag}: '{text}' is not {self._kind()}") from None
        return text

    def _kind(self) -> str:
        return {"int": "a whole number", "float": "a number", "bool": "true or false", "file": "a file",
                "ints": "whole numbers separated by commas (e.g. 80,80,60)", "str": "a text"}[self.type]

    def check(self, value) -> None:
        """Raise :class:`SAMIRInputError` naming this option unless ``value`` is allowed (``None`` is)."""
        if value is None:
            return
        if self.type == "bool":
            if not isinstance(value, bool):
                raise SAMIRInputError(f"{self.cli_flag} must be true or false, got {value!r}")
            return
        if self.type == "ints":
            numbers = tuple(value) if isinstance(value, (list, tuple)) else None
            if not numbers or not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
                raise SAMIRInputError(f"{self.cli_flag} must be {self._kind()}, got {value!r}")
            for number in numbers:
                self._check_number(number, value)
            return
        if self.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise SAMIRInputError(f"{self.cli_flag} must be a whole number, got {value!r}")
        if self.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SAMIRInputError(f"{self.cli_flag} must be a number, got {value!r}")
        if self.type in ("str", "file") and not isinstance(value, (str, Path)):
            raise SAMIRInputError(f"{self.cli_flag} must be {self._kind()}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise SAMIRInputError(f"{self.cli_flag}: unknown value '{value}'; choose one of"
                                  f" {', '.join(map(str, self.choices))}")
        if self.type == "file" and not Path(value).is_file():
            raise SAMIRInputError(f"{self.cli_flag}: file '{value}' does not exist")
        if self.type in ("int", "float"):
            self._check_number(value, value)

    def _check_number(self, number, given) -> None:
        if self.type == "float" and number != number:  # NaN
            raise SAMIRInputError(f"{self.cli_flag} must be a number, got {given!r}")
        if self.minimum is not None and number < self.minimum:
            raise SAMIRInputError(f"{self.cli_flag} must be at least {self.minimum:g}, got {given!r}")
        if self.maximum is not None and number > self.maximum:
            raise SAMIRInputError(f"{self.cli_flag} must be at most {self.maximum:g}, got {given!r}")
        if self.multiple_of and number % self.multiple_of:
            raise SAMIRInputError(f"{self.cli_flag} must be a positive multiple of {self.multiple_of}, got {given!r}")


def _zeroshot_ncc(text: str) -> str:
    return "zero-shot with ncc: " + text


OPTIONS: Tuple[Option, ...] = (
    Option("mode", "str", "zeroshot", choices=MODES,
           help="zeroshot (default): optimise the pyramid for this pair; network: one forward pass of a trained"
                " SAMIR network (--network CKPT), optionally refined (--refine N)"),
    Option("network", "file", help="trained SAMIR network checkpoint (network mode)", metavar="CKPT"),
    Option("refine_iterations", "int", 0, minimum=0, flag="--refine", metavar="N",
           help="network mode: N instance-optimisation steps per level (two finest levels) from the network's field"),
    Option("encoder", "str", choices=ENCODERS,
           help="frozen image encoder (default: litemedsam, or the encoder the network was trained on)"),
    Option("encoder_weights", "file", metavar="CKPT",
           help="encoder checkpoint file (SAM / MedSAM; default: the copy in the weights folder)"),
    Option("input_size", "int", minimum=16, multiple_of=16, flag="--k", metavar="K",
           help="encoder input size k (SAM ViT: multiple of 16, default 512; LiteMedSAM 256)"),
    Option("preset", "str", "balanced", choices=PRESETS, help="speed/accuracy trade-off"),
    Option("similarity", "str", "auto", choices=SIMILARITIES,
           help="image similarity: ncc (local NCC, same contrast), mind (MIND-SSC, any contrast, e.g. T1 vs T2) or"
                " auto (default: ncc unless fixed and moving intensities are anti-correlated)"),
    Option("alignment", "str", "rigid", choices=ALIGNMENTS,
           help="pre-alignment in physical space before the deformable stage, kept only where it improves the"
                " similarity: rigid (default: rotation and translation, e.g. two sessions, or origins that"
                " disagree), affine (adds scaling and shear, e.g. subjects of different size) or none (the images"
                " are aligned by their geometry)"),
    Option("global_search", "str", "off", choices=GLOBAL_SEARCHES,
           help="zero-shot: before the pyramid, search every displacement within --search-radius on a coarse grid"
                " (MIND-SSC descriptors, any contrast) and regularise the choice by coupled convex optimisation;"
                " the pyramid starts from that field. For deformations larger than the pyramid captures"),
    Option("search_radius", "float", 24.0, minimum=1.0, maximum=200.0, metavar="MM",
           help="with --global-search on: the largest displacement searched, in mm (the search grid's spacing"
                " is about a quarter of it, coarser when the cost volume would exceed 256 MB)"),
    Option("histogram_matching", "bool", False,
           help=_zeroshot_ncc("map the moving intensities onto the fixed image's histogram first (for a non-linear"
                              " intensity change between same-contrast scans, e.g. another scanner or gamma; not"
                              " where structures change size, e.g. cardiac phases)")),
    Option("joint_intensity_map", "bool", optimizer=True, flag="--no-intensity-map",
           help=_zeroshot_ncc("do not map the moving intensities by the monotone map fitted on the pair as"
                              " aligned by the coarser levels (on by default)")),
    Option("noise_smoothing", "bool", optimizer=True, flag="--no-noise-smoothing",
           help=_zeroshot_ncc("do not smooth both images at the pyramid levels where the noisier one's estimated"
                              " white noise is strong (on by default)")),
    Option("ssd_weight", "float", minimum=0.0, optimizer=True, metavar="W",
           help=_zeroshot_ncc("weight of the squared difference of the fixed and the intensity-mapped,"
                              " bias-corrected moving image beside local NCC (default 0.5; 0 turns it off)")),
    Option("noise_smoothness_factor", "float", minimum=1.0, optimizer=True, metavar="F",
           help=_zeroshot_ncc("the diffusion weight of a pyramid level rises with its estimated noise up to this"
                              " many times the smoothness (default 4; 1 keeps it constant)")),
    Option("device", "str", "auto", help="auto (CUDA if it works, else Apple MPS, else CPU), cpu, cuda, cuda:N or mps"),
    Option("normalization", "str", "auto", choices=NORMALIZATIONS,
           help="intensity normalisation: mr = percentile clip, ct = HU window [-500, 800], auto: by the range"),
    Option("slicing_axis", "int", choices=(0, 1, 2),
           help="array axis (z=0, y=1, x=2) the 2D encoder slices along (default: largest spacing, or the axis"
                " with the fewest slices for isotropic volumes)"),
    Option("slice_stride", "int", minimum=1, metavar="N", help="encode every n-th slice (default: automatic)"),
    Option("use_features", "bool", False, flag="--features",
           help="guide the coarse levels with frozen encoder features (SAFE); off by default (see README)"),
    Option("feature_head", "str", "auto", choices=FEATURE_HEADS,
           help="what turns the encoder's features into guidance (with --features): trained = the SAFE head shipped"
                " with SAMIR (contrast-invariant descriptors, LiteMedSAM only), pca = a PCA of the pair's features;"
                " auto: trained where it applies"),
    Option("levels", "int", minimum=1, maximum=8, optimizer=True, help="pyramid levels (default 5)"),
    Option("finest_level", "int", minimum=1, optimizer=True, help="finest optimised level (1 = full resolution)"),
    Option("iterations", "ints", minimum=1, optimizer=True, metavar="N,N,...",
           help="iterations per level, coarsest first, e.g. 80,80,60,50"),
    Option("smoothness", "float", minimum=0.0, optimizer=True, metavar="W",
           help="weight of the diffusion regulariser (default 0.3)"),
    Option("feature_weight", "float", minimum=0.0, optimizer=True, metavar="W",
           help="weight of the feature similarity (with --features)"),
    Option("seed", "int", 0, minimum=0, help="random seed (results are deterministic per seed on the CPU)"),
    Option("use_cache", "bool", True, flag="--no-cache",
           help="neither reuse nor store encoder features in the feature cache (see samir cache)"),
)
OPTION: Dict[str, Option] = {option.name: option for option in OPTIONS}


def defaults() -> Dict[str, object]:
    """``{name: default}`` of every option (``None``: the engine decides)."""
    return {option.name: option.default for option in OPTIONS}


def default(name: str):
    return OPTION[name].default


def check_values(values: Mapping[str, object]) -> None:
    """Check each given value, then the rules that tie options together; raise :class:`SAMIRInputError`."""
    unknown = set(values) - set(OPTION)
    if unknown:
        raise SAMIRInputError(f"unknown option(s): {', '.join(sorted(unknown))}")
    for name, value in values.items():
        OPTION[name].check(value)
    merged = {**defaults(), **values}
    if merged["device"] is not None and not DEVICE_PATTERN.match(str(merged["device"])):
        raise SAMIRInputError(f"--device: unknown device '{merged['device']}'; use auto, cpu, cuda, cuda:N or mps")
    network_mode = merged["mode"] == "network"
    if network_mode and not merged["network"]:
        raise SAMIRInputError("the network mode needs a trained SAMIR network checkpoint (--network CKPT)")
    if not network_mode and merged["network"]:
        raise SAMIRInputError("a network checkpoint was given but the mode is zero-shot: add --mode network")
    if network_mode and merged["global_search"] == "on":
        raise SAMIRInputError("--global-search starts the zero-shot optimisation; the network mode predicts its"
                              " own starting field")
    if merged["refine_iterations"] and not network_mode:
        raise SAMIRInputError("--refine continues from a trained network's field: it needs --mode network")
    levels, finest = merged["levels"], merged["finest_level"]
    if levels is not None and finest is not None and finest > levels:
        raise SAMIRInputError(f"--finest-level {finest} must be between 1 and --levels {levels}")


def split_values(values: Mapping[str, object]) -> Tuple[Dict[str, object], Dict[str, object]]:
    """``(RegistrationOptions fields, OptimizerSettings overrides)`` of ``values``; overrides left at
    ``None`` (the preset decides) are dropped."""
    fields = {name: value for name, value in values.items() if not OPTION[name].optimizer}
    overrides = {name: value for name, value in values.items() if OPTION[name].optimizer and value is not None}
    return fields, overrides


def command_line(values: Mapping[str, object]) -> List[str]:
    """The ``samir register`` arguments that give ``values`` (those at their default are left out)."""
    arguments: List[str] = []
    for name, value in values.items():
        option = OPTION[name]
        if value is None or value == option.default:
            continue
        if option.type == "bool":
            arguments.append(option.cli_flag)  # a flag says the opposite of its default
        elif option.type == "ints":
            arguments += [option.cli_flag, ",".join(str(int(n)) for n in value)]
        elif option.type == "float":
            arguments += [option.cli_flag, repr(float(value))]
        else:
            arguments += [option.cli_flag, str(value)]
    return arguments


def add_arguments(parser, options: Iterable[Option] = OPTIONS) -> None:
    """Add ``options`` to an ``argparse`` parser (``dest`` = the option's name; an optimiser override
    not given stays ``None``, so the preset decides)."""
    for option in options:
        help_text = option.help + ("" if option.default in (None, False, True) else f" (default: {option.default})")
        if option.type == "bool":
            flips_to = not option.default if option.default is not None else False
            parser.add_argument(option.cli_flag, dest=option.name, action="store_const", const=flips_to,
                                default=option.default, help=help_text)
            continue
        convert = {"int": int, "float": float, "ints": option.parse}.get(option.type, str)
        parser.add_argument(option.cli_flag, dest=option.name, type=_argparse_type(convert, option),
                            default=option.default, choices=option.choices, help=help_text,
                            metavar=None if option.choices else (option.metavar or option.name.upper()))


def _argparse_type(convert, option: Option):
    def parse(text: str):
        try:
            return convert(text)
        except (ValueError, SAMIRInputError):
            raise ValueError(f"{option.cli_flag}: '{text}'") from None
    parse.__name__ = option.type
    return parse


def values_from_arguments(namespace) -> Dict[str, object]:
    """``{name: value}`` of every option from a parsed ``argparse`` namespace."""
    return {option.name: getattr(namespace, option.name) for option in OPTIONS}


def planned_stages(values: Mapping[str, object]) -> List[str]:
    """The stages a registration with ``values`` goes through, in order (the names its progress reports)."""
    merged = {**defaults(), **values}
    network_mode = merged["mode"] == "network"
    stages = ["align"] if merged["alignment"] != "none" else []
    stages.append("resample")
    if network_mode or merged["use_features"]:
        stages += ["load encoder", "encode fixed", "encode moving"]
    if network_mode:
        stages.append("network")
    if not network_mode and merged["global_search"] == "on":
        stages.append("search")
    if not network_mode or merged["refine_iterations"]:
        stages.append("optimise")
    return stages + ["write outputs"]


def choices_of(name: str) -> Sequence[object]:
    return tuple(OPTION[name].choices or ())


def add_registration_arguments(parser) -> None:
    """Every option, plus ``--weights``: the checkpoint of the mode (the network in network mode, else
    the encoder's), kept because it is the name users know."""
    add_arguments(parser)
    parser.add_argument("--weights", metavar="CKPT",
                        help="zeroshot: encoder checkpoint file (as --encoder-weights); network: the trained SAMIR"
                             " network checkpoint (as --network)")


def registration_values(namespace) -> Dict[str, object]:
    """The options of a namespace parsed with :func:`add_registration_arguments` (``--weights`` resolved)."""
    values = values_from_arguments(namespace)
    given = getattr(namespace, "weights", None)
    if given:
        target = "network" if values["mode"] == "network" else "encoder_weights"
        if values[target] and values[target] != given:
            raise SAMIRInputError(f"--weights and {OPTION[target].cli_flag} name different files; give the"
                                  f" {'network' if target == 'network' else 'encoder'} checkpoint once")
        values[target] = given
    return values
