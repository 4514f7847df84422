"""Evaluation protocols: Dice, HD95, SDlogJ, folding, runtime, cost; robustness sweeps; reports.

Metrics per pair and label, on the dataset's grid (:mod:`samir.datasets`):

* **Dice** of the fixed labels and the warped moving labels (per-label linear interpolation +
  argmax, as ``samir register`` writes ``warped_seg``). A label is evaluated when both the fixed and
  the moving segmentation contain it (Learn2Reg); it scores 0 if it vanishes after warping.
* **HD95**: 95th percentile of the pooled directed distances between the two label surfaces (surface
  = the mask minus its 6-connected erosion; distances from ``scipy.ndimage.distance_transform_edt``),
  the definition of ``medpy.metric.binary.hd95``. ``mm`` uses the physical voxel spacing (MemWarp
  protocol for ACDC), ``voxels`` unit spacing (Learn2Reg protocol for AbdomenCTCT); the column
  names say which (``hd95_mm``, ``hd95_voxels``). Both masks empty: undefined (NaN); one empty: inf.
* **SDlogJ**: std of log(clip(J + 3)) on the Jacobian cropped by 2 voxels; **folding %**: J <= 0.
* **runtime** per stage (features, network or optimisation, metrics) and the **cost** of a method:
  parameters and multiply-adds of the trainable part (head + PDFP convolutions,
  :func:`samir.checkpoint.count_macs`) and, separately, of the frozen encoder (all slices of both images).

Outputs of :func:`write_report`: ``per_label.csv``, ``per_pair.csv``, ``summary.json``,
``summary.md`` (markdown tables) and ``dice_boxplot.png`` (per-structure Dice, one box per method).
:func:`robustness_sweep` adds ``robustness.csv`` and ``robustness.png`` (Dice vs strength of gamma
correction / Gaussian noise applied to the moving image, or to both).
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .checkpoint import IMAGE_ONLY, count_macs, count_parameters, load_model
from .datasets import PairDataset, PreparedPair, PreparedVolume
from .encoders import SliceEncoder
from .features import auto_slice_stride, choose_slicing_axis
from .geometry import SAMIRInputError
from .inference import predict_field
from .metrics import dice
from .resampling import warp_labels_on_grid
from .spatial import folding_fraction, jacobian_determinant, sdlogj
from .training import FeatureProvider, FeatureSection, ModelSection

HD95_UNITS = ("mm", "voxels", "both")
PERTURBATIONS = ("gamma", "noise")
DEFAULT_SWEEPS: Dict[str, Tuple[float, ...]] = {"gamma": (0.5, 0.75, 1.0, 1.5, 2.0),
                                                "noise": (0.0, 0.02, 0.05, 0.1, 0.2)}
PathLike = Union[str, Path]


def _ndimage():
    try:
        from scipy import ndimage
    except ImportError:
        raise SAMIRInputError("HD95 needs scipy: pip install 'samir[train]'") from None
    return ndimage


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SAMIRInputError("the report figures need matplotlib: pip install 'samir[train]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# =========================================================================== metrics

def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a binary mask: the mask minus its 6-connected erosion (outside the volume counts as empty)."""
    mask = np.asarray(mask, dtype=bool)
    ndimage = _ndimage()
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                          border_value=0)


