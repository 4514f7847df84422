"""Shared helpers of the test_slicer_* files: a real MRML scene (slicer-core), phantoms, Dice.

Import only after ``pytest.importorskip("slicer")``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import slicer
import vtk
from samir.geometry import Volume
from SAMIRRegistrationLib.volumes import add_volume_node, update_volume_node

_LOGICS: list = []  # keep module logics alive as long as their scene


def new_scene():
    """A fresh ``vtkMRMLScene`` set as ``slicer.mrmlScene``, with the segmentations logic registered."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    sequences = slicer.vtkSlicerSequencesLogic()  # registers the sequence browser node class
    sequences.SetMRMLScene(scene)
    _LOGICS[:] = [segmentations, sequences]
    return scene


def node_ids(scene) -> List[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation about x, then y, then z (degrees)."""
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def smooth_blobs(shape, seed: int = 0, blobs: int = 10) -> np.ndarray:
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    out = np.zeros(shape, np.float32)
    for _ in range(blobs):
        c = [rng.uniform(0.2 * n, 0.8 * n) for n in shape]
        r = rng.uniform(2.0, max(3.0, min(shape) / 3))
        out += np.exp(-((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) / (2 * r * r))
    return out / out.max()


def ellipsoid_labels(shape, centres_radii: Sequence[Tuple[Sequence[float], Sequence[float]]]) -> np.ndarray:
    """Label map with label ``n + 1`` inside the ``n``-th ellipsoid (centre, radii in voxels, z/y/x)."""
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    labels = np.zeros(shape, np.uint8)
    for index, (centre, radii) in enumerate(centres_radii):
        inside = sum(((axis - c) / r) ** 2 for axis, c, r in zip((zz, yy, xx), centre, radii)) <= 1.0
        labels[inside] = index + 1
    return labels


def segmentation_from_labels(scene, labels: Volume, name: str = "segmentation",
                             segment_names: Optional[Dict[int, str]] = None,
                             colors: Optional[Dict[int, Tuple[float, float, float]]] = None,
                             terminology: Optional[Dict[int, str]] = None):
    """Segmentation node (one segment per label, in label order) built the way a Slicer user imports one."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels to import")
    update_volume_node(labelmap, labels)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    logic = _LOGICS[0]
    assert logic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    scene.RemoveNode(labelmap)
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentation().GetSegmentIDs(ids)
    values = sorted(int(v) for v in np.unique(labels.array) if v)
    for index, value in enumerate(values):
        segment = segmentation.GetSegmentation().GetSegment(ids.GetValue(index))
        if segment_names and value in segment_names:
            segment.SetName(segment_names[value])
        if colors and value in colors:
            segment.SetColor(*colors[value])
        if terminology and value in terminology:
            segment.SetTag(segment.GetTerminologyEntryTagName(), terminology[value])
    segmentation.CreateDefaultDisplayNodes()
    return segmentation


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def volume_node(scene, array: np.ndarray, name: str, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                direction=None):
    return add_volume_node(scene, Volume(np.asarray(array), spacing, origin,
                                         np.eye(3) if direction is None else direction, name), name)


# -------------------------------------------------------------------------------------------------
# the 4D phantom: a "beating" ellipsoid (a ventricle) inside a static body

PHANTOM_SHAPE = (20, 32, 32)  # z, y, x
PHANTOM_SPACING = (2.0, 2.0, 3.0)  # x, y, z mm
PHANTOM_CENTRE = (10.0, 16.0, 16.0)
PHANTOM_RADII = (4.5, 8.0, 7.0)  # voxels, z/y/x, at scale 1


def phantom_frame(scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """(image, ventricle mask) of the phantom with the ventricle's radii multiplied by ``scale``."""
    zz, yy, xx = np.indices(PHANTOM_SHAPE, dtype=np.float32)
    c, r = PHANTOM_CENTRE, PHANTOM_RADII
    ventricle = np.sqrt(((zz - c[0]) / (r[0] * scale)) ** 2 + ((yy - c[1]) / (r[1] * scale)) ** 2
                        + ((xx - c[2]) / (r[2] * scale)) ** 2)
    body = np.sqrt(((zz - c[0]) / 8.0) ** 2 + ((yy - c[1]) / 14.0) ** 2 + ((xx - c[2]) / 14.0) ** 2)
    image = 0.4 / (1 + np.exp((body - 1) * 12)) + 0.6 / (1 + np.exp((ventricle - 1) * 10))
    return (100.0 * image).astype(np.float32), ventricle <= 1.0


def phantom_scales(frames: int, amplitude: float = 0.16) -> List[float]:
    """End-diastole (1 + amplitude) -> end-systole (1) -> back, over ``frames`` frames."""
    phase = np.linspace(0.0, 2.0 * np.pi, frames, endpoint=False)
    return [float(1.0 + amplitude * 0.5 * (1 + np.cos(p))) for p in phase]


def phantom_sequence(scene, scales: Sequence[float], origin=(-30.0, 20.0, -15.0), direction=None):
    """Volume sequence node of the phantom (index "time", ms) and the true masks per frame."""
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "cine")
    sequence.SetIndexName("time")
    sequence.SetIndexUnit("ms")
    masks = []
    for index, scale in enumerate(scales):
        image, mask = phantom_frame(scale)
        frame = slicer.vtkMRMLScalarVolumeNode()
        frame.SetName(f"frame {index}")
        update_volume_node(frame, Volume(image, PHANTOM_SPACING, origin, np.eye(3) if direction is None else direction))
        sequence.SetDataNodeAtValue(frame, str(40 * index))
        masks.append(mask)
    return sequence, masks


def phantom_displacement(scale_fixed: float, scale_moving: float, grid: Volume) -> np.ndarray:
    """The exact field (LPS mm on ``grid``) taking frame ``scale_fixed`` to frame ``scale_moving``."""
    from samir.geometry import index_to_world, world_points_of_grid
    points = world_points_of_grid(grid)
    centre_index = np.array(PHANTOM_CENTRE[::-1] + (1.0,))
    centre = (index_to_world(grid) @ centre_index)[:3]
    return ((points - centre) * (scale_moving / scale_fixed - 1.0)).astype(np.float32)
