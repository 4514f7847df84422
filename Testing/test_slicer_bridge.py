"""The MRML bridge on real Slicer MRML (slicer-core): geometry, grid transforms, resampling,
segmentation propagation, .h5 round trip, display helpers, sequence bookkeeping, bad inputs.

No engine optimisation runs here (see test_slicer_engine.py): fields are known analytically.
"""
import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed")

import SimpleITK as sitk
import vtk
from samir.geometry import LPS_TO_RAS, SAMIRInputError, Volume, index_to_ras, to_sitk
from samir.io import displacement_transform
from samir.resampling import warp_labels, warp_volume
from SAMIRRegistrationLib import display, grid_transforms, segmentations, volumes
from SAMIRRegistrationLib.engine_runner import EngineOutputs, EngineRun, EngineSettings, RunState
from SAMIRRegistrationLib.registration import PairRegistrationTask
from SAMIRRegistrationLib.sequences import SequencePropagationTask, propagation_plan
from slicer_test_support import (
    dice,
    ellipsoid_labels,
    new_scene,
    node_ids,
    phantom_displacement,
    phantom_scales,
    phantom_sequence,
    rotation,
    segmentation_from_labels,
    smooth_blobs,
    volume_node,
)
from vtk.util import numpy_support

GEOMETRIES = {
    "identity": dict(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3)),
    "anisotropic": dict(spacing=(0.7, 1.3, 3.0), origin=(-12.5, 40.0, 7.25), direction=np.eye(3)),
    "flipped": dict(spacing=(1.1, 0.9, 2.0), origin=(30.0, -20.0, 5.0), direction=np.diag([-1.0, 1.0, -1.0])),
    "oblique": dict(spacing=(1.2, 0.8, 2.5), origin=(3.0, -7.0, 11.0), direction=rotation((20, -35, 50))),
    "oblique flipped": dict(spacing=(0.9, 1.4, 1.8), origin=(-5.0, 8.0, -60.0),
                            direction=rotation((-15, 25, 160)) @ np.diag([1.0, -1.0, 1.0])),
}


@pytest.fixture
def scene():
    return new_scene()


def ras_of_voxel(node, ijk):
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array(matrix.MultiplyPoint((*ijk, 1.0))[:3])


# ------------------------------------------------------------------------------------------------
# volumes


@pytest.mark.parametrize("name", GEOMETRIES)
def test_volume_round_trip_keeps_voxels_and_geometry(scene, name):
    geometry = GEOMETRIES[name]
    array = smooth_blobs((9, 11, 13), seed=1)
    node = volume_node(scene, array, name, **geometry)
    back = volumes.volume_from_node(node)
    assert back.array.shape == array.shape and np.array_equal(back.array, array)
    assert np.allclose(back.spacing, geometry["spacing"]) and np.allclose(back.origin, geometry["origin"])
    assert np.allclose(back.direction, geometry["direction"], atol=1e-12)
    # reading shares the node's memory (no copy)
    assert np.shares_memory(back.array, numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()))
    # Slicer's own IJK->RAS of a voxel equals SimpleITK's physical point, flipped to RAS
    image = to_sitk(back)
    for ijk in [(0, 0, 0), (12, 0, 0), (3, 10, 8), (12, 10, 8)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        assert np.allclose(ras_of_voxel(node, ijk), LPS_TO_RAS[:3, :3] @ lps, atol=1e-9)


@pytest.mark.parametrize("name", ["flipped", "oblique flipped"])
def test_volume_read_by_slicer_from_nrrd_matches_simpleitk(scene, name, tmp_path):
    """Independent of our own writer: Slicer's NRRD reader and SimpleITK agree through the bridge."""
    geometry = GEOMETRIES[name]
    volume = Volume(smooth_blobs((8, 10, 12), seed=2), **geometry)
    path = tmp_path / "image.nrrd"
    sitk.WriteImage(to_sitk(volume), str(path))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "read by Slicer")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    back = volumes.volume_from_node(node)
    reference = sitk.ReadImage(str(path))
    # Slicer's reader may store the voxels in another order (it makes left-handed grids right-handed),
    # so compare in physical space: each voxel of the node, looked up in SimpleITK's image at the same point
    looked_up = sitk.Resample(reference, to_sitk(back), sitk.Transform(), sitk.sitkNearestNeighbor, -1.0)
    assert np.array_equal(sitk.GetArrayFromImage(looked_up), back.array)
    assert sorted(np.round(back.spacing, 6)) == sorted(np.round(reference.GetSpacing(), 6))


