"""Reading and validating images and label maps; writing volumes and displacement-field transforms;
atomic, locked writing of an output folder.

Reading refuses what would register silently wrong: damaged files (:mod:`samir.file_integrity`),
DICOM series with missing, duplicate or unevenly spaced slices, label maps with fractional or
negative values or with labels outside their image. Writing goes through :func:`staged_output_dir`:
one run at a time per output folder (a lock file), everything written to a private staging folder
and moved into place at the end; a failure or an interruption (Ctrl-C, SIGTERM) at any point leaves
the output folder exactly as it was (or absent, if it was absent).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Set, Union

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


class SAMIROutputError(SAMIRInputError):
    """The outputs could not be written (disk full, no permission, ...); the output folder is as it was."""


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


def write_image(image: sitk.Image, path: PathLike) -> None:
    """``sitk.WriteImage`` (compressed), then check that the file is whole: ITK does not always report
    a disk that filled up while a compressed file was written."""
    path = Path(path)
    try:
        sitk.WriteImage(image, str(path), useCompression=True)
    except RuntimeError as exc:
        raise SAMIROutputError(f"could not write '{path.name}': {_reader_message(exc)}") from None
    try:
        check_image_file(path, "output")
    except SAMIRInputError as exc:
        raise SAMIROutputError(f"'{path.name}' was written incompletely (is the disk full?): {exc}") from None


def write_volume(volume: Volume, path: PathLike, vector: bool = False) -> None:
    write_image(to_sitk(volume, vector=vector), path)


def displacement_image(displacement_lps: np.ndarray, fixed: Volume) -> sitk.Image:
    """Vector image (float64, LPS mm) on the fixed grid, as ITK displacement field transforms need."""
    image = sitk.GetImageFromArray(displacement_lps.astype(np.float64), isVector=True)
    image.SetSpacing(fixed.spacing)
    image.SetOrigin(fixed.origin)
    image.SetDirection(tuple(fixed.direction.ravel()))
    return image


def displacement_transform(displacement_lps: np.ndarray, fixed: Volume) -> sitk.DisplacementFieldTransform:
    return sitk.DisplacementFieldTransform(displacement_image(displacement_lps, fixed))


def write_transform(displacement_lps: np.ndarray, fixed: Volume, path) -> None:
    """Write an ITK displacement-field transform (``.h5`` or ``.tfm``) readable by SimpleITK, ANTs, Slicer."""
    try:
        sitk.WriteTransform(displacement_transform(displacement_lps, fixed), str(path))
    except RuntimeError as exc:
        raise SAMIROutputError(f"could not write '{Path(path).name}': {_reader_message(exc)}") from None


def write_displacement(displacement_lps: np.ndarray, fixed: Volume, path) -> None:
    """Write the displacement as a 3-component vector image (``.nii.gz``, LPS mm, ITK/ANTs convention)."""
    write_image(sitk.Cast(displacement_image(displacement_lps, fixed), sitk.sitkVectorFloat32), path)


@contextmanager
def signals_deferred() -> Iterator[List[int]]:
    """Hold Ctrl-C and SIGTERM back until the block is done, then deliver them, so that moving files
    into place, or putting them back, is never stopped half-way. Yields the list of signals held
    back so far (a block may undo its work when it is not empty). Only the main thread gets signals;
    elsewhere this does nothing."""
    received: List[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(number)
        if handler is not None and handler != signal.SIG_IGN:  # None: installed outside Python, not restorable
            previous[number] = signal.signal(number, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            signal.raise_signal(received[0])


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or exc.__class__.__name__


def _create_parents(folder: Path) -> List[Path]:
    """Create ``folder`` and missing ancestors; return the ones created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:  # made by another run at the same moment: not ours to remove
            continue
        created.append(path)
    return created


def _remove_if_empty(folders: List[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def lock_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.samir-lock"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (Windows too; no signal is sent)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":
        import ctypes
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_owner(lock: Path) -> Optional[dict]:
    """The owner a lock file names; ``None`` when the owner is gone (a stale lock)."""
    try:
        text, age = lock.read_text(), time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
        pid, host = int(owner["pid"]), str(owner["host"])
    except (ValueError, KeyError, TypeError):
        # being written by a run that starts right now, or left so by one that died then
        return {"pid": "?", "host": "?", "started": "?"} if age < 10 else None
    if host == socket.gethostname() and not process_alive(pid):
        return None
    return owner


def _take_lock(lock: Path, out_dir: Path) -> None:
    for _ in range(3):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is None:  # the run that held it was killed: take it over, with what it left half-made
                for leftover in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
                    shutil.rmtree(leftover, ignore_errors=True)
                try:
                    lock.unlink()
                except FileNotFoundError:
                    pass
                continue
            raise SAMIRInputError(
                f"output folder '{out_dir}' is being written by another samir run (process {owner['pid']} on"
                f" {owner['host']}, since {owner.get('started', '?')}); wait until it has finished or choose another"
                f" output folder (if no such run exists any more, delete '{lock}')") from None
        except OSError as exc:
            raise SAMIROutputError(f"cannot write into '{out_dir.parent}': {_os_reason(exc)}") from None
        with os.fdopen(descriptor, "w") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}, handle)
        return
    raise SAMIRInputError(f"could not take the lock '{lock}' of output folder '{out_dir}'; try again")


