"""Scalar volume nodes <-> engine :class:`samir.geometry.Volume`.

A Slicer volume node stores voxels in a ``vtkImageData`` (``i`` fastest) and its geometry as an
IJK -> RAS matrix, possibly under a parent transform. The engine wants an array ``(k, j, i)`` with
ITK (LPS) geometry. The conversion of the matrix is done by :func:`samir.geometry.volume_from_ras_affine`
and :func:`samir.geometry.index_to_ras` — the one place that knows LPS from RAS; this module only
reads and writes nodes.

Reading never copies voxels: the returned array is a view of the node's scalars, so treat it as
read-only. Writing copies once (numpy -> VTK).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import slicer
import vtk
from samir.geometry import SAMIRInputError, Volume, index_to_ras, volume_from_ras_affine
from samir.file_integrity import check_image_file
from samir.io import check_labels, check_volume
from vtk.util import numpy_support


def matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """4x4 ``vtkMatrix4x4`` -> numpy (float64)."""
    return np.array([[matrix.GetElement(row, col) for col in range(4)] for row in range(4)], dtype=np.float64)


def array_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """4x4 numpy -> ``vtkMatrix4x4``."""
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for col in range(4):
            matrix.SetElement(row, col, float(array[row, col]))
    return matrix


def node_label(node) -> str:
    """A node's name for messages (``'<none>'`` for ``None``)."""
    return "<none>" if node is None else f"'{node.GetName()}'"


def parent_transform_to_world(node, ignored_transform=None) -> np.ndarray:
    """4x4 matrix of the node's parent transforms (identity if none).

    ``ignored_transform``: a transform node to look through when it is the node's direct parent (the
    output transform of a previous run, which the moving volume was placed under for display).
    Raises :class:`SAMIRInputError` for a non-linear parent transform: the voxels would have to be
    resampled first (harden the transform, or remove it).
    """
    parent = node.GetParentTransformNode()
    if parent is not None and ignored_transform is not None and parent.GetID() == ignored_transform.GetID():
        parent = parent.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise SAMIRInputError(f"{node_label(node)} is under the non-linear transform {node_label(parent)}; harden or"
                              " remove that transform before registering")
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return matrix_to_array(matrix)


def ijk_to_world_ras(node, ignored_transform=None) -> np.ndarray:
    """4x4 IJK -> world RAS of a volume node, including a linear parent transform.

    IJK counts from the first voxel stored (a non-zero image extent start is folded in).
    """
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    affine = parent_transform_to_world(node, ignored_transform) @ matrix_to_array(ijk_to_ras)
    extent = node.GetImageData().GetExtent()
    start = np.eye(4)
    start[:3, 3] = (extent[0], extent[2], extent[4])
    return affine @ start


def voxel_array_view(node) -> np.ndarray:
    """The node's voxels as a ``(k, j, i)`` numpy view (no copy)."""
    image = node.GetImageData()
    scalars = image.GetPointData().GetScalars()
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1])


def _check_scalar_volume_node(node, role: str) -> None:
    if node is None:
        raise SAMIRInputError(f"no {role} volume was selected")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise SAMIRInputError(f"{role} {node_label(node)} is a {node.GetClassName()}, not a scalar volume")
    image = node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise SAMIRInputError(f"{role} volume {node_label(node)} has no voxels (no image data loaded)")
    if image.GetNumberOfScalarComponents() != 1:
        raise SAMIRInputError(f"{role} volume {node_label(node)} has {image.GetNumberOfScalarComponents()} components"
                              " per voxel; SAMIR registers scalar (grey-level) volumes")


def _volume_with_geometry(node, role: str, ignored_transform=None) -> Volume:
    volume = volume_from_ras_affine(voxel_array_view(node), ijk_to_world_ras(node, ignored_transform),
                                    name=node.GetName())
    gram = volume.direction.T @ volume.direction
    if not np.allclose(gram, np.eye(3), atol=1e-4):
        raise SAMIRInputError(f"{role} volume {node_label(node)} has a sheared voxel grid (its IJK to RAS axes are not"
                              " perpendicular); resample it onto a regular grid first")
    return volume