def test_linear_parent_transform_is_part_of_the_geometry(scene):
    node = volume_node(scene, smooth_blobs((8, 9, 10)), "under transform", **GEOMETRIES["oblique"])
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform = vtk.vtkTransform()
    transform.Translate(4.0, -2.0, 9.0)
    transform.RotateWXYZ(30.0, 0.2, 1.0, 0.3)
    parent.SetMatrixTransformToParent(transform.GetMatrix())
    node.SetAndObserveTransformNodeID(parent.GetID())
    seen = volumes.volume_from_node(node)
    node.HardenTransform()  # Slicer bakes the linear transform into IJK->RAS
    hardened = volumes.volume_from_node(node)
    assert np.allclose(index_to_ras(seen), index_to_ras(hardened), atol=1e-9)


def test_bad_volumes_give_clear_errors(scene):
    flat = volume_node(scene, np.random.default_rng(0).random((1, 20, 20)).astype(np.float32), "single slice")
    with pytest.raises(SAMIRInputError, match="at least 4 voxels"):
        volumes.volume_from_node(flat, "moving")
    constant = volume_node(scene, np.ones((6, 6, 6), np.float32), "constant")
    with pytest.raises(SAMIRInputError, match="constant"):
        volumes.volume_from_node(constant, "fixed")
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no voxels")
    with pytest.raises(SAMIRInputError, match="no voxels"):
        volumes.volume_from_node(empty, "fixed")
    warped = volume_node(scene, smooth_blobs((6, 6, 6)), "under grid")
    grid = grid_transforms.add_grid_transform_node(scene, np.zeros((6, 6, 6, 3), np.float32),
                                                   volumes.volume_from_node(warped), "grid")
    warped.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(SAMIRInputError, match="non-linear transform"):
        volumes.volume_from_node(warped, "moving")
    assert volumes.volume_from_node(warped, "moving", ignored_transform=grid).shape == (6, 6, 6)


# ------------------------------------------------------------------------------------------------
# grid transforms


def smooth_field(grid: Volume, amplitude_mm: float = 3.0) -> np.ndarray:
    """A smooth, invertible LPS displacement field on ``grid``."""
    from samir.geometry import world_points_of_grid
    points = world_points_of_grid(grid)
    centre = points.reshape(-1, 3).mean(0)
    scale = np.ptp(points.reshape(-1, 3), axis=0).max()
    p = (points - centre) / scale
    field = np.stack([np.sin(2.0 * p[..., 1] + 0.5), np.cos(2.5 * p[..., 2]) - 0.5, np.sin(1.5 * p[..., 0] + p[..., 1])],
                     axis=-1)
    return (amplitude_mm * field).astype(np.float32)