_HELD_LOCKS: Set[Path] = set()


@contextmanager
def output_folder_lock(out_dir: PathLike) -> Iterator[Path]:
    """Hold ``out_dir`` for this run: a second run (another process) writing there is refused with a
    message naming this one. The lock is a file created exclusively next to the folder (no
    ``fcntl``: works on Windows); a lock whose process is gone is taken over. Re-entrant within a
    process. Folders created for it are removed again if the run leaves them empty."""
    out_dir = Path(out_dir).resolve()
    if out_dir in _HELD_LOCKS:
        yield out_dir
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise SAMIRInputError(f"output folder '{out_dir}' exists and is a file, not a folder")
    try:
        created = _create_parents(out_dir.parent)
    except OSError as exc:
        raise SAMIROutputError(f"cannot create the output folder '{out_dir}': {_os_reason(exc)}") from None
    lock = lock_path(out_dir)
    try:
        with signals_deferred():  # never leave a half-written lock file behind
            _take_lock(lock, out_dir)
    except BaseException:
        _remove_if_empty(created)
        raise
    _HELD_LOCKS.add(out_dir)
    try:
        yield out_dir
    finally:
        with signals_deferred():
            _HELD_LOCKS.discard(out_dir)
            try:
                lock.unlink()
            except OSError:
                pass
            _remove_if_empty(created)


def _commit(stage: Path, out_dir: Path, replaces: Iterable[str], interrupted: List[int]) -> None:
    """Move the staged files into ``out_dir``. Files of the same name, and files named in ``replaces``
    (outputs of an earlier run that this one does not write), are first moved aside and deleted only
    when every new file is in place; on a failure, or a signal held back meanwhile (``interrupted``),
    everything is put back, so the folder never holds a mix of two runs."""
    existed = out_dir.exists()
    new = sorted(p.name for p in stage.iterdir())
    present = {p.name for p in out_dir.iterdir()} if existed else set()
    displaced = sorted(present & (set(new) | set(replaces)))
    aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.previous-", dir=out_dir.parent)) if displaced else None
    moved_aside: List[str] = []
    moved_in: List[str] = []
    try:
        if not existed:
            out_dir.mkdir()
        for name in displaced:
            os.replace(out_dir / name, aside / name)
            moved_aside.append(name)
        for name in new:
            os.replace(stage / name, out_dir / name)
            moved_in.append(name)
        if interrupted:
            raise KeyboardInterrupt  # replaced by the held-back signal's own exception when it is delivered
    except BaseException:
        if not _put_back(stage, out_dir, aside, moved_in, moved_aside, existed):
            raise SAMIROutputError(f"writing into '{out_dir}' failed and not every earlier output could be put back;"
                                   f" the earlier ones are in '{aside}'") from None
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _put_back(stage: Path, out_dir: Path, aside: Optional[Path], moved_in: List[str], moved_aside: List[str],
              existed: bool) -> bool:
    """Undo a partial :func:`_commit`; False if something could not be put back (``aside`` is then kept)."""
    complete = True
    moves = [(out_dir / n, stage / n) for n in moved_in] + [(aside / n, out_dir / n) for n in moved_aside]
    for source, target in moves:
        try:
            os.replace(source, target)
        except OSError:
            complete = False
    if complete and aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    if not existed:
        _remove_if_empty([out_dir])
    return complete


@contextmanager
def staged_output_dir(out_dir: PathLike, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a private staging folder; on success move its files into ``out_dir`` (see :func:`_commit`).

    The output folder is locked for the whole block (:func:`output_folder_lock`). On any error, or
    an interruption, the staging folder is removed and ``out_dir`` is left exactly as it was (not
    created, if it did not exist), so a failed run never leaves half-made outputs. Errors of the
    file system (disk full, no permission) become :class:`SAMIROutputError`.
    """
    with output_folder_lock(out_dir) as out_dir:
        existed = out_dir.exists()
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
        except OSError as exc:
            raise SAMIROutputError(f"cannot write into '{out_dir.parent}': {_os_reason(exc)}") from None
        try:
            yield stage
            with signals_deferred() as interrupted:
                _commit(stage, out_dir, replaces, interrupted)
        except OSError as exc:
            state = "it is as it was" if existed else "it was not created"
            raise SAMIROutputError(f"could not write the outputs into '{out_dir}' ({_os_reason(exc)});"
                                   f" {state}") from None
        finally:
            with signals_deferred():
                shutil.rmtree(stage, ignore_errors=True)
