"""Scene helpers for looking at a result: Jacobian colour map and legend, checkerboard volume, the
moving volume previewed under the result transform.

MRML only (no views, no Qt): the module's widget puts these nodes into the slice views.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from samir.geometry import SAMIRInputError

from .volumes import add_volume_node, checkerboard, node_label, update_volume_node, volume_from_node

JACOBIAN_COLOR_NODE_NAME = "SAMIR Jacobian"
# Found by class and this attribute, never by name: a Jacobian volume made with "Create new" may carry
# the same name.
ROLE_ATTRIBUTE = "SAMIR.Role"
JACOBIAN_COLOR_ROLE = "JacobianColors"
# On a volume previewed under a result transform: the ID of the parent it had before ("" for none).
PREVIEW_PARENT_ATTRIBUTE = "SAMIR.PreviewParentTransformID"
JACOBIAN_RANGE = (0.0, 2.0)  # shown from 0 (folding at and below) to 2 (local volume doubled)
# (Jacobian determinant, RGB): compression blue, no change white, expansion red, folding dark purple
JACOBIAN_COLOR_STOPS = ((0.0, (0.25, 0.0, 0.35)), (0.5, (0.15, 0.35, 0.95)), (1.0, (1.0, 1.0, 1.0)),
                        (1.5, (0.95, 0.40, 0.15)), (2.0, (0.45, 0.0, 0.0)))


def jacobian_color_node(scene):
    """The scene's 256-entry diverging colour table for Jacobian determinants (created once)."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        table = scene.GetNthNodeByClass(index, "vtkMRMLColorTableNode")
        if table.GetAttribute(ROLE_ATTRIBUTE) == JACOBIAN_COLOR_ROLE:
            return table
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", JACOBIAN_COLOR_NODE_NAME)
    node.SetAttribute(ROLE_ATTRIBUTE, JACOBIAN_COLOR_ROLE)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    stops = np.array([value for value, _ in JACOBIAN_COLOR_STOPS])
    colors = np.array([rgb for _, rgb in JACOBIAN_COLOR_STOPS])
    values = np.linspace(*JACOBIAN_RANGE, 256)
    for index, value in enumerate(values):
        rgb = [float(np.interp(value, stops, colors[:, c])) for c in range(3)]
        node.SetColor(index, f"J={value:.2f}", *rgb, 1.0)
    node.SetAttribute("Category", "SAMIR")
    return node


def show_jacobian(jacobian_node, color_logic=None):
    """Colour the Jacobian map with :func:`jacobian_color_node` over [0, 2]; with a
    ``vtkSlicerColorLogic`` also add a colour legend. Returns the legend display node (or ``None``)."""
    scene = jacobian_node.GetScene()
    jacobian_node.CreateDefaultDisplayNodes()
    display = jacobian_node.GetDisplayNode()
    display.SetAndObserveColorNodeID(jacobian_color_node(scene).GetID())
    display.AutoWindowLevelOff()
    low, high = JACOBIAN_RANGE
    display.SetWindowLevel(high - low, 0.5 * (high + low))
    if color_logic is None:
        return None
    legend = color_logic.AddDefaultColorLegendDisplayNode(jacobian_node)
    if legend is not None:
        legend.SetTitleText("Jacobian determinant")
        legend.SetLabelFormat("%.2f")
    return legend


def add_checkerboard_node(fixed_node, warped_node, squares: int = 8, output_node=None, name: Optional[str] = None):
    """A checkerboard of the fixed volume and the warped moving volume (same grid) as a volume node."""
    if warped_node is None:
        raise SAMIRInputError("a checkerboard needs the warped volume (select an output volume)")
    fixed = volume_from_node(fixed_node, "fixed", validate=False)
    warped = volume_from_node(warped_node, "warped", validate=False)
    if not fixed.same_grid(warped, tol=1e-3):
        raise SAMIRInputError(f"{node_label(warped_node)} is not on the grid of {node_label(fixed_node)}")
    board = checkerboard(fixed, fixed.with_array(warped.array), squares)
    if output_node is not None:
        update_volume_node(output_node, board)
        return output_node
    return add_volume_node(fixed_node.GetScene(), board, name or f"{fixed_node.GetName()} checkerboard")


def preview_under_transform(volume_node, transform_node) -> None:
    """Place ``volume_node`` under ``transform_node`` to show the result without resampling; the parent
    it had is remembered, so :func:`end_transform_preview` restores it (a later run then reads the
    volume as it was, not through a non-linear transform)."""
    if volume_node.GetAttribute(PREVIEW_PARENT_ATTRIBUTE) is None:
        volume_node.SetAttribute(PREVIEW_PARENT_ATTRIBUTE, volume_node.GetTransformNodeID() or "")
    volume_node.SetAndObserveTransformNodeID(transform_node.GetID())


def end_transform_preview(volume_node) -> bool:
    """Undo :func:`preview_under_transform` on ``volume_node`` (no-op otherwise); True if it was previewed."""
    if volume_node is None:
        return False
    previous = volume_node.GetAttribute(PREVIEW_PARENT_ATTRIBUTE)
    if previous is None:
        return False
    scene = volume_node.GetScene()
    parent = scene.GetNodeByID(previous) if previous and scene is not None else None
    volume_node.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)
    volume_node.RemoveAttribute(PREVIEW_PARENT_ATTRIBUTE)
    return True
