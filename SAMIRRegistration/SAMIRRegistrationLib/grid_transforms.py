"""Engine displacement fields <-> ``vtkMRMLGridTransformNode``.

The engine's field ``d`` lives on the fixed grid in LPS millimetres: fixed point ``p`` is found in
the moving image at ``p + d(p)`` (ITK's resampling direction). In Slicer that is the transform *from
parent*: a moving volume placed under the node is displayed (and hardened, and resampled) at world
point ``p`` with the value it has at ``TransformFromParent(p)``. So the node is built exactly as
Slicer builds it when it reads an ITK displacement-field file: a ``vtkOrientedGridTransform`` in RAS
(grid origin and direction and the vectors' first two components flipped), linear interpolation,
stored as TransformFromParent. The grid is float32.

The conversions of points and directions go through :mod:`samir.geometry` (``index_to_ras``,
``LPS_TO_RAS``, ``volume_from_ras_affine``); nothing here restates them.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import slicer
import vtk
from samir.geometry import LPS_TO_RAS, SAMIRInputError, Volume, index_to_ras, volume_from_ras_affine
from vtk.util import numpy_support

from .volumes import array_to_matrix, matrix_to_array, node_label, remove_node

LPS_RAS_LINEAR = LPS_TO_RAS[:3, :3]


def displacement_to_grid_transform(displacement_lps: np.ndarray, grid: Volume) -> "slicer.vtkOrientedGridTransform":
    """``vtkOrientedGridTransform`` (RAS, float32 vectors) of an engine field ``(D, H, W, 3)`` on ``grid``."""
    displacement_lps = np.asarray(displacement_lps)
    if displacement_lps.shape != tuple(grid.shape[-3:]) + (3,):
        raise SAMIRInputError(f"displacement field shape {displacement_lps.shape} does not match the grid"
                              f" {tuple(grid.shape[-3:])} + (3,)")
    if not np.all(np.isfinite(displacement_lps)):
        raise SAMIRInputError("displacement field contains NaN or infinite vectors")
    affine = index_to_ras(grid)
    spacing = np.asarray(grid.spacing)
    direction = affine[:3, :3] / spacing
    vectors_ras = np.ascontiguousarray((displacement_lps @ LPS_RAS_LINEAR.T).astype(np.float32))
    image = vtk.vtkImageData()
    d, h, w = grid.shape[-3:]
    image.SetDimensions(w, h, d)
    image.SetOrigin(*affine[:3, 3])
    image.SetSpacing(*spacing)
    scalars = numpy_support.numpy_to_vtk(vectors_ras.reshape(-1, 3), deep=True, array_type=vtk.VTK_FLOAT)
    scalars.SetName("displacement")
    image.GetPointData().SetScalars(scalars)
    direction_matrix = np.eye(4)
    direction_matrix[:3, :3] = direction
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(image)
    transform.SetGridDirectionMatrix(array_to_matrix(direction_matrix))
    transform.SetInterpolationModeToLinear()
    transform.SetDisplacementScale(1.0)
    transform.SetDisplacementShift(0.0)
    return transform


def set_registration_references(transform_node, fixed_node=None, moving_node=None) -> None:
    """Fixed/moving node references the way Slicer's registration tools set them (DICOM REG export uses them)."""
    if fixed_node is not None:
        transform_node.SetNodeReferenceID(transform_node.GetFixedNodeReferenceRole(), fixed_node.GetID())
    if moving_node is not None:
        transform_node.SetNodeReferenceID(transform_node.GetMovingNodeReferenceRole(), moving_node.GetID())


def update_grid_transform_node(transform_node, displacement_lps: np.ndarray, grid: Volume,
                               fixed_node=None, moving_node=None) -> None:
    """Put the field into ``transform_node`` as TransformFromParent and set the registration references."""
    if transform_node is None or not transform_node.IsA("vtkMRMLTransformNode"):
        raise SAMIRInputError(f"output transform {node_label(transform_node)} is not a transform node")
    transform = displacement_to_grid_transform(displacement_lps, grid)
    was_modifying = transform_node.StartModify()
    transform_node.SetAndObserveTransformFromParent(transform)
    set_registration_references(transform_node, fixed_node, moving_node)
    transform_node.EndModify(was_modifying)


def add_grid_transform_node(scene, displacement_lps: np.ndarray, grid: Volume, name: str,
                            fixed_node=None, moving_node=None):
    """New ``vtkMRMLGridTransformNode`` in ``scene`` holding the field."""
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", scene.GenerateUniqueName(name))
    try:
        update_grid_transform_node(node, displacement_lps, grid, fixed_node, moving_node)
    except Exception:
        remove_node(node)
        raise
    return node


def displacement_from_grid_transform(transform) -> Tuple[np.ndarray, Volume]:
    """Inverse of :func:`displacement_to_grid_transform`: ``(field (D, H, W, 3) LPS mm, grid)``."""
    image = transform.GetDisplacementGrid()
    if image is None:
        raise SAMIRInputError("the grid transform has no displacement grid")
    w, h, d = image.GetDimensions()
    vectors_ras = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(d, h, w, 3)
    scale, shift = transform.GetDisplacementScale(), transform.GetDisplacementShift()
    vectors_ras = vectors_ras * scale + shift if (scale != 1.0 or shift != 0.0) else vectors_ras
    direction = matrix_to_array(transform.GetGridDirectionMatrix())[:3, :3] if transform.GetGridDirectionMatrix() \
        else np.eye(3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    grid = volume_from_ras_affine(np.zeros((d, h, w), np.uint8), affine, name="grid")
    return (vectors_ras @ LPS_RAS_LINEAR.T).astype(np.float32), grid


def displacement_from_transform_node(transform_node) -> Tuple[np.ndarray, Volume]:
    """Field and grid of a node holding a single grid transform as TransformFromParent."""
    transform = transform_node.GetTransformFromParentAs("vtkOrientedGridTransform", False, True)
    if transform is None:
        raise SAMIRInputError(f"transform {node_label(transform_node)} does not hold a single grid transform"
                              " from parent")
    return displacement_from_grid_transform(transform)


def show_transform_grid(transform_node, region_node=None, spacing_mm: float = 10.0):
    """Show the transform as a deformed grid in the slice views (Transforms module: Display > Grid)."""
    transform_node.CreateDefaultDisplayNodes()
    display = transform_node.GetDisplayNode()
    display.SetVisualizationMode(display.VIS_MODE_GRID)
    display.SetGridSpacingMm(spacing_mm)
    if region_node is not None:
        display.SetAndObserveRegionNode(region_node)
    display.SetVisibility2D(True)
    display.SetVisibility(True)
    return display