def hd95(a: np.ndarray, b: np.ndarray, spacing_zyx: Optional[Sequence[float]] = None) -> float:
    """95th percentile Hausdorff distance between the surfaces of two binary masks.

    ``spacing_zyx``: voxel size (mm) per array axis; ``None`` measures in voxels. NaN when both masks
    are empty, inf when exactly one is.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise SAMIRInputError(f"HD95: masks differ in shape {a.shape} vs {b.shape}")
    has_a, has_b = bool(a.any()), bool(b.any())
    if not has_a and not has_b:
        return float("nan")
    if has_a != has_b:
        return float("inf")
    sampling = None if spacing_zyx is None else [float(s) for s in spacing_zyx]
    # every surface point lies in the bounding box of a | b: distances computed there are exact, and fast
    nonzero = np.nonzero(a | b)
    box = tuple(slice(max(0, int(idx.min()) - 1), int(idx.max()) + 2) for idx in nonzero)
    a, b = a[box], b[box]
    surface_a, surface_b = surface(a), surface(b)
    ndimage = _ndimage()
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=sampling)[surface_a]
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=sampling)[surface_b]
    return float(np.percentile(np.concatenate([to_b, to_a]), 95))


def label_scores(fixed: np.ndarray, warped: np.ndarray, moving: np.ndarray, labels: Dict[int, str],
                 spacing_zyx: Sequence[float], units: Optional[str] = "mm") -> List[dict]:
    """Dice and HD95 (``units``; None: no HD95) per label present in both ``fixed`` and (unwarped) ``moving``."""
    if units is not None and units not in HD95_UNITS:
        raise SAMIRInputError(f"HD95 units '{units}' is not one of {', '.join(HD95_UNITS)}")
    rows = []
    present_fixed, present_moving = set(np.unique(fixed).tolist()), set(np.unique(moving).tolist())
    for value, name in sorted(labels.items()):
        if value not in present_fixed or value not in present_moving:
            continue
        a, b = fixed == value, warped == value
        row = {"label": int(value), "structure": name, "dice": dice(a, b)}
        if units in ("mm", "both"):
            row["hd95_mm"] = hd95(a, b, spacing_zyx)
        if units in ("voxels", "both"):
            row["hd95_voxels"] = hd95(a, b, None)
        rows.append(row)
    return rows


def hd95_columns(units: str) -> List[str]:
    return {"mm": ["hd95_mm"], "voxels": ["hd95_voxels"], "both": ["hd95_mm", "hd95_voxels"]}[units]


# =========================================================================== methods

@dataclass
class MethodOutput:
    displacement: torch.Tensor  # (1, 3, D, H, W), voxels of the grid
    timings: Dict[str, float]  # seconds per stage
    notes: Dict[str, object] = field(default_factory=dict)


class Method:
    """Something that registers a prepared pair: a trained SAMIR network, zero-shot SAMIR, identity."""
    name: str = "method"

    def register(self, pair: PreparedPair) -> MethodOutput:
        raise NotImplementedError

    def cost(self, shape_zyx: Sequence[int], spacing_zyx: Sequence[float]) -> Dict[str, object]:
        return {}


class IdentityMethod(Method):
    def __init__(self, name: str = "identity"):
        self.name = name

    def register(self, pair: PreparedPair) -> MethodOutput:
        return MethodOutput(torch.zeros((1, 3, *pair.fixed.shape)), {})


def encoder_macs_per_slice(encoder: SliceEncoder) -> int:
    """Multiply-adds of one ``k x k`` slice through the encoder (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    parameter = next(encoder.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    x = torch.zeros((1, 3, encoder.input_size, encoder.input_size), device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder(x)
    return int(counter.get_total_flops() // 2)


class NetworkMethod(Method):
    """A trained SAMIR checkpoint, run exactly as ``samir register --mode network`` runs it."""

    def __init__(self, checkpoint: PathLike, name: str = "SAMIR", features: Optional[FeatureSection] = None,
                 device: Union[str, torch.device] = "cpu", encoder: Optional[SliceEncoder] = None,
                 use_cache: bool = True):
        self.name = name
        self.checkpoint = str(checkpoint)
        self.model = load_model(checkpoint)
        self.device = torch.device(device)
        self.image_only = self.model.config.encoder == IMAGE_ONLY
        self.features = replace(features or FeatureSection())
        self.provider = None
        if not self.image_only:
            section = ModelSection(encoder=self.model.config.encoder, input_size=self.model.config.input_size)
            self.provider = FeatureProvider(section, self.features, self.device, encoder, use_cache)
        self._encoder_macs: Optional[int] = None

    def slicing_axis(self, volume: PreparedVolume) -> int:
        if self.provider is not None:
            return self.provider.plan(volume)[0]
        axis = self.features.slicing_axis
        return axis if axis >= 0 else choose_slicing_axis(volume.shape, volume.spacing_zyx)

    def register(self, pair: PreparedPair) -> MethodOutput:
        timings: Dict[str, float] = {}
        fixed_features = moving_features = None
        notes: Dict[str, object] = {}
        if self.provider is not None:
            t0 = time.perf_counter()
            reused = self.provider.reused
            fixed_features, moving_features = self.provider.raw(pair.fixed), self.provider.raw(pair.moving)
            timings["features_s"] = time.perf_counter() - t0
            notes["features_cached"] = self.provider.reused - reused
        t0 = time.perf_counter()
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None].to(self.device)
        u = predict_field(self.model, as_tensor(pair.fixed.image), as_tensor(pair.moving.image), fixed_features,
                          moving_features, tuple(float(s) for s in pair.fixed.spacing_zyx),
                          self.slicing_axis(pair.fixed))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings["network_s"] = time.perf_counter() - t0
        return MethodOutput(u.detach().float().cpu(), timings, notes)

    def cost(self, shape_zyx: Sequence[int], spacing_zyx: Sequence[float]) -> Dict[str, object]:
        axis = choose_slicing_axis(shape_zyx, spacing_zyx) if self.features.slicing_axis < 0 else \
            self.features.slicing_axis
        out = {"trainable_parameters": count_parameters(self.model.net),
               "trainable_gmacs": count_macs(self.model.net, shape_zyx, axis, spacing_zyx) / 1e9,
               "encoder": self.model.config.encoder}
        if self.provider is not None:
            encoder = self.provider.encoder
            if self._encoder_macs is None:
                self._encoder_macs = encoder_macs_per_slice(encoder)
            stride = self.features.slice_stride or auto_slice_stride(shape_zyx, spacing_zyx, axis, encoder.feature_size)
            slices = min(shape_zyx[axis], (shape_zyx[axis] - 1 + stride - 1) // stride + 1)
            out.update({"encoder_parameters": count_parameters(encoder), "encoder_slices_per_pair": 2 * slices,
                        "encoder_gmacs": 2 * slices * self._encoder_macs / 1e9})
        return out


class ZeroShotMethod(Method):
    """SAMIR's zero-shot instance optimisation (``samir register`` without a network)."""

    def __init__(self, name: str = "zeroshot", options=None, encoder: Optional[SliceEncoder] = None):
        from .register import RegistrationOptions
        self.name = name
        self.options = options or RegistrationOptions(preset="fast", device="cpu")
        self.encoder = encoder

    def register(self, pair: PreparedPair) -> MethodOutput:
        from .register import register
        fixed = pair.fixed.grid.with_array(pair.fixed.image)
        moving = pair.fixed.grid.with_array(pair.moving.image, name=pair.moving.key)
        result = register(fixed, moving, self.options, encoder=self.encoder)
        return MethodOutput(result.displacement, dict(result.timings))

    def cost(self, shape_zyx: Sequence[int], spacing_zyx: Sequence[float]) -> Dict[str, object]:
        return {"trainable_parameters": 0, "note": "instance optimisation per pair (no trained weights)"}


def parse_method(text: str, features: Optional[FeatureSection] = None, device: str = "cpu",
                 encoder: Optional[SliceEncoder] = None) -> Method:
    """``identity``, ``zeroshot`` / ``zeroshot:PRESET``, ``CKPT`` or ``NAME=CKPT`` (a trained SAMIR checkpoint)."""
    if text == "identity":
        return IdentityMethod()
    if text.startswith("zeroshot"):
        from .register import RegistrationOptions
        preset = text.split(":", 1)[1] if ":" in text else "fast"
        return ZeroShotMethod(f"zeroshot-{preset}", RegistrationOptions(preset=preset, device=device))
    name, _, path = text.rpartition("=")
    path = path or text
    if not Path(path).is_file():
        raise SAMIRInputError(f"method '{text}': not identity, zeroshot[:preset] or an existing checkpoint file")
    return NetworkMethod(path, name or Path(path).stem, features, device, encoder)


# =========================================================================== evaluation

@dataclass
class EvaluationReport:
    per_label: List[dict]
    per_pair: List[dict]
    summary: Dict[str, dict]
    hd95_units: str
    labels: Dict[int, str]
    out_dir: Optional[Path] = None


def evaluate_pair(method: Method, pair: PreparedPair, labels: Dict[int, str],
                  hd95_units: Optional[str]) -> Tuple[dict, List[dict]]:
    """Register one pair with ``method``; its row (means, SDlogJ, folding, timings) and per-label rows."""
    output = method.register(pair)
    t0 = time.perf_counter()
    u = output.displacement
    jac = jacobian_determinant(u)[0]
    row = {"method": method.name, "pair": pair.record.name, "fixed": pair.record.fixed.key,
           "moving": pair.record.moving.key, "direction": pair.record.direction,
           "sdlogj": sdlogj(jac), "folding_percent": 100.0 * folding_fraction(jac)}
    label_rows = []
    if pair.fixed.labels is not None and pair.moving.labels is not None:
        warped = warp_labels_on_grid(pair.moving.labels.astype(np.int32), pair.fixed.grid, u)
        spacing = pair.fixed.spacing_zyx
        label_rows = label_scores(pair.fixed.labels, warped, pair.moving.labels, labels, spacing, hd95_units)
        unregistered = label_scores(pair.fixed.labels, pair.moving.labels, pair.moving.labels, labels, spacing, None)
        initial = {r["label"]: r["dice"] for r in unregistered}
        for r in label_rows:
            r.update({"method": method.name, "pair": pair.record.name, "dice_initial": initial.get(r["label"])})
        if label_rows:
            row["dice"] = float(np.mean([r["dice"] for r in label_rows]))
            row["dice_initial"] = float(np.mean([r["dice_initial"] for r in label_rows]))
            for column in hd95_columns(hd95_units) if hd95_units else []:
                values = [r[column] for r in label_rows if math.isfinite(r[column])]
                row[column] = float(np.mean(values)) if values else float("nan")
    timings = dict(output.timings)
    timings["metrics_s"] = time.perf_counter() - t0
    row.update(timings)
    row["register_s"] = sum(v for k, v in output.timings.items())
    row.update({k: v for k, v in output.notes.items()})
    return row, label_rows


def _mean_std(values: Sequence[float]) -> Tuple[float, float, int]:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return float("nan"), float("nan"), 0
    return float(np.mean(finite)), float(np.std(finite)), len(finite)


def summarise(per_pair: List[dict], per_label: List[dict], methods: Sequence[Method], labels: Dict[int, str],
              hd95_units: str, shape_zyx: Sequence[int], spacing_zyx: Sequence[float]) -> Dict[str, dict]:
    summary = {}
    for method in methods:
        pairs = [r for r in per_pair if r["method"] == method.name]
        rows = [r for r in per_label if r["method"] == method.name]
        entry: Dict[str, object] = {"pairs": len(pairs)}
        for key in ("dice", "dice_initial", "sdlogj", "folding_percent", "register_s", "features_s", "network_s",
                    "optimise_s", "metrics_s"):
            values = [r[key] for r in (rows if key in ("dice", "dice_initial") else pairs) if key in r]
            if values:
                mean, std, n = _mean_std(values)
                entry[key] = {"mean": mean, "std": std, "n": n}
        for column in hd95_columns(hd95_units):
            values = [r[column] for r in rows if column in r]
            mean, std, n = _mean_std(values)
            entry[column] = {"mean": mean, "std": std, "n": n, "infinite": sum(1 for v in values if v == math.inf)}
        per_structure = {}
        for value, name in sorted(labels.items()):
            structure_rows = [r for r in rows if r["label"] == value]
            if structure_rows:
                d_mean, d_std, n = _mean_std([r["dice"] for r in structure_rows])
                item = {"dice_mean": d_mean, "dice_std": d_std, "n": n}
                for column in hd95_columns(hd95_units):
                    item[f"{column}_mean"], item[f"{column}_std"], _ = _mean_std([r[column] for r in structure_rows])
                per_structure[name] = item
        entry["per_structure"] = per_structure
        entry["cost"] = method.cost(shape_zyx, spacing_zyx)
        summary[method.name] = entry
    return summary


def evaluate(dataset: PairDataset, methods: Sequence[Method], hd95_units: str = "mm", max_pairs: int = 0,
             progress: bool = False) -> EvaluationReport:
    """Run every method on every pair of ``dataset`` (the first ``max_pairs`` when > 0) and score them."""
    if hd95_units not in HD95_UNITS:
        raise SAMIRInputError(f"HD95 units '{hd95_units}' is not one of {', '.join(HD95_UNITS)}")
    if len(dataset) == 0:
        raise SAMIRInputError(f"no pairs to evaluate in split '{dataset.split}'")
    if not methods:
        raise SAMIRInputError("nothing to evaluate: give at least one method")
    indices = list(range(len(dataset)))[:max_pairs or None]
    per_pair, per_label = [], []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(indices) * len(methods), desc="evaluate", unit="pair")
    for index in indices:
        pair = dataset[index]
        for method in methods:
            row, label_rows = evaluate_pair(method, pair, dataset.labels, hd95_units)
            per_pair.append(row)
            per_label.extend(label_rows)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    first = dataset[indices[0]].fixed
    summary = summarise(per_pair, per_label, methods, dataset.labels, hd95_units, first.shape,
                        tuple(float(s) for s in first.spacing_zyx))
    return EvaluationReport(per_label, per_pair, summary, hd95_units, dict(dataset.labels))


# =========================================================================== reports

def _write_csv(path: Path, rows: List[dict]) -> None:
    columns: List[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def _fmt(entry: Optional[dict], digits: int = 3) -> str:
    if not entry or entry.get("n", 0) == 0 or not math.isfinite(entry.get("mean", float("nan"))):
        return "—"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def markdown_summary(report: EvaluationReport, title: str = "SAMIR evaluation") -> str:
    columns = hd95_columns(report.hd95_units)
    unit_names = {"hd95_mm": "HD95 (mm)", "hd95_voxels": "HD95 (voxels)"}
    lines = [f"# {title}", ""]
    header = ["method", "pairs", "Dice", "initial Dice"] + [unit_names[c] for c in columns] + \
        ["SDlogJ", "folding %", "time / pair (s)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in report.summary.items():
        cells = [name, str(entry["pairs"]), _fmt(entry.get("dice")), _fmt(entry.get("dice_initial"))]
        cells += [_fmt(entry.get(c), 2) + (f" ({entry[c]['infinite']} inf)" if entry.get(c, {}).get("infinite") else "")
                  for c in columns]
        cells += [_fmt(entry.get("sdlogj"), 4), _fmt(entry.get("folding_percent"), 4), _fmt(entry.get("register_s"), 3)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Dice per structure", ""]
    names = [report.labels[v] for v in sorted(report.labels)]
    lines += ["| method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for name, entry in report.summary.items():
        cells = [f"{entry['per_structure'][s]['dice_mean']:.3f}" if s in entry["per_structure"] else "—" for s in names]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Runtime per stage (s / pair, mean)", ""]
    stages = [s for s in ("features_s", "network_s", "optimise_s", "metrics_s")
              if any(s in e for e in report.summary.values())]
    lines += ["| method | " + " | ".join(s[:-2] for s in stages) + " |", "|" + "---|" * (len(stages) + 1)]
    for name, entry in report.summary.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(entry.get(s), 3) for s in stages) + " |")
    lines += ["", "## Cost", "", ("| method | trainable parameters | trainable GMACs | encoder | encoder parameters |"
                                  " encoder GMACs (both images) |"), "|---|---|---|---|---|---|"]
    for name, entry in report.summary.items():
        c = entry.get("cost", {})

        def cell(key: str, f: str = "{:,}", c: dict = c) -> str:
            return f.format(c[key]) if key in c else "—"
        lines.append(f"| {name} | {cell('trainable_parameters')} | {cell('trainable_gmacs', '{:.3g}')} | "
                     f"{c.get('encoder', '—')} | {cell('encoder_parameters')} | {cell('encoder_gmacs', '{:.3g}')} |")
    hd_note = {"mm": "HD95 in millimetres (physical spacing; MemWarp protocol).",
               "voxels": "HD95 in voxels (unit spacing; Learn2Reg protocol).",
               "both": "HD95 in millimetres (MemWarp protocol) and in voxels (Learn2Reg protocol)."}[report.hd95_units]
    lines += ["", (f"Dice and HD95: mean ± std over (pair, structure); labels present in both segmentations. {hd_note}"
                   " SDlogJ on the Jacobian cropped by 2 voxels; folding = J <= 0."), ""]
    return "\n".join(lines)


def dice_boxplot(report: EvaluationReport, path: Path) -> Path:
    plt = _pyplot()
    methods = list(report.summary)
    values = sorted(report.labels)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(values) * max(1, len(methods)) ** 0.5 + 2), 4))
    width = 0.8 / max(1, len(methods))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for m, method in enumerate(methods):
        data = [[r["dice"] for r in report.per_label if r["method"] == method and r["label"] == v and
                 math.isfinite(r["dice"])] for v in values]
        positions = [i + (m - (len(methods) - 1) / 2) * width for i in range(len(values))]
        keep = [(p, d) for p, d in zip(positions, data) if d]
        if keep:
            box = ax.boxplot([d for _, d in keep], positions=[p for p, _ in keep], widths=width * 0.9,
                             patch_artist=True, showfliers=True)
            for patch in box["boxes"]:
                patch.set_facecolor(colors[m % len(colors)])
                patch.set_alpha(0.6)
        ax.plot([], [], color=colors[m % len(colors)], linewidth=6, alpha=0.6, label=method)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels([report.labels[v] for v in values], rotation=30 if len(values) > 4 else 0, ha="right"
                       if len(values) > 4 else "center")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Dice per structure")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: EvaluationReport, out_dir: PathLike, title: str = "SAMIR evaluation",
                 extra: Optional[dict] = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "per_label.csv", report.per_label)
    _write_csv(out / "per_pair.csv", report.per_pair)
    (out / "summary.json").write_text(json.dumps({"hd95_units": report.hd95_units, "labels": report.labels,
                                                  "methods": report.summary, **(extra or {})}, indent=2, default=str))
    (out / "summary.md").write_text(markdown_summary(report, title))
    if report.per_label:
        dice_boxplot(report, out / "dice_boxplot.png")
    report.out_dir = out
    return out


# =========================================================================== robustness

def perturb(volume: PreparedVolume, kind: str, strength: float, seed: int = 0) -> PreparedVolume:
    """Gamma correction (``image ** strength``) or Gaussian noise (std ``strength``, intensities in [0, 1], clipped)."""
    if kind == "gamma":
        if strength <= 0:
            raise SAMIRInputError(f"gamma must be positive, got {strength}")
        image = np.power(np.clip(volume.image, 0, 1), strength, dtype=np.float32)
    elif kind == "noise":
        if strength < 0:
            raise SAMIRInputError(f"noise strength must be >= 0, got {strength}")
        rng = np.random.default_rng(seed)
        image = np.clip(volume.image + rng.normal(0, strength, volume.image.shape), 0, 1).astype(np.float32)
    else:
        raise SAMIRInputError(f"unknown perturbation '{kind}'; choose {', '.join(PERTURBATIONS)}")
    return replace(volume, image=image, grid=volume.grid.with_array(image), key=f"{volume.key}|{kind}={strength}",
                   perturbed=True)


def parse_sweep(text: str) -> Tuple[str, Tuple[float, ...]]:
    """``gamma=0.5,1,2`` or ``noise`` (default strengths) -> (kind, strengths)."""
    kind, _, values = text.partition("=")
    kind = kind.strip()
    if kind not in PERTURBATIONS:
        raise SAMIRInputError(f"--robustness '{text}': perturbation must be one of {', '.join(PERTURBATIONS)}")
    if not values:
        return kind, DEFAULT_SWEEPS[kind]
    try:
        return kind, tuple(float(v) for v in values.split(",") if v.strip())
    except ValueError:
        raise SAMIRInputError(f"--robustness '{text}': strengths must be numbers, e.g. {kind}=0.5,1,2") from None


def robustness_sweep(dataset: PairDataset, methods: Sequence[Method], sweeps: Dict[str, Sequence[float]],
                     apply_to: str = "moving", max_pairs: int = 0, seed: int = 0,
                     out_dir: Optional[PathLike] = None) -> List[dict]:
    """Mean Dice of each method as the moving image (or both) is perturbed more and more (paper Fig. 5)."""
    if apply_to not in ("moving", "both"):
        raise SAMIRInputError(f"perturb '{apply_to}': choose moving or both")
    indices = list(range(len(dataset)))[:max_pairs or None]
    rows = []
    for kind, strengths in sweeps.items():
        for strength in strengths:
            scores: Dict[str, List[float]] = {m.name: [] for m in methods}
            for index in indices:
                pair = dataset[index]
                moving = perturb(pair.moving, kind, strength, seed + 2 * index)
                fixed = perturb(pair.fixed, kind, strength, seed + 2 * index + 1) if apply_to == "both" else pair.fixed
                changed = PreparedPair(fixed, moving, pair.record)
                for method in methods:
                    row, _ = evaluate_pair(method, changed, dataset.labels, None)
                    if "dice" in row:
                        scores[method.name].append(row["dice"])
            for name, values in scores.items():
                mean, std, n = _mean_std(values)
                rows.append({"method": name, "perturbation": kind, "strength": float(strength), "applied_to": apply_to,
                             "dice_mean": mean, "dice_std": std, "pairs": n})
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "robustness.csv", rows)
        robustness_plot(rows, out / "robustness.png")
    return rows


def robustness_plot(rows: List[dict], path: Path) -> Path:
    plt = _pyplot()
    kinds = list(dict.fromkeys(r["perturbation"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(4.5 * max(1, len(kinds)), 3.6), squeeze=False)
    labels = {"gamma": "gamma", "noise": "noise std (normalised intensity)"}
    for ax, kind in zip(axes[0], kinds):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = sorted((r["strength"], r["dice_mean"]) for r in rows if r["perturbation"] == kind
                            and r["method"] == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_xlabel(labels.get(kind, kind))
        ax.set_ylabel("mean Dice")
        ax.set_title(f"{kind} applied to the {rows[0]['applied_to']} image" if rows else kind)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