def test_grid_transform_node_is_float32_ras_from_parent_with_registration_references(scene):
    fixed = volume_node(scene, smooth_blobs((8, 10, 12)), "fixed", **GEOMETRIES["oblique flipped"])
    moving = volume_node(scene, smooth_blobs((8, 10, 12), seed=5), "moving")
    grid = volumes.volume_from_node(fixed)
    field = smooth_field(grid)
    node = grid_transforms.add_grid_transform_node(scene, field, grid, "T", fixed, moving)
    assert node.IsA("vtkMRMLGridTransformNode")
    assert node.GetNodeReference(node.GetFixedNodeReferenceRole()).GetID() == fixed.GetID()
    assert node.GetNodeReference(node.GetMovingNodeReferenceRole()).GetID() == moving.GetID()
    stored = node.GetTransformFromParentAs("vtkOrientedGridTransform", False, True)
    assert stored is not None
    assert stored.GetDisplacementGrid().GetScalarType() == vtk.VTK_FLOAT
    assert stored.GetInterpolationModeAsString() == "Linear"
    back, back_grid = grid_transforms.displacement_from_transform_node(node)
    assert np.array_equal(back, field) and back_grid.same_grid(grid, tol=1e-9)
    # the node maps a fixed voxel centre (RAS) to RAS + field in RAS
    from_parent = node.GetTransformFromParent()
    for ijk in [(0, 0, 0), (5, 4, 3), (11, 9, 7)]:
        ras = ras_of_voxel(fixed, ijk)
        expected = ras + LPS_TO_RAS[:3, :3] @ field[ijk[2], ijk[1], ijk[0]]
        assert np.allclose(from_parent.TransformPoint(ras), expected, atol=1e-4)


def test_known_shift_makes_slicer_resampling_put_moving_exactly_on_fixed(scene):
    geometry = GEOMETRIES["oblique flipped"]
    array = smooth_blobs((10, 12, 14), seed=3)
    fixed = volume_node(scene, array, "fixed", **geometry)
    shift_lps = np.array([4.3, -2.1, 6.8])  # content of fixed point p sits at p + shift in the moving image
    moving = volume_node(scene, array, "moving", spacing=geometry["spacing"],
                         origin=tuple(np.asarray(geometry["origin"]) + shift_lps), direction=geometry["direction"])
    before = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving, fixed)
    assert np.abs(volumes.voxel_array_view(before) - array).mean() > 0.05  # really misaligned
    grid = volumes.volume_from_node(fixed)
    field = np.broadcast_to(shift_lps.astype(np.float32), grid.shape + (3,)).copy()
    transform = grid_transforms.add_grid_transform_node(scene, field, grid, "shift", fixed, moving)
    moving.SetAndObserveTransformNodeID(transform.GetID())
    resampled = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving, fixed)
    assert np.allclose(volumes.voxel_array_view(resampled), array, atol=1e-4)


def engine_and_slicer_pair(scene):
    """Fixed (oblique flipped) and moving (other spacing/orientation) nodes, and a smooth field."""
    fixed = volume_node(scene, smooth_blobs((18, 20, 22), seed=4), "fixed", **GEOMETRIES["oblique flipped"])
    fixed_volume = volumes.volume_from_node(fixed)
    centre_lps = (index_to_ras(fixed_volume) @ np.array([10.5, 9.5, 8.5, 1.0]))[:3] * np.array([-1, -1, 1])
    spacing = (1.3, 1.1, 1.6)
    shape = (20, 24, 22)
    direction = rotation((5, -10, 15)) @ np.diag([-1.0, 1.0, 1.0])
    origin = centre_lps - direction @ (np.array(spacing) * (np.array(shape[::-1]) - 1) / 2)
    moving = volume_node(scene, 100.0 * smooth_blobs(shape, seed=6) + 20.0, "moving", spacing=spacing,
                         origin=tuple(origin), direction=direction)
    return fixed, moving, fixed_volume, smooth_field(fixed_volume, 2.5)


def test_engine_warp_agrees_with_slicer_resampling_through_the_transform(scene):
    fixed, moving, fixed_volume, field = engine_and_slicer_pair(scene)
    engine = warp_volume(volumes.volume_from_node(moving), fixed_volume, field).array
    transform = grid_transforms.add_grid_transform_node(scene, field, fixed_volume, "T", fixed, moving)
    moving.SetAndObserveTransformNodeID(transform.GetID())
    by_slicer = volumes.voxel_array_view(slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving, fixed))
    value_range = float(np.ptp(volumes.voxel_array_view(moving)))
    assert np.abs(engine - by_slicer).mean() <= 0.01 * value_range


