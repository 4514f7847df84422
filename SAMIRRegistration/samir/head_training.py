"""Training the SAFE head (``samir train-head``): descriptors of corresponding voxels agree across contrasts.

Recipe (offline data only):

1. Anatomy: MNI152 (nilearn) and Colin27 (Debian ``mricron-data``) at 2 mm, with tissue labels (their
   label maps, and T1 intensity classes where they have none).
2. A bank of views per anatomy, encoded once by the frozen encoder (the costly part, cached on disk):
   "anchor" views on the anatomy's own grid and "warped" views pulled through a known random smooth
   displacement plus a shift (so that where a feature sits in the slice frame says nothing about what it
   is). Every view gets a random contrast (a random smooth curve of the T1 intensity, monotone or not;
   random intensities per tissue label, SynthMorph's idea; or a gamma, maybe inverted), then a bias
   field, blur and noise.
3. The head is trained on (anchor, warped) pairs of one anatomy with an InfoNCE loss: a voxel's descriptor
   in the warped view must be closer to the descriptor at its true position in the anchor view than to
   the descriptors one and two feature cells away (the hard cases of registration) and at the other
   sampled voxels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .features import SliceFeatures, auto_slice_stride, choose_slicing_axis, encode_volume, sample_features_at
from .safe_head import SAFEHead, file_sha256, head_payload, standardise
from .spatial import gaussian_smooth, sample_at_points, warp

COLIN27_FOLDER = Path("/usr/share/mricron/templates")
SPACING_MM = 2.0


@dataclass
class Anatomy:
    name: str
    image: np.ndarray  # (D, H, W) in [0, 1]
    labels: np.ndarray  # (D, H, W) int: tissue or region labels, 0 = background
    spacing: tuple


@dataclass
class View:
    anatomy: str
    features: SliceFeatures
    displacement: Optional[torch.Tensor]  # (1, 3, D, H, W) voxels, pull: view(p) = anatomy(p + u(p)); None: anchor
    mask: torch.Tensor  # (D, H, W) bool: the view's foreground


def intensity_classes(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``labels`` where set, else 200 + a class of the intensity (4 levels) where the image has content."""
    classes = 200 + np.digitize(image, (0.25, 0.5, 0.75))
    return np.where(labels > 0, labels, np.where(image > 0.02, classes, 0)).astype(np.int32)


