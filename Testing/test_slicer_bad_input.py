"""The same bad inputs through the Slicer bridge, on real MRML (slicer-core): a volume loaded from a
damaged file, a segmentation that lies outside its volume, a damaged network checkpoint given to the
engine process. Each leaves the scene as it was (same nodes, output nodes untouched) and the error
carries the engine's own message.
"""
import re
import sys

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed")

from samir.geometry import SAMIRInputError, Volume
from samir.io import read_image
from SAMIRRegistrationLib import volumes
from SAMIRRegistrationLib.engine_runner import EngineSettings, RunState
from SAMIRRegistrationLib.registration import PairRegistrationTask, subprocess_engine_runs
from SAMIRRegistrationLib.sequences import SequencePropagationTask
from slicer_test_support import (
    PHANTOM_SPACING,
    new_scene,
    node_ids,
    phantom_frame,
    phantom_scales,
    phantom_sequence,
    segmentation_from_labels,
    volume_node,
)

QUICK = dict(preset="fast", device="cpu", levels=3, iterations=(20, 20, 10), threads=1, alignment="none")


@pytest.fixture
def scene():
    return new_scene()


def load_volume(scene, path, name):
    """A volume node read by Slicer's own reader, with its storage node, as File > Add Data leaves it."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def test_a_volume_loaded_from_a_cut_off_file_is_refused_with_the_engines_reason(scene, tmp_path):
    fixed_image, _ = phantom_frame(1.16)
    moving_image, _ = phantom_frame(1.0)
    paths = {}
    for name, array in (("fixed", fixed_image), ("moving", moving_image)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(PHANTOM_SPACING)
        sitk.WriteImage(image, str(paths[name]))
    data = paths["moving"].read_bytes()
    paths["moving"].write_bytes(data[:len(data) // 2])  # an interrupted copy
    fixed = load_volume(scene, paths["fixed"], "fixed")
    moving = load_volume(scene, paths["moving"], "moving")
    assert (volumes.voxel_array_view(moving) == 0).mean() > 0.3  # Slicer's reader zero-filled it without a word
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
    before = node_ids(scene)
    with pytest.raises(SAMIRInputError) as engine_error:
        read_image(paths["moving"], "moving")
    reason = str(engine_error.value).split(" is damaged: ", 1)[1]
    assert reason.startswith("its gzip stream ends early")
    with pytest.raises(SAMIRInputError) as error:
        PairRegistrationTask(fixed, moving, output_volume=output, settings=EngineSettings(**QUICK))
    assert str(error.value) == f"moving volume 'moving': its file '{paths['moving']}' is damaged: {reason}"
    assert node_ids(scene) == before and output.GetImageData() is None


def phantom_nodes(scene):
    fixed_image, _ = phantom_frame(1.16)
    moving_image, moving_mask = phantom_frame(1.0)
    fixed = volume_node(scene, fixed_image, "diastole", spacing=PHANTOM_SPACING)
    moving = volume_node(scene, moving_image, "systole", spacing=PHANTOM_SPACING)
    return fixed, moving, moving_mask


def test_a_segmentation_outside_its_volume_is_refused_before_anything_runs(scene):
    fixed, moving, mask = phantom_nodes(scene)
    grid = volumes.volume_from_node(moving)
    far = segmentation_from_labels(scene, Volume(mask.astype(np.uint8), grid.spacing, (900.0, 0.0, 0.0),
                                                 grid.direction), "other patient")
    half = mask.copy()
    half[:, :, :16] = False  # only the part of the ventricle that a shift by 24 mm pushes past the edge
    shifted = segmentation_from_labels(scene, Volume(half.astype(np.uint8), grid.spacing,
                                                     tuple(np.add(grid.origin, (24.0, 0.0, 0.0))), grid.direction),
                                       "shifted")
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "propagated")
    before = node_ids(scene)
    with pytest.raises(SAMIRInputError, match="^moving segmentation 'other patient' lies entirely outside moving"
                                              " volume 'systole'"):
        PairRegistrationTask(fixed, moving, moving_segmentation=far, output_segmentation=output,
                             settings=EngineSettings(**QUICK))
    with pytest.raises(SAMIRInputError, match=r"^\d+\.\d % of the labelled voxels of moving segmentation 'shifted' lie"
                                              r" outside moving volume 'systole'"):
        PairRegistrationTask(fixed, moving, moving_segmentation=shifted, settings=EngineSettings(**QUICK))
    assert node_ids(scene) == before and output.GetSegmentation().GetNumberOfSegments() == 0
    # the segmentation on its own volume passes the same check
    own = segmentation_from_labels(scene, grid.with_array(mask.astype(np.uint8)), "ventricle")
    PairRegistrationTask(fixed, moving, moving_segmentation=own, settings=EngineSettings(**QUICK))


def test_a_sequence_segmentation_outside_its_reference_frame_is_refused(scene):
    sequence, masks = phantom_sequence(scene, phantom_scales(3))
    frame = volumes.volume_from_node(sequence.GetNthDataNode(1))
    far = segmentation_from_labels(scene, Volume(masks[1].astype(np.uint8), frame.spacing, (0.0, 700.0, 0.0),
                                                 frame.direction), "elsewhere")
    before = node_ids(scene)
    with pytest.raises(SAMIRInputError, match="^reference frame segmentation 'elsewhere' lies entirely outside"):
        SequencePropagationTask(sequence, far, 1, settings=EngineSettings(**QUICK))
    assert node_ids(scene) == before


def test_a_cut_off_network_checkpoint_fails_in_the_engine_and_the_scene_is_unchanged(scene, tmp_path):
    fixed, moving, _ = phantom_nodes(scene)
    checkpoint = tmp_path / "samir_net.pt"
    import torch
    torch.save({"format": "samir-checkpoint", "state_dict": {"w": torch.zeros(5000)}}, checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:6000])
    output = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "transform")
    transform_before = output.GetTransformFromParent()
    modified_before = transform_before.GetMTime()
    before = node_ids(scene)
    log = []
    task = PairRegistrationTask(fixed, moving, output_transform=output,
                                settings=EngineSettings(**dict(QUICK, mode="network", network=str(checkpoint))),
                                engine_run_factory=subprocess_engine_runs(python_executable=sys.executable,
                                                                          work_folder=tmp_path),
                                on_log=log.append)
    task.start()
    assert task.wait(timeout_s=120) == RunState.FAILED
    assert re.match(rf"SAMIR network checkpoint '{re.escape(str(checkpoint))}' is cut off or damaged: its zip"
                    r" archive is incomplete", task.error_message), task.error_message + "\n".join(log)
    assert f"samir: error: {task.error_message}" in log  # the engine's line, shown as it printed it
    assert node_ids(scene) == before
    assert output.GetTransformFromParent() is transform_before and transform_before.GetMTime() == modified_before
    assert not list(tmp_path.glob("samir-*")), "the engine's work folder was not removed"