def test_engine_label_warp_agrees_with_slicer_hardened_segmentation(scene):
    fixed, moving, fixed_volume, field = engine_and_slicer_pair(scene)
    moving_volume = volumes.volume_from_node(moving)
    labels = moving_volume.with_array(ellipsoid_labels(moving_volume.shape, [((8, 10, 8), (5, 6, 5)),
                                                                             ((12, 14, 14), (4, 5, 5))]))
    terminology = "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
    segmentation = segmentation_from_labels(scene, labels, "moving structures", {1: "left", 2: "right"},
                                            {1: (0.9, 0.1, 0.1), 2: (0.1, 0.2, 0.9)}, {1: terminology})
    input_ids = segmentations.segment_ids(segmentation)
    input_labels = segmentations.segmentation_to_labels(segmentation, moving).array.copy()
    transform = grid_transforms.add_grid_transform_node(scene, field, fixed_volume, "T", fixed, moving)

    propagated = segmentations.propagate_segmentation(segmentation, transform, fixed)

    by_slicer = segmentations.segmentation_to_labels(propagated, fixed).array
    by_engine = warp_labels(labels, fixed_volume, field).array
    for label in (1, 2):
        assert by_engine[by_engine == label].size > 100
        assert dice(by_slicer == label, by_engine == label) >= 0.99, label
    # names, colours, terminology carried; geometry is the fixed grid; input untouched
    assert segmentations.segment_ids(propagated) == input_ids
    for segment_id, name, color in zip(input_ids, ("left", "right"), ((0.9, 0.1, 0.1), (0.1, 0.2, 0.9))):
        segment = propagated.GetSegmentation().GetSegment(segment_id)
        assert segment.GetName() == name and np.allclose(segment.GetColor(), color)
    first = propagated.GetSegmentation().GetSegment(input_ids[0])
    tag = vtk.reference("")
    assert first.GetTag(first.GetTerminologyEntryTagName(), tag) and str(tag) == terminology
    assert propagated.GetParentTransformNode() is None
    labelmap = propagated.GetSegmentation().GetSegment(input_ids[0]).GetRepresentation(
        propagated.GetSegmentation().GetSourceRepresentationName())
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)  # IJK of the labelmap's extent -> RAS: the fixed grid's
    assert np.allclose(volumes.matrix_to_array(matrix), index_to_ras(fixed_volume), atol=1e-6)
    assert segmentation.GetParentTransformNode() is None
    assert segmentations.segment_ids(segmentation) == input_ids
    assert np.array_equal(segmentations.segmentation_to_labels(segmentation, moving).array, input_labels)


