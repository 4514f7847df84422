"""Registration datasets in their public layouts, prepared on a common grid for training and evaluation.

Layouts (``DataConfig.layout``):

* ``acdc`` — ACDC cardiac cine MRI: ``patientXXX/Info.cfg`` (``ED: n``, ``ES: m``),
  ``patientXXX_frameYY.nii.gz`` and ``patientXXX_frameYY_gt.nii.gz`` (1 RV, 2 myocardium, 3 LV). The
  patient folders may sit directly in ``root`` or in ``root/training`` and ``root/testing`` (the
  official archive). Pairs are intra-patient ED->ES and ES->ED; "A->B" always means *moving* A is
  registered onto *fixed* B. Both frames are resampled onto one grid per patient (default
  128 x 128 x 16 at 1.8 x 1.8 x 10 mm, centred on the image or on the labels) after a per-volume
  min-max normalisation. Splits are patient-number ranges (default 1-90 train, 91-100 validation,
  101-150 test: patients 1-100 for training/validation and 101-150 for testing, as in MemWarp).
* ``abdomenctct`` — Learn2Reg AbdomenCTCT: ``imagesTr/AbdomenCTCT_XXXX_0000.nii.gz``,
  ``labelsTr/...`` (13 organs) and ``AbdomenCTCT_dataset.json``. HU window [-500, 800] -> [0, 1];
  the native grid (192 x 160 x 256 voxels z, y, x at 2 mm) or half of it. Pairs are all ordered
  inter-subject pairs of a split (default subjects 1-20 / 21-23 / 24-30: 380 / 6 / 42 pairs).
* ``pairs`` — a CSV (header ``fixed,moving,fixed_seg,moving_seg[,split][,name]``) or JSON (a list
  of such objects, or ``{"pairs": [...]}``) of file paths, relative paths being relative to the
  file. The moving image is resampled onto the fixed image's grid (or both onto a target grid).

Shapes and spacings are given in the engine's array order (z, y, x), see :mod:`samir.geometry`.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .geometry import SAMIRInputError, Volume, index_to_world
from .intensity import ALL_NORMALIZATIONS, normalize_intensity
from .io import read_image, read_labels
from .resampling import resample_into

LAYOUTS = ("acdc", "abdomenctct", "pairs")
ACDC_LABELS: Dict[int, str] = {1: "RV", 2: "Myo", 3: "LV"}
ABDOMEN_LABELS: Dict[int, str] = {
    1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gall bladder", 5: "esophagus", 6: "liver", 7: "stomach",
    8: "aorta", 9: "inferior vena cava", 10: "portal and splenic vein", 11: "pancreas", 12: "right adrenal gland",
    13: "left adrenal gland"}
DEFAULT_SPLITS: Dict[str, Dict[str, str]] = {
    "acdc": {"train": "1-90", "val": "91-100", "test": "101-150"},
    "abdomenctct": {"train": "1-20", "val": "21-23", "test": "24-30"},
    "pairs": {},
}
ACDC_DIRECTIONS = ("ED->ES", "ES->ED")
CROP_CENTERS = ("image", "labels")
RESOLUTIONS = ("full", "half")


@dataclass
class DataConfig:
    """The ``[data]`` section of a training configuration."""
    layout: str = "acdc"
    root: str = ""  # dataset folder (acdc, abdomenctct)
    pairs_file: str = ""  # layout "pairs": CSV or JSON of pairs
    dataset_json: str = ""  # abdomenctct: the dataset JSON (default: the one *dataset*.json in root)
    splits: Dict[str, str] = field(default_factory=dict)  # split -> subject ranges "1-90,95"; default per layout
    directions: Tuple[str, ...] = ACDC_DIRECTIONS  # acdc: which intra-patient directions
    target_shape_zyx: Optional[Tuple[int, int, int]] = None  # acdc default (16, 128, 128)
    target_spacing_zyx: Optional[Tuple[float, float, float]] = None  # acdc default (10, 1.8, 1.8)
    crop_center: str = "image"  # acdc / pairs with a target grid: centre the grid on the image or the labels
    resolution: str = "full"  # abdomenctct: "full" or "half"
    normalization: str = ""  # default: minmax (acdc), ct (abdomenctct), mr (pairs)
    labels: Dict[int, str] = field(default_factory=dict)  # label value -> name; default per layout

    def resolved(self) -> "DataConfig":
        """A copy with the layout's defaults filled in (and checked)."""
        if self.layout not in LAYOUTS:
            raise SAMIRInputError(f"data.layout '{self.layout}' is not one of {', '.join(LAYOUTS)}")
        out = DataConfig(**{**self.__dict__})
        out.splits = dict(DEFAULT_SPLITS[self.layout], **{str(k): str(v) for k, v in self.splits.items()})
        if self.layout == "acdc":
            out.target_shape_zyx = self.target_shape_zyx or (16, 128, 128)
            out.target_spacing_zyx = self.target_spacing_zyx or (10.0, 1.8, 1.8)
        out.normalization = self.normalization or {"acdc": "minmax", "abdomenctct": "ct", "pairs": "mr"}[self.layout]
        out.labels = {int(k): str(v) for k, v in self.labels.items()}
        problems = []
        if self.layout in ("acdc", "abdomenctct") and not self.root:
            problems.append(f"data.root (the {self.layout} folder) is not set")
        if self.layout == "pairs" and not self.pairs_file:
            problems.append("data.pairs_file (CSV or JSON of pairs) is not set")
        if out.normalization not in ALL_NORMALIZATIONS or out.normalization == "auto":
            problems.append(f"data.normalization '{out.normalization}' is not one of mr, ct, minmax")
        bad = [d for d in self.directions if d not in ACDC_DIRECTIONS]
        if bad or not self.directions:
            problems.append(f"data.directions {list(self.directions)} must be a non-empty subset of"
                            f" {list(ACDC_DIRECTIONS)}")
        if self.crop_center not in CROP_CENTERS:
            problems.append(f"data.crop_center '{self.crop_center}' is not one of {', '.join(CROP_CENTERS)}")
        if self.resolution not in RESOLUTIONS:
            problems.append(f"data.resolution '{self.resolution}' is not one of {', '.join(RESOLUTIONS)}")
        if (out.target_shape_zyx is None) != (out.target_spacing_zyx is None):
            problems.append("data.target_shape_zyx and data.target_spacing_zyx go together: set both or neither")
        if out.target_shape_zyx is not None:
            if len(out.target_shape_zyx) != 3 or min(int(n) for n in out.target_shape_zyx) < 4:
                problems.append(f"data.target_shape_zyx {list(out.target_shape_zyx)} must be 3 sizes of at least 4")
            if len(out.target_spacing_zyx) != 3 or min(float(s) for s in out.target_spacing_zyx) <= 0:
                problems.append(f"data.target_spacing_zyx {list(out.target_spacing_zyx)} must be 3 positive spacings")
        for split, ranges in out.splits.items():
            if self.layout != "pairs":
                try:
                    parse_ranges(ranges)
                except SAMIRInputError as exc:
                    problems.append(f"data.splits.{split}: {exc}")
        if problems:
            raise SAMIRInputError("invalid data configuration: " + "; ".join(problems))
        if out.target_shape_zyx is not None:
            out.target_shape_zyx = tuple(int(n) for n in out.target_shape_zyx)
            out.target_spacing_zyx = tuple(float(s) for s in out.target_spacing_zyx)
        out.directions = tuple(self.directions)
        return out


