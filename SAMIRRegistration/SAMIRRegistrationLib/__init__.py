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
import importlib

# Each name is imported from its submodule on first use (PEP 562): importing one submodule (the
# weights or the package checks, on the module's first use) must not pull in numpy, SimpleITK and
# every other submodule.
_EXPORTS = {
    "SAMIRInputError": "samir.geometry",
    **dict.fromkeys(("EngineOutputs", "EngineProcess", "EngineProgress", "EngineRun", "EngineSettings",
                     "InProcessEngineRun", "RunState", "SubprocessEngineRun"), ".engine_runner"),
    **dict.fromkeys(("add_grid_transform_node", "displacement_from_transform_node", "displacement_to_grid_transform",
                     "show_transform_grid", "update_grid_transform_node"), ".grid_transforms"),
    **dict.fromkeys(("PairRegistrationTask", "RegistrationOutputs", "subprocess_engine_runs"), ".registration"),
    **dict.fromkeys(("propagate_segmentation", "segmentation_to_labels"), ".segmentations"),
    **dict.fromkeys(("SequencePropagationOutputs", "SequencePropagationTask", "propagation_plan"), ".sequences"),
    **dict.fromkeys(("add_volume_node", "update_volume_node", "volume_from_node"), ".volumes"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name], __name__)
    return getattr(module, name)