def _shrink(volume, labels=None):
    import SimpleITK as sitk
    from .geometry import from_sitk, to_sitk
    factor = [max(1, int(round(SPACING_MM / s))) for s in volume.spacing[::-1]]
    shrunk = sitk.BinShrink(to_sitk(volume.with_array(volume.array.astype(np.float32))), factor)
    out = from_sitk(shrunk, volume.name).array
    if labels is None:
        return out, None
    coarse = sitk.Resample(to_sitk(labels.with_array(labels.array.astype(np.int32))), shrunk, sitk.Transform(),
                           sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
    return out, from_sitk(coarse, labels.name).array


def load_anatomies(colin27_folder: Optional[Path] = COLIN27_FOLDER) -> List[Anatomy]:
    """MNI152 (always) and Colin27 + AAL (when ``colin27_folder`` holds ``ch2.nii.gz`` and ``aal.nii.gz``)."""
    from .demo import load_mni152
    from .io import read_image, read_labels
    from .resampling import resample_into
    sources = [("mni152",) + tuple(load_mni152(1))]
    if colin27_folder is not None and (Path(colin27_folder) / "ch2.nii.gz").is_file():
        image = read_image(Path(colin27_folder) / "ch2.nii.gz", "Colin27")
        labels = resample_into(read_labels(Path(colin27_folder) / "aal.nii.gz", "AAL"), image, labels=True)
        sources.append(("colin27", image, labels))
    anatomies = []
    for name, image, labels in sources:
        array, label_array = _shrink(image, labels)
        array = np.clip(array / max(float(np.percentile(array, 99.5)), 1e-6), 0, 1).astype(np.float32)
        anatomies.append(Anatomy(name, array, intensity_classes(array, label_array), (SPACING_MM,) * 3))
    return anatomies


def random_curve(rng: np.random.Generator, points: int = 6) -> Callable[[np.ndarray], np.ndarray]:
    from scipy.interpolate import PchipInterpolator
    x = np.concatenate([[0.0, 0.03], np.sort(rng.uniform(0.05, 1.0, points - 3)), [1.3]])
    y = np.concatenate([[0.0], rng.uniform(0.0, 1.0, points - 1)])
    return PchipInterpolator(x, y, extrapolate=False)


def random_contrast(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random contrast of ``image`` (see the module docstring), in [0, 1], background 0."""
    kind = rng.choice(["curve", "labels", "gamma"])
    if kind == "curve":
        out = np.nan_to_num(random_curve(rng)(np.clip(image, 0, 1.3)))
    elif kind == "labels":
        out = image.copy()
        texture = rng.uniform(-1.5, 1.5)
        for label in np.unique(labels[labels > 0]):
            inside = labels == label
            out[inside] = rng.uniform(0.05, 1.0) + texture * (image[inside] - image[inside].mean())
    else:
        out = image ** rng.uniform(0.4, 2.5)
        if rng.random() < 0.4:
            out = np.where(image > 0.02, 1.0 - out, 0.0)
    out = torch.from_numpy(np.asarray(out, np.float32))[None, None]
    if rng.random() < 0.3:
        out = gaussian_smooth(out, float(rng.uniform(0.3, 1.0)))
    coarse = torch.from_numpy(rng.standard_normal((1, 1, 4, 4, 4)).astype(np.float32))
    bias = F.interpolate(coarse, size=image.shape, mode="trilinear", align_corners=True)
    out = out * torch.exp(bias * float(rng.uniform(0.0, 0.25)))
    out = out + float(rng.uniform(0.0, 0.06)) * torch.from_numpy(rng.standard_normal(out.shape).astype(np.float32))
    out = torch.where(torch.from_numpy(labels > 0)[None, None], out, torch.zeros(()))
    out = out.clamp_min(0)[0, 0].numpy()
    return out / max(float(out.max()), 1e-6)


def random_displacement(shape: Sequence[int], rng: np.random.Generator, max_mm: float = 10.0,
                        shift_mm: float = 6.0) -> torch.Tensor:
    """A random smooth field (largest displacement up to ``max_mm``) plus a constant shift, in voxels."""
    from .demo import random_smooth_displacement
    field = random_smooth_displacement(shape, (SPACING_MM,) * 3, max_mm=float(rng.uniform(2.0, max_mm)),
                                       seed=int(rng.integers(1 << 31)))
    shift = torch.from_numpy(rng.uniform(-shift_mm, shift_mm, 3).astype(np.float32)) / SPACING_MM
    return field + shift.view(1, 3, 1, 1, 1)


def encode_view(image: np.ndarray, spacing, encoder, device) -> SliceFeatures:
    axis = choose_slicing_axis(image.shape, spacing)
    stride = auto_slice_stride(image.shape, spacing, axis, encoder.feature_size)
    return encode_volume(image, encoder, axis, device, slice_stride=stride)


def make_view(anatomy: Anatomy, warped: bool, first: bool, encoder, device, rng: np.random.Generator) -> View:
    """One view: the T1 itself for an anatomy's first anchor, else a random contrast (and warp)."""
    image = anatomy.image if first else random_contrast(anatomy.image, anatomy.labels, rng)
    mask = torch.from_numpy(anatomy.labels > 0)
    u = None
    if warped:
        u = random_displacement(anatomy.image.shape, rng)
        image = warp(torch.from_numpy(image)[None, None], u)[0, 0].numpy()
        mask = warp(mask[None, None].float(), u)[0, 0] > 0.5
    return View(anatomy.name, encode_view(image, anatomy.spacing, encoder, device), u, mask)


def _view_record(view: View) -> dict:
    fs = view.features
    return {"anatomy": view.anatomy, "features": fs.features, "axis": fs.axis, "volume_shape": list(fs.volume_shape),
            "pad_before": list(fs.pad_before), "padded_size": fs.padded_size, "mask": view.mask,
            "displacement": view.displacement if view.displacement is not None else torch.zeros(0)}


def _view_from_record(record: dict) -> View:
    fs = SliceFeatures(record["features"], int(record["axis"]), tuple(record["volume_shape"]),
                       tuple(record["pad_before"]), int(record["padded_size"]))
    u = record["displacement"]
    return View(record["anatomy"], fs, u if u.numel() else None, record["mask"])


def build_bank(anatomies: Sequence[Anatomy], encoder, device, anchors: int, warped: int, seed: int,
               folder: Optional[Path] = None, progress: Optional[Callable[[str], None]] = None) -> List[View]:
    """``anchors`` + ``warped`` encoded views per anatomy; with ``folder``, each view is cached there and
    reused by a later run with the same recipe (file names carry anatomy, kind, index and seed)."""
    from .weights_only import load_checkpoint
    views = []
    for a_index, anatomy in enumerate(anatomies):
        for kind, count in (("anchor", anchors), ("warped", warped)):
            for index in range(count):
                path = Path(folder) / f"{anatomy.name}_{kind}{index}_seed{seed}.pt" if folder else None
                if path is not None and path.is_file():
                    views.append(_view_from_record(load_checkpoint(path, "SAFE head training view")))
                    continue
                rng = np.random.default_rng([seed, a_index, kind == "warped", index])
                view = make_view(anatomy, kind == "warped", kind == "anchor" and index == 0, encoder, device, rng)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(_view_record(view), path)
                views.append(view)
                if progress:
                    progress(f"encoded {anatomy.name} {kind} view {index + 1}/{count}")
    return views


def neighbour_offsets(cells: Sequence[int] = (1, 2)) -> torch.Tensor:
    """The 26 directions of a 3x3x3 neighbourhood at each distance in ``cells`` (in feature cells), ``(K, 3)``."""
    directions = torch.stack(torch.meshgrid(*[torch.tensor([-1.0, 0.0, 1.0])] * 3, indexing="ij"), -1).view(-1, 3)
    directions = directions[directions.abs().sum(1) > 0]
    return torch.cat([directions * c for c in cells])


def _slice_index(features: SliceFeatures, x: torch.Tensor) -> torch.Tensor:
    """Position in the encoded slice stack of voxel coordinate ``x`` along the slicing axis."""
    n, last = features.features.shape[0], features.volume_shape[features.axis] - 1
    return x * (n - 1) / max(last, 1)


def correspondence_loss(anchor: SliceFeatures, warped: SliceFeatures, points: torch.Tensor,
                        targets: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """InfoNCE: the warped view's descriptor at ``points`` against the anchor's at ``targets`` ``(P, 1 + K, 3)``:
    the true position first (positive), then positions one and two feature cells away (local negatives);
    the other points' true positions are negatives too."""
    query = sample_features_at(warped, points)  # (P, C)
    keys = sample_features_at(anchor, targets.view(-1, 3)).view(points.shape[0], -1, query.shape[-1])
    local = (query[:, None] * keys).sum(-1)
    others = (query @ keys[:, 0].T).masked_fill(torch.eye(len(points), dtype=torch.bool), float("-inf"))
    logits = torch.cat([local, others], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(points), dtype=torch.long))


@dataclass
class HeadTrainingSettings:
    steps: int = 800
    points: int = 384
    window: int = 16  # encoded slices of the warped view seen per step (the anchor's window follows)
    learning_rate: float = 2e-3
    seed: int = 0
    hidden: int = 32
    out_channels: int = 24


class HeadTrainer:
    """Adam on :func:`correspondence_loss` over random (anchor, warped) pairs of one anatomy. Each step runs
    the head on a window of slices only (the cost of a step does not grow with the volume)."""

    def __init__(self, views: Sequence[View], settings: HeadTrainingSettings):
        self.settings = settings
        torch.manual_seed(settings.seed)
        self.rng = np.random.default_rng(settings.seed)
        in_channels = views[0].features.features.shape[1]
        self.head = SAFEHead(in_channels, settings.hidden, settings.out_channels)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=settings.learning_rate)
        self._stacks = {}
        self.pairs = [(a, w) for a in views for w in views
                      if a.displacement is None and w.displacement is not None and a.anatomy == w.anatomy]
        if not self.pairs:
            raise ValueError("the bank needs an anchor and a warped view of one anatomy")

    def _standardised(self, view: View) -> torch.Tensor:
        """The view's whole stack standardised once ``(C, N, f, f)``: windows then see the statistics of the
        whole stack, as the head does at inference."""
        key = id(view)
        if key not in self._stacks:
            self._stacks[key] = standardise(view.features.features.float().permute(1, 0, 2, 3).unsqueeze(0))[0]
        return self._stacks[key]

    def _described(self, view: View, first: int, stop: int) -> SliceFeatures:
        """The head on slices ``[first, stop)`` of the view's stack; zeros elsewhere (never sampled)."""
        fs = view.features
        out = self.head.describe(self._standardised(view)[:, first:stop].unsqueeze(0))[0].permute(1, 0, 2, 3)
        blank = lambda count: out.new_zeros((count,) + tuple(out.shape[1:]))
        full = torch.cat([blank(first), out, blank(fs.features.shape[0] - stop)])
        return SliceFeatures(full, fs.axis, fs.volume_shape, fs.pad_before, fs.padded_size)

    def _sample_points(self, warped: View) -> tuple:
        """Points inside the warped view's mask and a random window of its slices, and that window."""
        fs, margin = warped.features, 2
        n = fs.features.shape[0]
        window = min(self.settings.window, n)
        first = int(self.rng.integers(0, n - window + 1))
        inside = torch.nonzero(warped.mask).float()
        position = _slice_index(fs, inside[:, fs.axis])
        inside = inside[(position >= first + margin) & (position <= first + window - 1 - margin)]
        count = min(self.settings.points, len(inside))
        chosen = inside[torch.from_numpy(self.rng.choice(len(inside), count, replace=False))]
        return chosen + torch.from_numpy(self.rng.uniform(-0.5, 0.5, chosen.shape).astype(np.float32)), first, window

    def step(self) -> float:
        anchor, warped = self.pairs[int(self.rng.integers(len(self.pairs)))]
        points, first, window = self._sample_points(warped)
        cell = warped.features.padded_size / warped.features.features.shape[-1]
        target = points + sample_at_points(warped.displacement, points)
        limit = torch.tensor(anchor.features.volume_shape, dtype=torch.float32) - 1
        targets = torch.minimum((target[:, None] + torch.cat([torch.zeros(1, 3), neighbour_offsets() * cell])[None])
                                .clamp_min(0), limit)
        position = _slice_index(anchor.features, targets[..., anchor.features.axis])
        a_first = max(0, int(position.min().floor()) - 2)
        a_stop = min(anchor.features.features.shape[0], int(position.max().ceil()) + 3)
        loss = correspondence_loss(self._described(anchor, a_first, a_stop),
                                   self._described(warped, first, first + window), points, targets)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def train_head(views: Sequence[View], settings: HeadTrainingSettings,
               progress: Optional[Callable[[int, float], None]] = None) -> SAFEHead:
    trainer = HeadTrainer(views, settings)
    running = None
    for step in range(settings.steps):
        loss = trainer.step()
        running = loss if running is None else 0.95 * running + 0.05 * loss
        if progress and (step + 1) % 25 == 0:
            progress(step + 1, running)
    return trainer.head.eval()


def save_head(head: SAFEHead, path: Path, encoder: str, recipe: dict) -> str:
    """Write the head (fp32 weights, the recipe that made it) and return the file's SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(head_payload(head, encoder, {"recipe": recipe}), path)
    return file_sha256(path)
