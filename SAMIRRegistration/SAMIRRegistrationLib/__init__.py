"""MRML bridge between 3D Slicer scenes and the SAMIR engine (``samir``).

Imports ``slicer`` MRML classes and VTK only — no Qt, no application — so everything here runs and
is tested on the ``slicer-core`` wheel as well as inside Slicer:

* :mod:`.volumes` — scalar volume nodes <-> :class:`samir.geometry.Volume` (any IJK -> RAS).
* :mod:`.grid_transforms` — engine displacement field <-> ``vtkMRMLGridTransformNode``.
* :mod:`.segmentations` — propagate a segmentation through a transform onto the fixed grid.
* :mod:`.engine_runner` — run the engine command line in a separate process (progress, cancel).
* :mod:`.registration` — register two volume nodes and write the outputs into the scene.
* :mod:`.sequences` — propagate a segmentation through a 4D volume sequence.
* :mod:`.display` — Jacobian colour map and legend, checkerboard volume.
* :mod:`.weights`, :mod:`.dependencies` — encoder checkpoints and Python packages for Slicer.
"""
from samir.geometry import SAMIRInputError

from .engine_runner import (
                            EngineOutputs,
                            EngineProcess,
                            EngineProgress,
                            EngineRun,
                            EngineSettings,
                            InProcessEngineRun,
                            RunState,
                            SubprocessEngineRun,
)
from .grid_transforms import (
                            add_grid_transform_node,
                            displacement_from_transform_node,
                            displacement_to_grid_transform,
                            show_transform_grid,
                            update_grid_transform_node,
)
from .registration import PairRegistrationTask, RegistrationOutputs, subprocess_engine_runs
from .segmentations import propagate_segmentation, segmentation_to_labels
from .sequences import SequencePropagationOutputs, SequencePropagationTask, propagation_plan
from .volumes import add_volume_node, update_volume_node, volume_from_node

__all__ = [
    "SAMIRInputError", "EngineOutputs", "EngineProcess", "EngineProgress", "EngineRun", "EngineSettings",
    "InProcessEngineRun", "RunState", "SubprocessEngineRun", "add_grid_transform_node",
    "displacement_from_transform_node", "displacement_to_grid_transform", "show_transform_grid",
    "update_grid_transform_node", "PairRegistrationTask", "RegistrationOutputs", "subprocess_engine_runs",
    "propagate_segmentation", "segmentation_to_labels", "SequencePropagationOutputs", "SequencePropagationTask",
    "propagation_plan", "add_volume_node", "update_volume_node", "volume_from_node",
]