def test_transform_written_to_h5_by_slicer_reads_back_identical_and_simpleitk_agrees(scene, tmp_path):
    fixed = volume_node(scene, smooth_blobs((9, 10, 11)), "fixed", **GEOMETRIES["oblique flipped"])
    grid = volumes.volume_from_node(fixed)
    field = smooth_field(grid)
    node = grid_transforms.add_grid_transform_node(scene, field, grid, "T", fixed, None)
    path = tmp_path / "samir.h5"
    writer = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    writer.SetFileName(str(path))
    assert writer.WriteData(node)

    again = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "read back")
    reader = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    reader.SetFileName(str(path))
    assert reader.ReadData(again)
    back, back_grid = grid_transforms.displacement_from_transform_node(again)
    assert np.array_equal(back, field)
    assert back_grid.same_grid(grid, tol=1e-9)

    itk_transform = sitk.ReadTransform(str(path))
    engine_transform = displacement_transform(field, grid)
    slicer_transform = node.GetTransformFromParent()
    rng = np.random.default_rng(0)
    image = to_sitk(grid.with_array(np.zeros(grid.shape, np.float32)))
    for _ in range(20):
        index = rng.uniform(0, np.array(grid.shape[::-1]) - 1)
        lps = np.array(image.TransformContinuousIndexToPhysicalPoint(tuple(index)))
        by_itk = np.array(itk_transform.TransformPoint(tuple(lps)))
        assert np.allclose(by_itk, engine_transform.TransformPoint(tuple(lps)), atol=1e-4)
        by_slicer_ras = np.array(slicer_transform.TransformPoint(LPS_TO_RAS[:3, :3] @ lps))
        assert np.allclose(LPS_TO_RAS[:3, :3] @ by_slicer_ras, by_itk, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# display helpers


def test_jacobian_colour_map_legend_checkerboard_and_grid_display(scene):
    fixed = volume_node(scene, smooth_blobs((8, 10, 12)), "fixed", **GEOMETRIES["oblique"])
    grid = volumes.volume_from_node(fixed)
    jacobian = volumes.add_volume_node(scene, grid.with_array(np.linspace(0.5, 1.5, grid.array.size,
                                                                          dtype=np.float32).reshape(grid.shape)),
                                       "Jacobian")
    color_logic = slicer.vtkSlicerColorLogic()
    color_logic.SetMRMLScene(scene)
    legend = display.show_jacobian(jacobian, color_logic)
    shown = jacobian.GetDisplayNode()
    assert shown.GetColorNode().GetName() == display.JACOBIAN_COLOR_NODE_NAME
    assert shown.GetColorNode().GetNumberOfColors() == 256
    assert (shown.GetWindow(), shown.GetLevel()) == (2.0, 1.0)
    assert legend is not None and legend.GetTitleText() == "Jacobian determinant"
    # white at J = 1, blue below, red above
    color = [0.0] * 4
    shown.GetColorNode().GetColor(128, color)
    assert min(color[:3]) > 0.95
    shown.GetColorNode().GetColor(64, color)
    assert color[2] > color[0]
    shown.GetColorNode().GetColor(200, color)
    assert color[0] > color[2]

    warped = volumes.add_volume_node(scene, grid.with_array(1.0 - grid.array), "warped")
    board = display.add_checkerboard_node(fixed, warped, squares=2)
    values = volumes.voxel_array_view(board)
    assert np.allclose(values[0, 0, 0], grid.array[0, 0, 0])
    assert not np.allclose(values[0, 0, -1], grid.array[0, 0, -1])

    transform = grid_transforms.add_grid_transform_node(scene, smooth_field(grid), grid, "T")
    shown_grid = grid_transforms.show_transform_grid(transform, fixed)
    assert shown_grid.GetVisualizationMode() == shown_grid.VIS_MODE_GRID and shown_grid.GetVisibility2D()


def test_jacobian_colour_table_is_found_by_role_not_by_a_name_a_volume_can_share(scene):
    fixed = volume_node(scene, smooth_blobs((6, 8, 8)), "fixed")
    grid = volumes.volume_from_node(fixed)
    # "Create new" on the Jacobian selector names the volume like the colour table
    jacobian = volumes.add_volume_node(scene, grid.with_array(np.ones(grid.shape, np.float32)),
                                       display.JACOBIAN_COLOR_NODE_NAME)
    tables_before = scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")
    first = display.jacobian_color_node(scene)
    for _ in range(3):  # every run and every toggle of the display asks again
        display.show_jacobian(jacobian)
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == tables_before + 1
    assert jacobian.GetDisplayNode().GetColorNodeID() == first.GetID()
    first.SetName("renamed by the user")
    assert display.jacobian_color_node(scene) is first


def test_transform_preview_is_undone_and_restores_the_previous_parent(scene):
    fixed = volume_node(scene, smooth_blobs((6, 8, 8)), "fixed")
    moving = volume_node(scene, smooth_blobs((6, 8, 8), seed=1), "moving")
    grid = volumes.volume_from_node(fixed)
    result = grid_transforms.add_grid_transform_node(scene, smooth_field(grid), grid, "result")
    linear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "user's placement")
    moving.SetAndObserveTransformNodeID(linear.GetID())
    display.preview_under_transform(moving, result)
    assert moving.GetTransformNodeID() == result.GetID()
    with pytest.raises(SAMIRInputError, match="non-linear"):  # what a second run would refuse
        volumes.volume_from_node(moving, "moving")
    display.preview_under_transform(moving, result)  # shown twice: the first parent is still the one restored
    assert display.end_transform_preview(moving)
    assert moving.GetTransformNodeID() == linear.GetID()
    volumes.volume_from_node(moving, "moving")  # readable again
    assert not display.end_transform_preview(moving)  # nothing to undo: the user's own placement stays
    assert moving.GetTransformNodeID() == linear.GetID()
    moving.SetAndObserveTransformNodeID(None)
    display.preview_under_transform(moving, result)
    display.end_transform_preview(moving)
    assert moving.GetTransformNodeID() is None


