"""Register two volume nodes and put the results into the scene (no Qt, no app).

:class:`PairRegistrationTask` checks every input before anything runs (bad input: a
:class:`SAMIRInputError` naming the problem, scene untouched), runs the engine through an
:class:`~SAMIRRegistrationLib.engine_runner.EngineRun` (a separate process by default), and only
when the engine succeeded writes the outputs: a grid transform (TransformFromParent, fixed/moving
references), the warped volume, the propagated segmentation and the Jacobian map. Outputs are
built on new temporary nodes first and copied into the chosen output nodes at the very end, so a
failure or a cancel leaves the scene exactly as it was.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from samir.geometry import SAMIRInputError, Volume

from .display import show_jacobian
from .engine_runner import (
    EngineOutputs,
    EngineProgress,
    EngineRun,
    EngineSettings,
    LogCallback,
    RunState,
    SubprocessEngineRun,
    wait_until_finished,
)
from .grid_transforms import add_grid_transform_node, update_grid_transform_node
from .segmentations import (check_segmentation, check_segmentation_on_volume, copy_segmentation_into,
                            propagate_segmentation)
from .volumes import check_source_file, node_label, remove_node, same_node, update_volume_node, volume_from_node

EngineRunFactory = Callable[..., EngineRun]
ProgressCallback = Callable[[float, str], None]  # (overall fraction 0..1, stage text)


def subprocess_engine_runs(**runner_options) -> EngineRunFactory:
    """Factory of :class:`SubprocessEngineRun` with fixed runner options (python, environment, work folder)."""
    def make(fixed: Volume, moving: Volume, settings: EngineSettings, on_log=None, on_progress=None) -> EngineRun:
        return SubprocessEngineRun(fixed, moving, settings, on_log, on_progress, **runner_options)
    return make


@dataclass
class RegistrationOutputs:
    """The nodes a run filled, and its quality numbers."""

    transform: object = None
    volume: object = None
    segmentation: object = None
    jacobian: object = None
    sdlogj: float = float("nan")
    folding_percent: float = float("nan")
    elapsed_s: float = 0.0
    summary: Dict[str, object] = field(default_factory=dict)


def check_output_node(node, role: str, class_name: str, inputs: List[object]) -> None:
    if node is None:
        return
    if not node.IsA(class_name):
        raise SAMIRInputError(f"output {role} {node_label(node)} is a {node.GetClassName()}, expected a {class_name}")
    for input_node in inputs:
        if same_node(node, input_node):
            raise SAMIRInputError(f"output {role} {node_label(node)} is also an input; choose or create another"
                                  f" output {role}")


class SceneUndoList:
    """Nodes created during an apply step; removed again if the step fails."""

    def __init__(self, scene):
        self.scene = scene
        self.created: List[object] = []

    def add(self, node):
        self.created.append(node)
        return node

    def discard(self) -> None:
        for node in reversed(self.created):
            if node.GetScene() is not None:
                remove_node(node)
        self.created.clear()


class ReportingTask:
    """Progress and log callbacks of a long task (``on_progress(fraction, stage)``, ``on_log(text)``)."""
    on_progress: Optional[ProgressCallback] = None
    on_log: Optional[LogCallback] = None

    def _report(self, fraction: float, stage: str) -> None:
        if self.on_progress:
            self.on_progress(fraction, stage)

    def _log(self, text: str) -> None:
        if self.on_log:
            self.on_log(text)


class PairRegistrationTask(ReportingTask):
    """Deformably register ``moving_node`` onto ``fixed_node``; ``start``/``poll``/``wait``/``cancel``.

    Outputs (``None``: not produced): ``output_transform`` (a transform node; the moving volume
    resampled through it lands on the fixed volume), ``output_volume`` (moving resampled onto the
    fixed grid), ``output_segmentation`` (``moving_segmentation`` propagated onto the fixed grid; a new
    node is created when a moving segmentation is given without one), ``output_jacobian``
    (determinant of the transform's Jacobian on the fixed grid). At least one output is needed.
    """

    def __init__(self, fixed_node, moving_node, *, moving_segmentation=None, output_transform=None,
                 output_volume=None, output_segmentation=None, output_jacobian=None,
                 settings: Optional[EngineSettings] = None, engine_run_factory: Optional[EngineRunFactory] = None,
                 on_log: Optional[LogCallback] = None, on_progress: Optional[ProgressCallback] = None,
                 color_logic=None):
        self.settings = settings or EngineSettings()
        self.fixed_node, self.moving_node = fixed_node, moving_node
        self.moving_segmentation = moving_segmentation
        self.output_transform, self.output_volume = output_transform, output_volume
        self.output_segmentation, self.output_jacobian = output_segmentation, output_jacobian
        self.engine_run_factory = engine_run_factory or subprocess_engine_runs()
        self.on_log, self.on_progress = on_log, on_progress
        self.color_logic = color_logic
        self.state = RunState.NOT_STARTED
        self.error_message = ""
        self.outputs: Optional[RegistrationOutputs] = None
        self.run: Optional[EngineRun] = None
        self._started_at = 0.0
        self.fixed, self.moving = self._check_inputs()

    # -- checks -------------------------------------------------------------------------------
    def _check_inputs(self):
        if self.fixed_node is None or self.moving_node is None:
            raise SAMIRInputError("select both a fixed and a moving volume")
        if same_node(self.fixed_node, self.moving_node):
            raise SAMIRInputError("fixed and moving volume are the same node; select two different volumes")
        if self.fixed_node.GetScene() is None:
            raise SAMIRInputError(f"fixed volume {node_label(self.fixed_node)} is not in a scene")
        inputs = [self.fixed_node, self.moving_node, self.moving_segmentation]
        check_output_node(self.output_transform, "transform", "vtkMRMLTransformNode", inputs)
        check_output_node(self.output_volume, "volume", "vtkMRMLScalarVolumeNode", inputs)
        check_output_node(self.output_segmentation, "segmentation", "vtkMRMLSegmentationNode", inputs)
        check_output_node(self.output_jacobian, "Jacobian map", "vtkMRMLScalarVolumeNode", inputs)
        outputs = [self.output_transform, self.output_volume, self.output_segmentation, self.output_jacobian]
        if sum(o is not None for o in outputs) > len({o.GetID() for o in outputs if o is not None}):
            raise SAMIRInputError("the same node is selected for two outputs; choose a different node for each")
        if self.output_segmentation is not None and self.moving_segmentation is None:
            raise SAMIRInputError("an output segmentation was selected but no moving segmentation to propagate")
        if self.moving_segmentation is not None:
            check_segmentation(self.moving_segmentation, "moving")
        if all(o is None for o in outputs) and self.moving_segmentation is None:
            raise SAMIRInputError("select at least one output (transform, warped volume, segmentation or Jacobian map)")
        self.settings.validate()
        check_source_file(self.fixed_node, "fixed")
        check_source_file(self.moving_node, "moving")
        fixed = volume_from_node(self.fixed_node, "fixed")
        moving = volume_from_node(self.moving_node, "moving", ignored_transform=self.output_transform)
        if self.moving_segmentation is not None:
            check_segmentation_on_volume(self.moving_segmentation, moving, "moving", self.output_transform)
        return fixed, moving

    # -- running ------------------------------------------------------------------------------
    def start(self) -> None:
        if self.state != RunState.NOT_STARTED:
            raise RuntimeError("a registration task can be started only once")
        self._started_at = time.perf_counter()
        self._log(f"Registering '{self.moving.name}' to '{self.fixed.name}' (preset {self.settings.preset},"
                  f" device {self.settings.device}).")
        self.run = self.engine_run_factory(self.fixed, self.moving, self.settings, on_log=self._log,
                                           on_progress=self._engine_progress)
        self.state = RunState.RUNNING
        try:
            self.run.start()
        except Exception as exc:
            self.state = RunState.FAILED
            self.error_message = str(exc)
            raise
        self.poll()

    def poll(self) -> RunState:
        if self.state != RunState.RUNNING:
            return self.state
        run_state = self.run.poll()
        if run_state == RunState.SUCCEEDED:
            self._report(0.98, "apply outputs")
            try:
                self.outputs = self._apply(self.run.outputs)
                self.state = RunState.SUCCEEDED
                self._report(1.0, "done")
                self._log(f"Registration finished in {self.outputs.elapsed_s:.1f} s: SDlogJ"
                          f" {self.outputs.sdlogj:.4f}, folding {self.outputs.folding_percent:.4f} %.")
            except Exception as exc:
                self.state = RunState.FAILED
                self.error_message = f"could not put the results into the scene: {exc}"
                self._log(self.error_message)
        elif run_state in (RunState.FAILED, RunState.CANCELLED):
            self.state = run_state
            self.error_message = self.run.error_message or ("cancelled" if run_state == RunState.CANCELLED else "failed")
            if run_state == RunState.FAILED:
                self._log(f"Registration failed: {self.error_message}")
        return self.state

    def wait(self, timeout_s: Optional[float] = None) -> RunState:
        return wait_until_finished(self, timeout_s, "registration")

    def cancel(self) -> None:
        if self.state == RunState.RUNNING:
            self.run.cancel()
            self.state = RunState.CANCELLED
            self.error_message = "cancelled"
            self._log("Registration cancelled; the scene was not changed.")

    def raise_if_failed(self) -> None:
        if self.state == RunState.FAILED:
            raise SAMIRInputError(self.error_message)
        if self.state == RunState.CANCELLED:
            raise SAMIRInputError("the registration was cancelled")

    # -- outputs ------------------------------------------------------------------------------
    def _apply(self, engine: EngineOutputs) -> RegistrationOutputs:
        scene = self.fixed_node.GetScene()
        undo = SceneUndoList(scene)
        base_name = f"{self.moving_node.GetName()} to {self.fixed_node.GetName()}"
        try:
            # 1. everything on new nodes
            transform = undo.add(add_grid_transform_node(scene, engine.displacement_lps, engine.grid,
                                                         f"{base_name} (SAMIR)", self.fixed_node, self.moving_node))
            segmentation = None
            if self.moving_segmentation is not None:
                segmentation = propagate_segmentation(self.moving_segmentation, transform, self.fixed_node,
                                                      name=f"{self.moving_segmentation.GetName()} on"
                                                           f" {self.fixed_node.GetName()}")
                undo.add(segmentation)
            warped = None
            if self.output_volume is not None and engine.warped is None:
                raise SAMIRInputError("the engine produced no warped volume")
            # 2. into the chosen output nodes (simple assignments only from here on)
            if self.output_transform is not None:
                update_grid_transform_node(self.output_transform, engine.displacement_lps, engine.grid,
                                           self.fixed_node, self.moving_node)
                remove_node(transform)
                transform = self.output_transform
            else:
                remove_node(transform)  # only needed for the propagation
                transform = None
            if segmentation is not None and self.output_segmentation is not None:
                copy_segmentation_into(segmentation, self.output_segmentation, self.fixed_node,
                                       self.moving_segmentation)
                remove_node(segmentation)
                segmentation = self.output_segmentation
            if self.output_volume is not None:
                update_volume_node(self.output_volume, engine.warped)
                self.output_volume.CreateDefaultDisplayNodes()
                warped = self.output_volume
            jacobian = None
            if self.output_jacobian is not None and engine.jacobian is not None:
                update_volume_node(self.output_jacobian, engine.jacobian)
                show_jacobian(self.output_jacobian, self.color_logic)
                jacobian = self.output_jacobian
        except Exception:
            undo.discard()
            raise
        return RegistrationOutputs(transform, warped, segmentation, jacobian, engine.sdlogj, engine.folding_percent,
                                   time.perf_counter() - self._started_at, dict(engine.summary))

    # -- reporting ----------------------------------------------------------------------------
    def _engine_progress(self, progress: EngineProgress) -> None:
        self._report(0.97 * progress.overall_fraction, progress.stage)


