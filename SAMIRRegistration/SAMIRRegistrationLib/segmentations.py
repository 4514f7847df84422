"""Propagate a segmentation through a registration transform, the way a Slicer user would.

Clone the moving segmentation, apply the transform, harden it, and make the fixed volume its
reference geometry. Hardening a non-linear transform in Slicer resamples each labelmap onto its
own (moving) grid and a change of reference geometry resamples it once more; two nearest-neighbour
steps cost a voxel at every boundary. So labelmaps are hardened straight onto the fixed grid, in
one resampling through the transform with Slicer's own resampler. Segment IDs, names, colours,
label values and terminology travel with the segments (``vtkSegmentation.DeepCopy``); the input
segmentation node is never modified. The work happens on a temporary node, so a failure leaves
the scene (and an existing output node) as it was.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import slicer
import vtk
from samir.geometry import SAMIRInputError, Volume
from samir.io import check_labels_on_image
from vtk.util import numpy_support

from .volumes import (array_to_matrix, ijk_to_world_ras, labels_from_node, node_label, remove_node, volume_from_node,
                      voxel_array_view)


def segmentations_logic():
    """A ``vtkSlicerSegmentationsModuleLogic`` for the current scene.

    Inside Slicer this is the module's own logic; elsewhere (slicer-core, tests) a new instance,
    which also registers the segmentation converter rules.
    """
    modules = getattr(slicer, "modules", None)
    if modules is not None and hasattr(modules, "segmentations"):
        return modules.segmentations.logic()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(slicer.mrmlScene)
    return logic


def segment_ids_of(segmentation) -> List[str]:
    """Segment IDs of a ``vtkSegmentation`` in segment order."""
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentIDs(ids)
    return [ids.GetValue(i) for i in range(ids.GetNumberOfValues())]


def segment_ids(segmentation_node) -> List[str]:
    """Segment IDs of a segmentation node in segment order."""
    return segment_ids_of(segmentation_node.GetSegmentation())


def check_segmentation(segmentation_node, role: str = "moving") -> None:
    if segmentation_node is None:
        raise SAMIRInputError(f"no {role} segmentation was selected")
    if not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise SAMIRInputError(f"{role} segmentation {node_label(segmentation_node)} is a"
                              f" {segmentation_node.GetClassName()}, not a segmentation")
    if not segment_ids(segmentation_node):
        raise SAMIRInputError(f"{role} segmentation {node_label(segmentation_node)} has no segments")


def _node_ids(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def check_segmentation_on_volume(segmentation_node, volume: Volume, role: str = "moving",
                                 ignored_transform=None) -> None:
    """Refuse a segmentation with segments outside its volume (the engine's check of a label map against
    its image, :func:`samir.io.check_labels_on_image`): they would be lost without a word.

    The segments are exported on the segmentation's own grid (where they are), in world coordinates;
    ``ignored_transform`` is looked through as for the volume (:func:`.volumes.parent_transform_to_world`).
    A segmentation under a non-linear transform is not checked here: propagating it hardens that first.
    """
    parent = segmentation_node.GetParentTransformNode()
    if parent is not None and not parent.IsTransformToWorldLinear():
        return
    scene = segmentation_node.GetScene()
    existing = _node_ids(scene)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("SAMIR check"))
    try:
        exported = segmentations_logic().ExportAllSegmentsToLabelmapNode(
            segmentation_node, labelmap, slicer.vtkSegmentation.EXTENT_UNION_OF_EFFECTIVE_SEGMENTS)
        image = labelmap.GetImageData()
        if not exported or image is None or image.GetPointData().GetScalars() is None:
            return  # no segment has voxels: nothing can lie outside
        labelmap.SetAndObserveTransformNodeID(segmentation_node.GetTransformNodeID())
        labels = volume_from_node(labelmap, f"{role} segmentation", validate=False,
                                  ignored_transform=ignored_transform)
        labels = labels.with_array(np.array(labels.array, copy=True), name=segmentation_node.GetName())
    finally:
        remove_node(labelmap)
        for node_id in _node_ids(scene) - existing:  # e.g. the colour table the export adds
            if scene.GetNodeByID(node_id) is not None:
                scene.RemoveNode(scene.GetNodeByID(node_id))
    check_labels_on_image(labels, volume, f"{role} segmentation", f"{role} volume")


def _harden(node) -> None:
    if hasattr(node, "HardenTransform"):
        node.HardenTransform()
    elif not slicer.vtkSlicerTransformLogic.hardenTransform(node):
        raise RuntimeError(f"hardening the transform of {node_label(node)} failed")


def _reference_geometry(reference_volume_node):
    """An (empty) ``vtkOrientedImageData`` with the reference volume's grid in world RAS."""
    dims = reference_volume_node.GetImageData().GetDimensions()
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    reference.SetGeometryFromImageToWorldMatrix(array_to_matrix(ijk_to_world_ras(reference_volume_node)))
    return reference