# ------------------------------------------------------------------------------------------------
# tasks with an exactly known registration (no engine): bookkeeping, outputs, bad inputs


class KnownFieldRun(EngineRun):
    """An engine run whose field is given by a function of (fixed, moving) volumes."""

    def __init__(self, field_of, fixed, moving, settings, on_log=None, on_progress=None):
        super().__init__(fixed, moving, settings, on_log, on_progress)
        self.field_of = field_of

    def start(self):
        self.state = RunState.RUNNING

    def poll(self):
        if self.state == RunState.RUNNING:
            field = self.field_of(self.fixed, self.moving)
            self.outputs = EngineOutputs(field, self.fixed, warp_volume(self.moving, self.fixed, field),
                                         self.fixed.with_array(np.ones(self.fixed.shape, np.float32)),
                                         {"sdlogj": 0.0, "folding_percent": 0.0})
            self.state = RunState.SUCCEEDED
        return self.state


def known_runs(field_of):
    return lambda fixed, moving, settings, on_log=None, on_progress=None: KnownFieldRun(
        field_of, fixed, moving, settings, on_log, on_progress)


def test_pair_task_writes_all_outputs_on_the_fixed_grid(scene):
    fixed, moving, fixed_volume, field = engine_and_slicer_pair(scene)
    moving_volume = volumes.volume_from_node(moving)
    labels = moving_volume.with_array(ellipsoid_labels(moving_volume.shape, [((10, 12, 11), (6, 7, 6))]))
    segmentation = segmentation_from_labels(scene, labels, "structure")
    outputs = {key: scene.AddNewNodeByClass(cls, key) for key, cls in (
        ("transform", "vtkMRMLGridTransformNode"), ("volume", "vtkMRMLScalarVolumeNode"),
        ("segmentation", "vtkMRMLSegmentationNode"), ("jacobian", "vtkMRMLScalarVolumeNode"))}
    before = set(node_ids(scene))
    task = PairRegistrationTask(fixed, moving, moving_segmentation=segmentation, output_transform=outputs["transform"],
                                output_volume=outputs["volume"], output_segmentation=outputs["segmentation"],
                                output_jacobian=outputs["jacobian"], engine_run_factory=known_runs(lambda f, m: field))
    task.start()
    assert task.wait() == RunState.SUCCEEDED, task.error_message
    result = task.outputs
    assert result.transform is outputs["transform"] and result.volume is outputs["volume"]
    back, _ = grid_transforms.displacement_from_transform_node(outputs["transform"])
    assert np.array_equal(back, field)
    assert volumes.volume_from_node(outputs["volume"], validate=False).same_grid(fixed_volume, tol=1e-9)
    assert segmentations.segmentation_to_labels(outputs["segmentation"], fixed).array.any()
    assert outputs["jacobian"].GetDisplayNode().GetColorNode().GetName() == display.JACOBIAN_COLOR_NODE_NAME
    # no temporary node left behind (only the Jacobian colour table and display nodes are new)
    new_nodes = [scene.GetNodeByID(i) for i in set(node_ids(scene)) - before]
    assert all(n.IsA("vtkMRMLDisplayNode") or n.IsA("vtkMRMLColorTableNode") for n in new_nodes), \
        [n.GetClassName() for n in new_nodes]


