"""Reading and validating images and label maps; writing volumes and displacement-field transforms;
atomic writing of an output folder."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import SimpleITK as sitk

from .geometry import SAMIRInputError, Volume, from_sitk, to_sitk

PathLike = Union[str, os.PathLike]
MIN_VOXELS_PER_AXIS = 4


def _read(path: PathLike, role: str) -> sitk.Image:
    path = Path(path)
    if not path.exists():
        raise SAMIRInputError(f"{role} image '{path}' does not exist")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reader error"
        raise SAMIRInputError(f"{role} image '{path}' could not be read: {first_line}") from None


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


def _as_volume(image: sitk.Image, role: str, name: str) -> Volume:
    if image.GetDimension() != 3:
        size = "x".join(str(s) for s in image.GetSize())
        raise SAMIRInputError(f"{role} image '{name}' is {image.GetDimension()}D ({size}); SAMIR registers 3D volumes"
                              + (" (for a 4D series, register one frame at a time)" if image.GetDimension() == 4 else ""))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SAMIRInputError(f"{role} image '{name}' has {image.GetNumberOfComponentsPerPixel()} components per voxel;"
                              " SAMIR needs a scalar (grey-level) volume")
    return from_sitk(image, name=name)


def read_image(path: PathLike, role: str = "input") -> Volume:
    """Read a 3D scalar image as float32 and validate it."""
    volume = _as_volume(_read(path, role), role, Path(path).name)
    volume.array = volume.array.astype(np.float32, copy=False)
    check_volume(volume, role)
    return volume


def check_labels(labels: Volume, role: str) -> None:
    array = labels.array
    if array.ndim != 3:
        raise SAMIRInputError(f"{role} segmentation '{labels.name}' has {array.ndim} dimensions; expected a 3D label map")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise SAMIRInputError(f"{role} segmentation '{labels.name}' has non-integer values;"
                                  " expected a label map (0 = background, 1..N = structures)")
    if array.min() < 0:
        raise SAMIRInputError(f"{role} segmentation '{labels.name}' has negative labels")
    if not np.any(array):
        raise SAMIRInputError(f"{role} segmentation '{labels.name}' is empty (all voxels are 0)")


def read_labels(path: PathLike, role: str = "input") -> Volume:
    """Read a 3D label map as int32 and validate it."""
    volume = _as_volume(_read(path, role), f"{role} segmentation", Path(path).name)
    check_labels(volume, role)
    volume.array = volume.array.astype(np.int32, copy=False)
    return volume


def write_volume(volume: Volume, path: PathLike, vector: bool = False) -> None:
    sitk.WriteImage(to_sitk(volume, vector=vector), str(path), useCompression=True)


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
    sitk.WriteTransform(displacement_transform(displacement_lps, fixed), str(path))


def write_displacement(displacement_lps: np.ndarray, fixed: Volume, path) -> None:
    """Write the displacement as a 3-component vector image (``.nii.gz``, LPS mm, ITK/ANTs convention)."""
    image = sitk.Cast(displacement_image(displacement_lps, fixed), sitk.sitkVectorFloat32)
    sitk.WriteImage(image, str(path), useCompression=True)


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