def _image_array(image) -> np.ndarray:
    extent = image.GetExtent()
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)


def _image_like(image, array: np.ndarray):
    """A ``vtkOrientedImageData`` with ``image``'s geometry and extent, holding ``array`` (k, j, i)."""
    out = slicer.vtkOrientedImageData()
    out.SetExtent(image.GetExtent())
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    out.SetGeometryFromImageToWorldMatrix(matrix)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    out.GetPointData().SetScalars(scalars)
    return out


def _resample_layers_through(segmentation, segment_to_fixed_world, reference) -> None:
    """Replace every binary labelmap layer by its resampling onto ``reference`` through the transform.

    One interpolation per segment: its mask is resampled linearly (Slicer's
    ``vtkOrientedImageDataResample``) and thresholded at 0.5 — the per-label interpolation the engine's
    ``warp_labels`` uses — so a structure is interpolated once, straight onto the fixed grid.
    """
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    layers = {}
    for segment_id in segment_ids_of(segmentation):
        segment = segmentation.GetSegment(segment_id)
        layer = segment.GetRepresentation(labelmap_name)
        if layer is not None:
            layers.setdefault(layer.GetAddressAsString(""), (layer, []))[1].append(segment)
    for layer, segments in layers.values():
        values = _image_array(layer)
        new_values = None
        for segment in segments:
            mask = _image_like(layer, (values == segment.GetLabelValue()).astype(np.float32))
            resampled = slicer.vtkOrientedImageData()
            if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                    mask, reference, resampled, True, False, segment_to_fixed_world, 0.0):
                raise RuntimeError(f"resampling segment '{segment.GetName()}' onto the fixed grid failed")
            inside = _image_array(resampled) >= 0.5
            if new_values is None:
                new_values = np.zeros(inside.shape, np.uint8 if max(s.GetLabelValue() for s in segments) < 256
                                      else np.int32)
            new_values[inside] = segment.GetLabelValue()
        new_layer = _image_like(reference, new_values)
        for segment in segments:
            segment.AddRepresentation(labelmap_name, new_layer)