def parse_ranges(text: str) -> List[int]:
    """``"1-90,95, 97-98"`` -> ``[1, ..., 90, 95, 97, 98]``; ``""`` -> ``[]``."""
    out: List[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise SAMIRInputError(f"'{part}' is not a subject number or range like 1-90")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if hi < lo:
            raise SAMIRInputError(f"range '{part}' ends before it starts")
        out.extend(range(lo, hi + 1))
    return out


@dataclass(frozen=True)
class VolumeRecord:
    """One image on disk (with its label map, if any)."""
    key: str  # unique within a dataset, e.g. "patient001_ED" or "AbdomenCTCT_0001"
    image: Path
    labels: Optional[Path] = None
    subject: str = ""


@dataclass(frozen=True)
class PairRecord:
    name: str  # "<moving> -> <fixed>" in words, e.g. "patient001 ED->ES"
    fixed: VolumeRecord
    moving: VolumeRecord
    direction: str = ""  # acdc: "ED->ES" (moving ED onto fixed ES) or "ES->ED"
    split: str = ""


@dataclass
class PreparedVolume:
    """A volume on the dataset's grid: intensities in [0, 1], labels (if any), geometry."""
    key: str
    image: np.ndarray  # (D, H, W) float32 in [0, 1]
    labels: Optional[np.ndarray]  # (D, H, W) int16, or None
    grid: Volume  # geometry of the grid (its array is ``image``)
    normalization: str
    perturbed: bool = False  # robustness sweeps: intensities were altered (do not cache features)

    @property
    def spacing_zyx(self) -> np.ndarray:
        return self.grid.spacing_zyx

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.image.shape)


