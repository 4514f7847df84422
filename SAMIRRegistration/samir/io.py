"""Reading and validating images and label maps; atomic writing of an output folder.

Reading refuses what would register silently wrong: damaged files (:mod:`samir.file_integrity`),
DICOM series with missing, duplicate or unevenly spaced slices, label maps with fractional or
negative values or with labels outside their image.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Union

import numpy as np
import SimpleITK as sitk

from .file_integrity import check_image_file
from .geometry import SAMIRInputError, Volume, from_sitk, index_to_world, to_sitk, world_to_index

PathLike = Union[str, os.PathLike]
MIN_VOXELS_PER_AXIS = 4
# DICOM slices: a gap over 1.5 typical spacings means missing slices; spacings more than 2 % apart are uneven
# (ITK stacks slices at the first spacing it sees, so either puts every later slice at a wrong position).
SLICE_GAP_FACTOR = 1.5
SLICE_SPACING_TOLERANCE = 0.02
# Labelled voxels up to this many image voxels beyond the image's edge still count as on the image.
LABEL_MARGIN_VOXELS = 1.0


def _reader_message(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    for line in lines:
        for marker in ("sitk::ERROR:", "ITK ERROR:"):
            if marker in line:
                return line.split(marker, 1)[1].strip()
    return lines[-1] if lines else "unknown reader error"


def _read(path: PathLike, role: str, kind: str = "image") -> sitk.Image:
    path = Path(path)
    what = f"{role} {kind}"
    if not path.exists():
        raise SAMIRInputError(f"{what} '{path}' does not exist")
    if path.is_dir():
        return read_dicom_series(path, what)
    check_image_file(path, what)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise SAMIRInputError(f"{what} '{path}' could not be read: {_reader_message(exc)}") from None


# ---------------------------------------------------------------------------------------- DICOM series


def read_dicom_series(folder: Path, what: str) -> sitk.Image:
    """The one DICOM series in ``folder``, after checking that none of its files is unreadable and
    that its slices are complete (no gaps, no duplicates) and evenly spaced."""
    where = f"{what} folder '{folder}'"
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise SAMIRInputError(f"{where} holds no readable DICOM series; give an image file (NIfTI, NRRD, MHA)"
                              " or a folder holding one DICOM series")
    files = {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in series}
    if len(series) > 1:
        listing = ", ".join(f"{uid} ({len(names)} files)" for uid, names in files.items())
        raise SAMIRInputError(f"{where} holds {len(series)} DICOM series ({listing}); put each series in a folder"
                              " of its own")
    names = files[series[0]]
    unread = _unread_dicom_files(folder, names)
    if unread:
        raise SAMIRInputError(f"{where}: {len(unread)} DICOM file(s) could not be read (damaged or cut off?),"
                              f" e.g. '{unread[0]}'")
    check_slice_positions(_slice_positions(names, where), where)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise SAMIRInputError(f"{where} could not be read as a series: {_reader_message(exc)}") from None


def _unread_dicom_files(folder: Path, series_files: List[str]) -> List[str]:
    """Files of ``folder`` with the DICOM preamble that the series reader left out."""
    taken = {Path(name).resolve() for name in series_files}
    unread = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.resolve() not in taken:
            with open(path, "rb") as handle:
                if handle.read(132)[128:] == b"DICM":
                    unread.append(path.name)
    return unread


def _slice_positions(names: List[str], where: str) -> np.ndarray:
    """Position of every slice along the series' slice normal (mm), in file order."""
    positions, orientations = [], []
    reader = sitk.ImageFileReader()
    for name in names:
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
            position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
            orientation = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
        except (RuntimeError, ValueError):
            raise SAMIRInputError(f"{where}: slice '{Path(name).name}' has no readable position and orientation"
                                  " (ImagePositionPatient, ImageOrientationPatient); SAMIR needs them to stack the"
                                  " slices") from None
        positions.append(position)
        orientations.append(orientation)
    orientations = np.asarray(orientations)
    if not np.allclose(orientations, orientations[0], atol=1e-3):
        raise SAMIRInputError(f"{where}: the slices have different orientations (a localizer, or two stacks in one"
                              " series); keep the slices of one stack only")
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    return np.asarray(positions) @ normal