def volume_from_node(node, role: str = "input", validate: bool = True, ignored_transform=None) -> Volume:
    """Engine volume (array view + LPS geometry) of a scalar volume node, for any IJK -> RAS matrix
    (flips, obliques, anisotropic spacing, linear parent transforms).

    ``validate`` applies the engine's own checks (3D, at least 4 voxels per axis, finite, not
    constant) and raises :class:`SAMIRInputError` with a message naming the node.
    ``ignored_transform``: see :func:`parent_transform_to_world`.
    """
    _check_scalar_volume_node(node, role)
    volume = _volume_with_geometry(node, role, ignored_transform)
    if validate:
        check_volume(volume, role)
    return volume


def check_source_file(node, role: str = "input") -> None:
    """Refuse a volume node read from a damaged file, with the engine's reason.

    Slicer's readers are ITK's: a NIfTI file cut off by an interrupted copy loads without a word, the
    missing voxels zero. The file the node was loaded from (its storage node's, while it exists) is
    checked as the engine checks its inputs (:mod:`samir.file_integrity`).
    """
    storage = node.GetStorageNode() if node is not None and node.IsA("vtkMRMLStorableNode") else None
    file_name = storage.GetFileName() if storage is not None else None
    if file_name and Path(file_name).is_file():
        check_image_file(Path(file_name), f"{role} volume {node_label(node)}: its file")


def labels_from_node(node, role: str = "input") -> Volume:
    """Engine label map of a (label map or scalar) volume node, validated as labels."""
    _check_scalar_volume_node(node, f"{role} label map")
    volume = _volume_with_geometry(node, f"{role} label map")
    check_labels(volume, role)
    return volume


def update_volume_node(node, volume: Volume) -> None:
    """Replace the node's voxels and geometry by ``volume`` (one copy; world geometry, so any parent
    transform is removed)."""
    array = np.ascontiguousarray(volume.array)
    if array.ndim != 3:
        raise SAMIRInputError(f"volume '{volume.name}' has {array.ndim} dimensions; expected 3")
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    was_modifying = node.StartModify()
    node.SetAndObserveTransformNodeID(None)
    node.SetIJKToRASMatrix(array_to_matrix(index_to_ras(volume)))
    node.SetAndObserveImageData(image)
    node.EndModify(was_modifying)


def add_volume_node(scene, volume: Volume, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """New volume node (with default display) in ``scene`` holding ``volume``."""
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    try:
        update_volume_node(node, volume)
        node.CreateDefaultDisplayNodes()
    except Exception:
        remove_node(node)
        raise
    return node


def checkerboard(fixed: Volume, warped: Volume, squares: int = 8) -> Volume:
    """Checkerboard of two volumes on the same grid (tiles alternate in all three axes).

    The warped volume is rescaled to the fixed volume's intensity range (robust 1-99 percentiles) so
    that the tiles are comparable when the contrasts differ.
    """
    if not fixed.same_grid(warped):
        raise SAMIRInputError(f"checkerboard: '{warped.name}' is not on the grid of '{fixed.name}'")
    fixed_values = fixed.array.astype(np.float32)
    warped_values = warped.array.astype(np.float32)
    f_lo, f_hi = np.percentile(fixed_values, [1, 99])
    w_lo, w_hi = np.percentile(warped_values, [1, 99])
    if w_hi > w_lo:
        warped_values = (warped_values - w_lo) / (w_hi - w_lo) * (f_hi - f_lo) + f_lo
    tiles = [np.arange(n) * squares // max(n, 1) for n in fixed.shape]
    parity = (tiles[0][:, None, None] + tiles[1][None, :, None] + tiles[2][None, None, :]) % 2 == 1
    return fixed.with_array(np.where(parity, warped_values, fixed_values), name=f"{fixed.name} checkerboard")


def remove_node(node) -> None:
    """Remove a node from its scene together with its display and storage nodes."""
    scene = node.GetScene() if node is not None else None
    if scene is None:
        return
    dependents = []
    if node.IsA("vtkMRMLDisplayableNode"):
        dependents += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        dependents += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for dependent in dependents:
        if dependent is not None and dependent.GetScene() is not None:
            scene.RemoveNode(dependent)


def same_node(a, b) -> bool:
    return a is not None and b is not None and a.GetID() == b.GetID()


def scene_of(*nodes) -> Optional["slicer.vtkMRMLScene"]:
    """The scene of the first node that is in one (``None`` if none is)."""
    for node in nodes:
        if node is not None and node.GetScene() is not None:
            return node.GetScene()
    return None