def test_bad_inputs_raise_before_anything_runs_and_leave_the_scene_as_it_was(scene):
    fixed, moving, fixed_volume, field = engine_and_slicer_pair(scene)
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "output")
    empty_segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    before = node_ids(scene)
    runs = known_runs(lambda f, m: field)
    cases = [
        (dict(fixed_node=fixed, moving_node=fixed, output_volume=output), "same node"),
        (dict(fixed_node=fixed, moving_node=moving), "at least one output"),
        (dict(fixed_node=fixed, moving_node=moving, output_volume=fixed), "also an input"),
        (dict(fixed_node=fixed, moving_node=moving, moving_segmentation=empty_segmentation), "no segments"),
        (dict(fixed_node=fixed, moving_node=moving, output_volume=output, settings=EngineSettings(mode="network")),
         "needs a trained SAMIR network checkpoint"),
        (dict(fixed_node=fixed, moving_node=moving, output_volume=output, settings=EngineSettings(preset="slow")),
         "preset: unknown value .slow."),
    ]
    for arguments, message in cases:
        with pytest.raises(SAMIRInputError, match=message):
            PairRegistrationTask(engine_run_factory=runs, **arguments)
    assert node_ids(scene) == before
    assert output.GetImageData() is None


def test_failure_while_applying_outputs_removes_every_new_node(scene):
    fixed, moving, fixed_volume, field = engine_and_slicer_pair(scene)
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "output")
    before = node_ids(scene)
    bad_field = field.copy()
    bad_field[0, 0, 0, 0] = np.nan  # the engine "returned" a broken field
    task = PairRegistrationTask(fixed, moving, output_volume=output,
                                engine_run_factory=known_runs(lambda f, m: bad_field))
    task.start()
    assert task.wait() == RunState.FAILED
    assert "NaN" in task.error_message
    assert node_ids(scene) == before and output.GetImageData() is None


@pytest.mark.parametrize("chained", [False, True])
def test_sequence_propagation_bookkeeping_with_the_exact_field(scene, chained):
    scales = phantom_scales(6)
    sequence, masks = phantom_sequence(scene, scales, direction=rotation((0, 0, 30)))
    reference = 2
    frame_volume = volumes.volume_from_node(sequence.GetNthDataNode(reference))
    segmentation = segmentation_from_labels(scene, frame_volume.with_array(masks[reference].astype(np.uint8)),
                                            "ventricle", {1: "left ventricle"}, {1: (0.8, 0.2, 0.2)})
    seen_pairs = []

    def exact(fixed, moving):
        scale_f = [s for i, s in enumerate(scales) if sequence.GetNthDataNode(i).GetName() == fixed.name][0]
        scale_m = [s for i, s in enumerate(scales) if sequence.GetNthDataNode(i).GetName() == moving.name][0]
        seen_pairs.append((fixed.name, moving.name))
        return phantom_displacement(scale_f, scale_m, fixed)

    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    before = set(node_ids(scene))
    task = SequencePropagationTask(sequence, segmentation, reference, chained=chained, browser_node=browser,
                                   engine_run_factory=known_runs(exact))
    task.start()
    assert task.wait() == RunState.SUCCEEDED, task.error_message
    out = task.outputs.segmentation_sequence
    assert out.GetNumberOfDataNodes() == 6
    assert [out.GetNthIndexValue(i) for i in range(6)] == [sequence.GetNthIndexValue(i) for i in range(6)]
    assert browser.IsSynchronizedSequenceNode(out, True)
    expected_moving = [f"frame {s.moving_frame}" for s in propagation_plan(6, reference, chained)]
    assert [m for _, m in seen_pairs] == expected_moving
    # new nodes: the segmentation sequence and the browser's proxy segmentation showing the current frame
    leftovers = [scene.GetNodeByID(i) for i in set(node_ids(scene)) - before]
    proxy = browser.GetProxyNode(out)
    assert proxy is not None and proxy.IsA("vtkMRMLSegmentationNode")
    proxy_family = {proxy.GetID(), proxy.GetDisplayNodeID(), proxy.GetStorageNodeID(), out.GetID()}
    assert {n.GetID() for n in leftovers} <= proxy_family
    scores = []
    for index in range(6):
        propagated = out.GetNthDataNode(index)
        assert segmentations.segment_ids(propagated) == segmentations.segment_ids(segmentation)
        assert propagated.GetSegmentation().GetNthSegment(0).GetName() == "left ventricle"
        mask = frame_mask(scene, propagated, sequence.GetNthDataNode(index))
        scores.append((dice(mask, masks[index]), dice(masks[reference], masks[index])))
    print("Dice per frame (propagated, unregistered):", [f"{a:.3f} {b:.3f}" for a, b in scores])
    assert scores[reference][0] == 1.0
    for index, (propagated_dice, unregistered_dice) in enumerate(scores):
        # the exact field: only the voxelisation of the reference mask is left
        assert propagated_dice >= 0.93 and propagated_dice >= unregistered_dice, index