def check_slice_positions(positions, where: str) -> None:
    """Raise :class:`SAMIRInputError` if the slice positions (mm along the slice normal) have duplicates,
    gaps (missing slices) or uneven spacing."""
    ordered = np.sort(np.asarray(positions, dtype=np.float64))
    if len(ordered) < 2:
        return
    steps = np.diff(ordered)
    typical = float(np.median(steps))
    duplicates = steps < max(1e-3, 0.01 * typical)
    if duplicates.any():
        first = int(np.argmax(duplicates))
        raise SAMIRInputError(f"{where}: {int(duplicates.sum())} slice(s) at the same position as another (e.g."
                              f" {ordered[first]:.2f} mm): duplicate files, or two acquisitions in one series")
    gaps = steps > SLICE_GAP_FACTOR * typical
    if gaps.any():
        missing = int(np.sum(np.round(steps[gaps] / typical) - 1).clip(min=1))
        first = int(np.argmax(gaps))
        raise SAMIRInputError(f"{where}: {missing} slice(s) missing: a gap of {steps[first]:.2f} mm between the slices"
                              f" at {ordered[first]:.2f} and {ordered[first + 1]:.2f} mm where the spacing is"
                              f" {typical:.2f} mm (an incomplete transfer?)")
    if np.abs(steps - typical).max() > SLICE_SPACING_TOLERANCE * typical:
        raise SAMIRInputError(f"{where}: uneven slice spacing, {steps.min():.3f} to {steps.max():.3f} mm (more than"
                              f" {100 * SLICE_SPACING_TOLERANCE:.0f} % apart); resample the series to even spacing"
                              " first (e.g. in 3D Slicer)")


# ---------------------------------------------------------------------------------------- images and labels


def check_volume(volume: Volume, role: str) -> None:
    """Raise :class:`SAMIRInputError` unless ``volume`` is a finite, non-constant 3D scalar image."""
    array = volume.array
    if array.ndim != 3:
        raise SAMIRInputError(f"{role} image '{volume.name}' has {array.ndim} dimensions (shape {array.shape});"
                              " SAMIR registers 3D scalar volumes")
    if min(array.shape) < MIN_VOXELS_PER_AXIS:
        raise SAMIRInputError(f"{role} image '{volume.name}' has shape {array.shape} (z, y, x): every axis needs at"
                              f" least {MIN_VOXELS_PER_AXIS} voxels; is it a 2D image stored as 3D?")
    if not np.all(np.isfinite(volume.spacing)) or min(volume.spacing) <= 0:
        raise SAMIRInputError(f"{role} image '{volume.name}' has invalid spacing {volume.spacing}")
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            raise SAMIRInputError(f"{role} image '{volume.name}' contains {int(bad.sum())} NaN or infinite voxels;"
                                  " replace them (e.g. with the background value) before registering")
    if float(array.max()) == float(array.min()):
        raise SAMIRInputError(f"{role} image '{volume.name}' is constant ({float(array.min())}); nothing to register")


def _as_volume(image: sitk.Image, what: str, name: str) -> Volume:
    if image.GetDimension() != 3:
        size = "x".join(str(s) for s in image.GetSize())
        raise SAMIRInputError(f"{what} '{name}' is {image.GetDimension()}D ({size}); SAMIR registers 3D volumes"
                              + (" (for a 4D series, register one frame at a time)" if image.GetDimension() == 4 else ""))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SAMIRInputError(f"{what} '{name}' has {image.GetNumberOfComponentsPerPixel()} components per voxel;"
                              " SAMIR needs a scalar (grey-level) volume")
    return from_sitk(image, name=name)