@dataclass
class PreparedPair:
    fixed: PreparedVolume
    moving: PreparedVolume
    record: PairRecord


# --------------------------------------------------------------------------- geometry helpers

def centered_grid(center_lps: np.ndarray, direction: np.ndarray, shape_zyx: Sequence[int],
                  spacing_zyx: Sequence[float], name: str = "grid") -> Volume:
    """An empty grid of ``shape_zyx`` voxels of ``spacing_zyx`` mm whose centre is at ``center_lps``."""
    size_xyz = np.asarray(shape_zyx[::-1], dtype=float)
    spacing_xyz = np.asarray(spacing_zyx[::-1], dtype=float)
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    origin = np.asarray(center_lps, dtype=float) - direction @ (spacing_xyz * (size_xyz - 1) / 2.0)
    return Volume(np.zeros(tuple(int(n) for n in shape_zyx), np.float32), spacing=tuple(spacing_xyz),
                  origin=tuple(origin), direction=direction, name=name)


def grid_center(volume: Volume) -> np.ndarray:
    """LPS position of the centre of a volume's voxel grid."""
    index = (np.asarray(volume.shape[::-1], dtype=float) - 1) / 2.0
    return (index_to_world(volume) @ np.append(index, 1.0))[:3]


def labels_center(labels: Volume) -> np.ndarray:
    """LPS position of the centre of the bounding box of the non-zero labels."""
    nonzero = np.argwhere(labels.array > 0)
    if not len(nonzero):
        return grid_center(labels)
    index_zyx = (nonzero.min(0) + nonzero.max(0)) / 2.0
    return (index_to_world(labels) @ np.append(index_zyx[::-1], 1.0))[:3]