def propagate_segmentation(segmentation_node, transform_node, reference_volume_node, output_node=None,
                           name: Optional[str] = None):
    """Segmentation ``segmentation_node`` carried through ``transform_node`` onto ``reference_volume_node``.

    ``transform_node`` maps reference (fixed) points to segmentation (moving) points, i.e. it is the
    transform the moving data is placed under (the registration's output). The clone is "placed
    under" the transform (after the input's own parent transforms, if any) and hardened onto the
    reference volume's grid: binary labelmaps in one resampling per segment, other source
    representations (closed surfaces) by Slicer's harden. Returns ``output_node`` (filled) or a new
    segmentation node named ``name``.
    """
    check_segmentation(segmentation_node)
    if reference_volume_node is None or reference_volume_node.GetImageData() is None:
        raise SAMIRInputError("segmentation propagation needs the fixed volume (with voxels) as reference geometry")
    if transform_node is None or transform_node.GetScene() is None:
        raise SAMIRInputError("segmentation propagation needs a transform node in the scene")
    scene = transform_node.GetScene()
    if output_node is not None and output_node.GetID() == segmentation_node.GetID():
        raise SAMIRInputError("the propagated segmentation must not be the input segmentation; choose another output")
    work = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName("SAMIR propagation"))
    try:
        segmentation = work.GetSegmentation()
        segmentation.DeepCopy(segmentation_node.GetSegmentation())
        labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        if segmentation.GetSourceRepresentationName() == labelmap_name:
            segment_to_fixed_world = vtk.vtkGeneralTransform()
            slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(segmentation_node.GetParentTransformNode(), None,
                                                                 segment_to_fixed_world)
            registration = vtk.vtkGeneralTransform()
            slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(transform_node, None, registration)
            segment_to_fixed_world.PostMultiply()
            segment_to_fixed_world.Concatenate(registration)
            _resample_layers_through(segmentation, segment_to_fixed_world, _reference_geometry(reference_volume_node))
            segmentation.RemoveRepresentation(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
        else:
            input_parent = segmentation_node.GetParentTransformNode()
            if input_parent is not None:
                work.SetAndObserveTransformNodeID(input_parent.GetID())
                _harden(work)
            work.SetAndObserveTransformNodeID(transform_node.GetID())
            _harden(work)
        work.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        if output_node is None:
            work.SetName(scene.GenerateUniqueName(name or f"{segmentation_node.GetName()} propagated"))
            work.CreateDefaultDisplayNodes()
            _copy_display(segmentation_node, work)
            return work
        copy_segmentation_into(work, output_node, reference_volume_node, segmentation_node)
        remove_node(work)
        return output_node
    except Exception:
        if work.GetScene() is not None:
            remove_node(work)
        raise


def copy_segmentation_into(source_node, target_node, reference_volume_node, display_source_node=None) -> None:
    """Replace ``target_node``'s segments by ``source_node``'s (world coordinates: no parent transform)."""
    was_modifying = target_node.StartModify()
    target_node.SetAndObserveTransformNodeID(None)
    target_node.GetSegmentation().DeepCopy(source_node.GetSegmentation())
    target_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    target_node.CreateDefaultDisplayNodes()
    _copy_display(display_source_node or source_node, target_node)
    target_node.EndModify(was_modifying)


def _copy_display(source_node, target_node) -> None:
    """Per-segment visibility and opacity as in the source (colours live in the segments)."""
    source, target = source_node.GetDisplayNode(), target_node.GetDisplayNode()
    if source is None or target is None:
        return
    target.SetOpacity(source.GetOpacity())
    for segment_id in segment_ids(target_node):
        if source_node.GetSegmentation().GetSegment(segment_id) is not None:
            target.SetSegmentVisibility(segment_id, source.GetSegmentVisibility(segment_id))


def segmentation_to_labels(segmentation_node, reference_volume_node, role: str = "moving") -> Volume:
    """Label map (segment ``n`` -> label ``n + 1`` in segment order) on the reference volume's grid."""
    check_segmentation(segmentation_node, role)
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("SAMIR labels"))
    try:
        ids = vtk.vtkStringArray()
        for segment_id in segment_ids(segmentation_node):
            ids.InsertNextValue(segment_id)
        if not segmentations_logic().ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap,
                                                                  reference_volume_node):
            raise SAMIRInputError(f"could not export {role} segmentation {node_label(segmentation_node)} to a label map")
        labels = labels_from_node(labelmap, role)
        return labels.with_array(np.array(voxel_array_view(labelmap), copy=True))
    finally:
        remove_node(labelmap)


def segment_mask(segmentation_node, segment_id: str, reference_volume_node) -> np.ndarray:
    """Binary mask ``(k, j, i)`` of one segment on the reference volume's grid."""
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("SAMIR mask"))
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        segmentations_logic().ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference_volume_node)
        return np.array(voxel_array_view(labelmap) > 0, copy=True)
    finally:
        remove_node(labelmap)