def read_image(path: PathLike, role: str = "input") -> Volume:
    """Read a 3D scalar image (a file, or a folder holding one DICOM series) as float32 and validate it."""
    volume = _as_volume(_read(path, role), f"{role} image", Path(path).name)
    volume.array = volume.array.astype(np.float32, copy=False)
    check_volume(volume, role)
    return volume


def check_labels(labels: Volume, role: str, kind: str = "segmentation") -> None:
    array = labels.array
    what = f"{role} {kind} '{labels.name}'"
    if array.ndim != 3:
        raise SAMIRInputError(f"{what} has {array.ndim} dimensions; expected a 3D label map")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise SAMIRInputError(f"{what} has non-integer values; expected a label map (0 = background,"
                                  " 1..N = structures)")
    if array.min() < 0:
        raise SAMIRInputError(f"{what} has negative labels (down to {array.min()}); expected 0 = background,"
                              " 1..N = structures")
    if not np.any(array):
        raise SAMIRInputError(f"{what} is empty (all voxels are 0)")


def read_labels(path: PathLike, role: str = "input", kind: str = "segmentation") -> Volume:
    """Read a 3D label map as int32 and validate it."""
    volume = _as_volume(_read(path, role, kind), f"{role} {kind}", Path(path).name)
    check_labels(volume, role, kind)
    volume.array = volume.array.astype(np.int32, copy=False)
    return volume


def check_labels_on_image(labels: Volume, image: Volume, what: str, image_what: str) -> None:
    """Refuse a label map with labelled voxels outside its image (beyond :data:`LABEL_MARGIN_VOXELS`).

    A label map may be on another grid than its image and cover only part of it (outside its grid
    counts as background); labels where the image has no voxels mean it belongs to another image or
    one of the two geometries is wrong, and they would be lost without a word.
    """
    zyx = np.argwhere(labels.array != 0)
    if len(zyx) > 1_000_000:  # a share of the points gives the fraction outside well enough
        zyx = zyx[::len(zyx) // 1_000_000 + 1]
    if not len(zyx):
        return
    ijk = np.column_stack([zyx[:, ::-1].astype(np.float64), np.ones(len(zyx))])
    in_image = ijk @ (world_to_index(image) @ index_to_world(labels)).T
    margin = 0.5 + LABEL_MARGIN_VOXELS
    upper = np.asarray(image.shape[-3:][::-1], dtype=np.float64) - 1 + margin
    outside = np.any((in_image[:, :3] < -margin) | (in_image[:, :3] > upper), axis=1)
    if outside.all():
        raise SAMIRInputError(f"{what} '{labels.name}' lies entirely outside {image_what} '{image.name}': the two do"
                              " not overlap in physical space (it belongs to another image, or the origin, spacing or"
                              " direction of one of them is wrong)")
    if outside.any():
        raise SAMIRInputError(f"{100 * outside.mean():.1f} % of the labelled voxels of {what} '{labels.name}' lie"
                              f" outside {image_what} '{image.name}'; a label map must lie on its image (it may cover"
                              " less of it: outside its grid counts as background)")


# ---------------------------------------------------------------------------------------- writing


def write_volume(volume: Volume, path: PathLike, vector: bool = False) -> None:
    sitk.WriteImage(to_sitk(volume, vector=vector), str(path), useCompression=True)


@contextmanager
def staged_output_dir(out_dir: PathLike) -> Iterator[Path]:
    """Yield a private staging folder; on success move its files into ``out_dir``.

    On any error the staging folder is removed and ``out_dir`` is left exactly as it was, so a
    failed run never leaves half-made outputs.
    """
    out_dir = Path(out_dir).resolve()
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=parent))
    created_out_dir = False
    try:
        yield stage
        if not out_dir.exists():
            out_dir.mkdir()
            created_out_dir = True
        for item in stage.iterdir():
            os.replace(item, out_dir / item.name)
    except BaseException:
        if created_out_dir and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