def half_resolution_grid(volume: Volume) -> Volume:
    """The same physical extent with half as many voxels per axis (twice the spacing)."""
    shape = tuple(max(1, n // 2) for n in volume.shape)
    spacing_zyx = [s * n / m for s, n, m in zip(volume.spacing_zyx, volume.shape, shape)]
    return centered_grid(grid_center(volume), volume.direction, shape, spacing_zyx, volume.name)


def prepare_volume(record: VolumeRecord, grid: Optional[Volume], normalization: str,
                   image: Optional[Volume] = None) -> PreparedVolume:
    """Normalise ``record``'s image to [0, 1] (on its own grid, so padding is background), then
    resample image and labels onto ``grid`` (``None``: keep the image's own grid)."""
    image = image if image is not None else read_image(record.image, record.key)
    image01 = image.with_array(normalize_intensity(image.array, normalization))
    grid = grid if grid is not None else image01.with_array(np.zeros(image01.shape, np.float32))
    array = np.ascontiguousarray(resample_into(image01, grid).array, dtype=np.float32)
    labels = None
    if record.labels is not None:
        labels = np.ascontiguousarray(resample_into(read_labels(record.labels, record.key), grid, labels=True).array,
                                      dtype=np.int16)
    return PreparedVolume(record.key, array, labels, grid.with_array(array, name=record.key), normalization)


# --------------------------------------------------------------------------- ACDC

def read_acdc_info(path: Path) -> Dict[str, str]:
    """``Info.cfg``: ``key: value`` lines (ED, ES, Group, Height, NbFrame, Weight)."""
    if not path.is_file():
        raise SAMIRInputError(f"ACDC patient folder '{path.parent}' has no Info.cfg")
    values = {}
    for line in path.read_text().splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            values[key.strip()] = value.strip()
    for key in ("ED", "ES"):
        if not re.fullmatch(r"\d+", values.get(key, "")):
            raise SAMIRInputError(f"{path}: no frame number for {key} (expected a line like '{key}: 1')")
    return values


def acdc_patient_folders(root: Path) -> Dict[int, Path]:
    """Patient number -> folder, for folders directly in ``root`` or in its training/testing subfolders."""
    if not root.is_dir():
        raise SAMIRInputError(f"ACDC folder '{root}' does not exist")
    folders = {}
    for parent in (root, root / "training", root / "testing", root / "database" / "training",
                   root / "database" / "testing"):
        if not parent.is_dir():
            continue
        for folder in parent.iterdir():
            match = re.fullmatch(r"patient(\d+)", folder.name)
            if match and folder.is_dir():
                folders.setdefault(int(match.group(1)), folder)
    if not folders:
        raise SAMIRInputError(f"no ACDC patient folders (patientXXX) in '{root}' or its training/testing subfolders")
    return folders


def acdc_frame_records(folder: Path) -> Dict[str, VolumeRecord]:
    info = read_acdc_info(folder / "Info.cfg")
    out = {}
    for phase in ("ED", "ES"):
        stem = f"{folder.name}_frame{int(info[phase]):02d}"
        image, labels = folder / f"{stem}.nii.gz", folder / f"{stem}_gt.nii.gz"
        if not image.is_file():
            raise SAMIRInputError(f"ACDC {folder.name}: {phase} frame {info[phase]} image '{image.name}' is missing")
        out[phase] = VolumeRecord(f"{folder.name}_{phase}", image, labels if labels.is_file() else None, folder.name)
    return out


def acdc_pairs(config: DataConfig, split: str) -> List[PairRecord]:
    folders = acdc_patient_folders(Path(config.root))
    numbers = parse_ranges(config.splits[split])
    pairs = []
    for number in numbers:
        if number not in folders:
            continue  # e.g. a training-only download asked for the test range
        frames = acdc_frame_records(folders[number])
        for direction in config.directions:
            moving_phase, fixed_phase = direction.split("->")
            pairs.append(PairRecord(f"{folders[number].name} {direction}", frames[fixed_phase], frames[moving_phase],
                                    direction, split))
    return pairs


# --------------------------------------------------------------------------- Learn2Reg AbdomenCTCT

def _subject_number(path: Path) -> Optional[int]:
    match = re.search(r"_(\d{4})_0000\.nii(\.gz)?$", path.name)
    return int(match.group(1)) if match else None


def find_dataset_json(root: Path, explicit: str = "") -> Optional[Path]:
    if explicit:
        path = Path(explicit) if Path(explicit).is_absolute() else root / explicit
        if not path.is_file():
            raise SAMIRInputError(f"dataset JSON '{path}' does not exist")
        return path
    candidates = sorted(root.glob("*dataset*.json"))
    if len(candidates) > 1:
        raise SAMIRInputError(f"several dataset JSON files in '{root}' ({', '.join(p.name for p in candidates)});"
                              " name one with data.dataset_json")
    return candidates[0] if candidates else None


def abdomen_records(config: DataConfig) -> Tuple[Dict[int, VolumeRecord], Dict[int, str]]:
    """Subject number -> record (imagesTr + labelsTr), and the label names (from the dataset JSON if it has them)."""
    root = Path(config.root)
    if not root.is_dir():
        raise SAMIRInputError(f"AbdomenCTCT folder '{root}' does not exist")
    json_path = find_dataset_json(root, config.dataset_json)
    names = dict(ABDOMEN_LABELS)
    entries: List[Tuple[Path, Optional[Path]]] = []
    if json_path is not None:
        try:
            meta = json.loads(json_path.read_text())
        except json.JSONDecodeError as exc:
            raise SAMIRInputError(f"dataset JSON '{json_path}' is not valid JSON: {exc}") from None
        for item in meta.get("training", []):
            if not isinstance(item, dict) or "image" not in item:
                raise SAMIRInputError(f"{json_path.name}: every 'training' entry needs an 'image' path")
            label = item.get("label")
            entries.append((root / item["image"], root / label if label else None))
        labels = meta.get("labels")
        if isinstance(labels, dict) and isinstance(labels.get("0"), dict):  # Learn2Reg: {"0": {"0": "background", ...}}
            labels = labels["0"]
        if isinstance(labels, dict):
            parsed = {int(k): str(v) for k, v in labels.items() if str(k).isdigit() and int(k) > 0}
            names = parsed or names
    if not entries:
        images = root / "imagesTr"
        if not images.is_dir():
            raise SAMIRInputError(f"'{root}' has neither a dataset JSON with a 'training' list nor an imagesTr folder")
        for image in sorted(images.glob("*_0000.nii*")):
            label = root / "labelsTr" / image.name
            entries.append((image, label if label.is_file() else None))
    records = {}
    for image, label in entries:
        number = _subject_number(image)
        if number is None:
            raise SAMIRInputError(f"cannot read a subject number from '{image.name}' (expected NAME_XXXX_0000.nii.gz)")
        if not image.is_file():
            raise SAMIRInputError(f"image '{image}' listed in the dataset is missing")
        if label is not None and not label.is_file():
            raise SAMIRInputError(f"label map '{label}' listed in the dataset is missing")
        records[number] = VolumeRecord(image.name.split("_0000")[0], image, label, f"{number:04d}")
    return records, names


def abdomen_pairs(config: DataConfig, split: str, records: Dict[int, VolumeRecord]) -> List[PairRecord]:
    subjects = [n for n in parse_ranges(config.splits[split]) if n in records]
    return [PairRecord(f"{records[m].subject}->{records[f].subject}", records[f], records[m], "", split)
            for f in subjects for m in subjects if f != m]


# --------------------------------------------------------------------------- generic pairs

PAIR_COLUMNS = ("fixed", "moving", "fixed_seg", "moving_seg")


def read_pairs_file(path: Path) -> List[Dict[str, str]]:
    """Rows of a CSV (with a header) or JSON list of ``{fixed, moving, fixed_seg, moving_seg, split?, name?}``."""
    if not path.is_file():
        raise SAMIRInputError(f"pairs file '{path}' does not exist")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SAMIRInputError(f"pairs file '{path}' is not valid JSON: {exc}") from None
        rows = data.get("pairs") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise SAMIRInputError(f"pairs file '{path}': expected a list of objects (or {{\"pairs\": [...]}})")
    else:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    if not rows:
        raise SAMIRInputError(f"pairs file '{path}' lists no pairs")
    out = []
    for number, row in enumerate(rows, start=1):
        row = {str(k).strip(): ("" if v is None else str(v).strip()) for k, v in row.items() if k is not None}
        missing = [c for c in ("fixed", "moving") if not row.get(c)]
        if missing:
            raise SAMIRInputError(f"pairs file '{path}', pair {number}: no {' or '.join(missing)} path "
                                  f"(columns: {', '.join(PAIR_COLUMNS)}[, split, name])")
        for column in PAIR_COLUMNS + ("fixed_mask", "moving_mask", "out"):
            if row.get(column):
                candidate = Path(row[column]).expanduser()
                row[column] = str(candidate if candidate.is_absolute() else (path.parent / candidate))
        row.setdefault("name", "")
        row["name"] = row["name"] or f"pair{number:04d}"
        out.append(row)
    names = [r["name"] for r in out]
    if len(set(names)) != len(names):
        raise SAMIRInputError(f"pairs file '{path}': pair names are not unique")
    return out


def generic_pairs(config: DataConfig, split: str) -> List[PairRecord]:
    rows = read_pairs_file(Path(config.pairs_file))
    pairs = []
    for row in rows:
        row_split = row.get("split") or "train"
        if split != "all" and row_split != split:
            continue
        name = row["name"]
        segmentation = lambda column: Path(row[column]) if row.get(column) else None
        fixed = VolumeRecord(f"{name}:fixed", Path(row["fixed"]), segmentation("fixed_seg"), name)
        moving = VolumeRecord(f"{name}:moving", Path(row["moving"]), segmentation("moving_seg"), name)
        pairs.append(PairRecord(name, fixed, moving, "", row_split))
    return pairs


# --------------------------------------------------------------------------- the dataset

class PairDataset:
    """The pairs of one split, prepared on demand (and kept) on the dataset's grid.

    ``dataset[i]`` is a :class:`PreparedPair`; fixed and moving share one grid. Volumes are prepared
    once and kept in memory (``PreparedVolume`` holds float32 images and int16 labels).
    """

    def __init__(self, config: DataConfig, split: str):
        self.config = config.resolved()
        self.split = split
        if split != "all" and split not in self.config.splits and self.config.layout != "pairs":
            raise SAMIRInputError(f"unknown split '{split}'; the configuration defines "
                                  f"{', '.join(self.config.splits) or 'none'}")
        self.labels: Dict[int, str] = dict(self.config.labels)
        self._volumes: Dict[str, PreparedVolume] = {}
        self._grids: Dict[str, Volume] = {}
        layout = self.config.layout
        if layout == "acdc":
            if split == "all":
                self.pairs = [p for s in self.config.splits for p in acdc_pairs(self.config, s)]
            else:
                self.pairs = acdc_pairs(self.config, split)
            self.labels = self.labels or dict(ACDC_LABELS)
        elif layout == "abdomenctct":
            records, names = abdomen_records(self.config)
            self._abdomen_records = records
            splits = list(self.config.splits) if split == "all" else [split]
            self.pairs = [p for s in splits for p in abdomen_pairs(self.config, s, records)]
            self.labels = self.labels or names
        else:
            self.pairs = generic_pairs(self.config, split)
        if not self.labels:
            self.labels = self._labels_from_files()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PreparedPair:
        record = self.pairs[index]
        fixed = self.volume(record.fixed, record)
        moving = self.volume(record.moving, record)
        return PreparedPair(fixed, moving, record)

    def volume_records(self) -> List[Tuple[VolumeRecord, PairRecord]]:
        """Each distinct volume once (with a pair it belongs to, which fixes its grid)."""
        seen, out = set(), []
        for pair in self.pairs:
            for record in (pair.fixed, pair.moving):
                if record.key not in seen:
                    seen.add(record.key)
                    out.append((record, pair))
        return out

    def volume(self, record: VolumeRecord, pair: PairRecord) -> PreparedVolume:
        if record.key not in self._volumes:
            self._volumes[record.key] = prepare_volume(record, self.grid_for(pair), self.config.normalization)
        return self._volumes[record.key]

    def grid_for(self, pair: PairRecord) -> Optional[Volume]:
        """The grid both volumes of ``pair`` are resampled onto."""
        cfg = self.config
        if cfg.layout == "acdc":
            if pair.fixed.subject not in self._grids:
                image = read_image(pair.fixed.image, pair.fixed.key)
                if cfg.crop_center == "labels":
                    label_volumes = [read_labels(r.labels, r.key) for r in (pair.fixed, pair.moving) if r.labels]
                    if not label_volumes:
                        raise SAMIRInputError(f"{pair.name}: crop_center = 'labels' needs the _gt label maps")
                    union = label_volumes[0].with_array(np.maximum.reduce(
                        [resample_into(v, label_volumes[0], labels=True).array for v in label_volumes]))
                    center = labels_center(union)
                else:
                    center = grid_center(image)
                self._grids[pair.fixed.subject] = centered_grid(center, image.direction, cfg.target_shape_zyx,
                                                                cfg.target_spacing_zyx, pair.fixed.subject)
            return self._grids[pair.fixed.subject]
        if cfg.layout == "abdomenctct":
            if "common" not in self._grids:  # one grid for every subject: the first subject's (or the target)
                first = self._abdomen_records[min(self._abdomen_records)]
                image = read_image(first.image, first.key)
                if cfg.target_shape_zyx is not None:
                    grid = centered_grid(grid_center(image), image.direction, cfg.target_shape_zyx,
                                         cfg.target_spacing_zyx)
                else:
                    grid = image.with_array(np.zeros(image.shape, np.float32))
                self._grids["common"] = half_resolution_grid(grid) if cfg.resolution == "half" else grid
            return self._grids["common"]
        if pair.name not in self._grids:  # pairs: the fixed image's grid, or a target grid centred on it
            image = read_image(pair.fixed.image, pair.fixed.key)
            if cfg.target_shape_zyx is not None:
                center = grid_center(image)
                if cfg.crop_center == "labels" and pair.fixed.labels is not None:
                    center = labels_center(read_labels(pair.fixed.labels, pair.fixed.key))
                grid = centered_grid(center, image.direction, cfg.target_shape_zyx, cfg.target_spacing_zyx)
            else:
                grid = image.with_array(np.zeros(image.shape, np.float32))
            self._grids[pair.name] = grid
        return self._grids[pair.name]

    def _labels_from_files(self) -> Dict[int, str]:
        values = set()
        for pair in self.pairs[:8]:
            for record in (pair.fixed, pair.moving):
                if record.labels is not None:
                    values |= set(np.unique(read_labels(record.labels, record.key).array).tolist())
        return {int(v): f"label {int(v)}" for v in sorted(values - {0})}


def load_dataset(config: DataConfig, split: str) -> PairDataset:
    return PairDataset(config, split)


def describe(dataset: PairDataset) -> str:
    cfg = dataset.config
    grid = f"{'x'.join(map(str, cfg.target_shape_zyx))} voxels (z, y, x) at {cfg.target_spacing_zyx} mm" \
        if cfg.target_shape_zyx else f"native grid ({cfg.resolution} resolution)"
    return f"{cfg.layout} '{cfg.root or cfg.pairs_file}', split {dataset.split}: {len(dataset)} pairs, {grid}, " \
           f"normalisation {cfg.normalization}"


def subjects_of(pairs: Iterable[PairRecord]) -> List[str]:
    return sorted({p.fixed.subject for p in pairs} | {p.moving.subject for p in pairs})
