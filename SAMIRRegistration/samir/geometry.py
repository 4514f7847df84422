"""Images with their physical geometry; the one place that converts voxel <-> world, LPS <-> RAS.

A :class:`Volume` holds an array in SimpleITK array order ``(z, y, x)`` (= ``(D, H, W)`` in
:mod:`samir.spatial`) and ITK geometry: ``spacing``, ``origin`` and ``direction`` are given in
ITK index order ``(i, j, k) = (x, y, z)`` and in LPS world coordinates (mm), exactly as SimpleITK
reports them. 3D Slicer works in RAS; :data:`LPS_TO_RAS` flips the first two world axes.

``index_to_world(volume)`` is the 4x4 affine taking a homogeneous ITK index ``(i, j, k, 1)`` to
LPS ``(x, y, z, 1)``: ``world = origin + direction @ (spacing * index)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .errors import SAMIRInputError  # noqa: F401 - re-exported: the engine's error type

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    array: np.ndarray
    spacing: tuple = (1.0, 1.0, 1.0)
    origin: tuple = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    name: str = "image"

    def __post_init__(self):
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape(self) -> tuple:
        """Array shape ``(z, y, x)``."""
        return tuple(self.array.shape)

    @property
    def spacing_zyx(self) -> np.ndarray:
        return np.asarray(self.spacing[::-1])

    def with_array(self, array: np.ndarray, name: Optional[str] = None) -> "Volume":
        """Same geometry, other voxels (``array`` must have the same shape)."""
        if tuple(array.shape[-3:]) != self.shape[-3:]:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.shape}")
        return replace(self, array=array, name=name or self.name)

    def same_grid(self, other: "Volume", tol: float = 1e-4) -> bool:
        return (self.shape[-3:] == other.shape[-3:]
                and np.allclose(self.spacing, other.spacing, atol=tol)
                and np.allclose(self.origin, other.origin, atol=tol * max(1.0, np.abs(self.origin).max()))
                and np.allclose(self.direction, other.direction, atol=tol))


def index_to_world(volume: Volume) -> np.ndarray:
    """4x4 affine: homogeneous ITK index ``(i, j, k, 1)`` -> LPS world ``(x, y, z, 1)`` in mm."""
    affine = np.eye(4)
    affine[:3, :3] = volume.direction @ np.diag(volume.spacing)
    affine[:3, 3] = volume.origin
    return affine


def world_to_index(volume: Volume) -> np.ndarray:
    """Inverse of :func:`index_to_world`."""
    return np.linalg.inv(index_to_world(volume))


def index_to_ras(volume: Volume) -> np.ndarray:
    """4x4 affine: ITK index -> RAS world (Slicer's IJKToRAS)."""
    return LPS_TO_RAS @ index_to_world(volume)


def volume_from_ras_affine(array: np.ndarray, ijk_to_ras: np.ndarray, name: str = "image") -> Volume:
    """Build a Volume from an array ``(k, j, i)`` and a 4x4 IJK->RAS matrix (Slicer's convention)."""
    lps = LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=np.float64)
    linear = lps[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise SAMIRInputError(f"{name}: IJK->RAS matrix has a zero-length axis")
    return Volume(array, spacing=tuple(spacing), origin=tuple(lps[:3, 3]), direction=linear / spacing, name=name)


def displacement_zyx_voxels_to_lps(u_zyx: np.ndarray, volume: Volume) -> np.ndarray:
    """Engine field ``(3, D, H, W)`` in grid voxels (z, y, x order) -> LPS mm ``(D, H, W, 3)``."""
    linear = volume.direction @ np.diag(volume.spacing)  # maps (i, j, k) steps to LPS
    u_ijk = np.moveaxis(u_zyx[::-1], 0, -1)
    return (u_ijk @ linear.T).astype(np.float32)


def displacement_lps_to_zyx_voxels(d_lps: np.ndarray, volume: Volume) -> np.ndarray:
    """Inverse of :func:`displacement_zyx_voxels_to_lps`."""
    linear_inv = np.linalg.inv(volume.direction @ np.diag(volume.spacing))
    u_ijk = d_lps @ linear_inv.T
    return np.ascontiguousarray(np.moveaxis(u_ijk, -1, 0)[::-1]).astype(np.float32)


def to_sitk(volume: Volume, vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(volume.array, isVector=vector)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(volume.direction.ravel()))
    return image


def from_sitk(image: sitk.Image, name: str = "image") -> Volume:
    return Volume(sitk.GetArrayFromImage(image), spacing=image.GetSpacing(), origin=image.GetOrigin(),
                  direction=np.asarray(image.GetDirection()).reshape(3, 3), name=name)


def world_points_of_grid(volume: Volume) -> np.ndarray:
    """LPS coordinates of every voxel centre, ``(D, H, W, 3)`` float64."""
    d, h, w = volume.shape[-3:]
    k, j, i = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(np.float64)
    affine = index_to_world(volume)
    return ijk @ affine[:3, :3].T + affine[:3, 3]