def frame_mask(scene, segmentation_in_sequence, frame_in_sequence) -> np.ndarray:
    """First segment of a segmentation stored in a sequence, as a mask on a frame stored in a sequence."""
    frame = volumes.add_volume_node(scene, volumes.volume_from_node(frame_in_sequence), "frame copy")
    shown = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation copy")
    shown.GetSegmentation().DeepCopy(segmentation_in_sequence.GetSegmentation())
    try:
        return segmentations.segment_mask(shown, segmentations.segment_ids(shown)[0], frame)
    finally:
        scene.RemoveNode(shown)
        scene.RemoveNode(frame)


def test_sequence_task_rejects_a_bad_reference_frame_without_touching_the_scene(scene):
    sequence, masks = phantom_sequence(scene, [1.0, 1.1])
    frame_volume = volumes.volume_from_node(sequence.GetNthDataNode(0))
    segmentation = segmentation_from_labels(scene, frame_volume.with_array(masks[0].astype(np.uint8)), "ventricle")
    before = node_ids(scene)
    for outside in (2, 5, -1):  # frames 0 and 1 only
        with pytest.raises(SAMIRInputError, match="outside the sequence"):
            SequencePropagationTask(sequence, segmentation, outside)
    with pytest.raises(SAMIRInputError, match="not a sequence node"):
        SequencePropagationTask(segmentation, segmentation, 0)
    assert node_ids(scene) == before
    assert SequencePropagationTask(sequence, segmentation, 1).plan  # the same inputs with a frame inside are taken
    assert node_ids(scene) == before


def test_sequence_propagation_can_give_one_segmentation_node_per_frame(scene):
    scales = [1.0, 1.08, 1.16]
    sequence, masks = phantom_sequence(scene, scales)
    frame_volume = volumes.volume_from_node(sequence.GetNthDataNode(0))
    segmentation = segmentation_from_labels(scene, frame_volume.with_array(masks[0].astype(np.uint8)), "ventricle")

    def exact(fixed, moving):
        scale_of = {f"frame {i}": s for i, s in enumerate(scales)}
        return phantom_displacement(scale_of[fixed.name], scale_of[moving.name], fixed)

    task = SequencePropagationTask(sequence, segmentation, 0, chained=True, as_sequence=False,
                                   engine_run_factory=known_runs(exact))
    task.start()
    assert task.wait() == RunState.SUCCEEDED, task.error_message
    nodes = task.outputs.segmentations
    assert [n.GetName() for n in nodes] == ["ventricle frame 40", "ventricle frame 80"]
    assert all(n.GetScene() is scene and not n.GetHideFromEditors() and n.GetDisplayNode().GetVisibility()
               for n in nodes)
    assert task.outputs.segmentation_sequence is None
    assert set(task.outputs.sdlogj) == {1, 2}
