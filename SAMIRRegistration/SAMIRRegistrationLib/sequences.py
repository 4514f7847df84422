"""Carry a segmentation drawn on one frame of a 4D series (cine MRI, 4D CT) to every other frame.

The series is a ``vtkMRMLSequenceNode`` of scalar volumes. Each frame ``i`` other than the
reference frame ``r`` is registered as the fixed image, with as moving image either the reference
frame (``chained=False``: every frame registered to ``r`` directly) or the neighbouring frame one
step closer to ``r`` (``chained=True``: small frame-to-frame motion, each propagated segmentation
carried on to the next frame). Frames are visited from ``r`` outwards in both directions. The
result is a sequence of segmentations with the volume sequence's index values (added to a sequence
browser when given), or one segmentation node per frame.

Like :class:`~SAMIRRegistrationLib.registration.PairRegistrationTask`, the task checks its inputs
first, runs one engine run at a time behind ``start``/``poll``/``wait``/``cancel``, keeps its
intermediate nodes hidden, and touches the chosen outputs only when every frame succeeded.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from samir.geometry import SAMIRInputError

from .engine_runner import EngineProgress, EngineRun, EngineSettings, LogCallback, RunState, wait_until_finished
from .grid_transforms import add_grid_transform_node
from .registration import EngineRunFactory, ProgressCallback, ReportingTask, SceneUndoList, subprocess_engine_runs
from .segmentations import check_segmentation, check_segmentation_on_volume, propagate_segmentation
from .volumes import node_label, remove_node, volume_from_node


@dataclass
class FrameStep:
    """Register ``fixed_frame`` (fixed) to ``moving_frame``; carry the segmentation of ``moving_frame``."""

    fixed_frame: int
    moving_frame: int


def propagation_plan(frame_count: int, reference_frame: int, chained: bool) -> List[FrameStep]:
    """Frames from the reference outwards (after it, then before it), each with its moving frame."""
    if frame_count < 2:
        raise SAMIRInputError(f"the sequence has {frame_count} frame(s); propagation needs at least 2")
    if not 0 <= reference_frame < frame_count:
        raise SAMIRInputError(f"reference frame {reference_frame} is outside the sequence (0 to {frame_count - 1})")
    steps = []
    for direction in (+1, -1):
        frame = reference_frame + direction
        while 0 <= frame < frame_count:
            steps.append(FrameStep(frame, frame - direction if chained else reference_frame))
            frame += direction
    return steps


@dataclass
class SequencePropagationOutputs:
    segmentation_sequence: object = None  # vtkMRMLSequenceNode of segmentations (as_sequence)
    segmentations: List[object] = field(default_factory=list)  # one node per frame (not as_sequence)
    sdlogj: Dict[int, float] = field(default_factory=dict)  # per registered frame
    folding_percent: Dict[int, float] = field(default_factory=dict)
    elapsed_s: float = 0.0


class SequencePropagationTask(ReportingTask):
    """Propagate ``segmentation`` (drawn on frame ``reference_frame``) through ``volume_sequence``."""

    def __init__(self, volume_sequence, segmentation, reference_frame: int, *, chained: bool = False,
                 output_sequence=None, as_sequence: bool = True, browser_node=None,
                 settings: Optional[EngineSettings] = None, engine_run_factory: Optional[EngineRunFactory] = None,
                 on_log: Optional[LogCallback] = None, on_progress: Optional[ProgressCallback] = None):
        self.volume_sequence, self.segmentation = volume_sequence, segmentation
        self.reference_frame, self.chained = int(reference_frame), bool(chained)
        self.output_sequence, self.as_sequence, self.browser_node = output_sequence, as_sequence, browser_node
        self.settings = settings or EngineSettings()
        self.engine_run_factory = engine_run_factory or subprocess_engine_runs()
        self.on_log, self.on_progress = on_log, on_progress
        self.state = RunState.NOT_STARTED
        self.error_message = ""
        self.outputs: Optional[SequencePropagationOutputs] = None
        self.scene = None
        self.frames = self._check_inputs()
        self.plan = propagation_plan(len(self.frames), self.reference_frame, self.chained)
        self._step = 0
        self._run: Optional[EngineRun] = None
        self._undo: Optional[SceneUndoList] = None
        self._frame_segmentations: Dict[int, object] = {}
        self._metrics = SequencePropagationOutputs()
        self._started_at = 0.0

    def _check_inputs(self) -> list:
        if self.volume_sequence is None or not self.volume_sequence.IsA("vtkMRMLSequenceNode"):
            raise SAMIRInputError(f"{node_label(self.volume_sequence)} is not a sequence node; select a 4D volume"
                                  " sequence")
        check_segmentation(self.segmentation, "reference frame")
        self.scene = self.segmentation.GetScene()
        if self.scene is None:
            raise SAMIRInputError(f"segmentation {node_label(self.segmentation)} is not in a scene")
        if self.output_sequence is not None:
            if not self.output_sequence.IsA("vtkMRMLSequenceNode"):
                raise SAMIRInputError(f"output {node_label(self.output_sequence)} is not a sequence node")
            if self.output_sequence.GetID() == self.volume_sequence.GetID():
                raise SAMIRInputError("the output sequence must not be the input volume sequence")
        self.settings.validate()
        count = self.volume_sequence.GetNumberOfDataNodes()
        frames = []
        for index in range(count):
            node = self.volume_sequence.GetNthDataNode(index)
            if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
                kind = "nothing" if node is None else node.GetClassName()
                raise SAMIRInputError(f"frame {index} of {node_label(self.volume_sequence)} holds {kind}, not a scalar"
                                      " volume")
            frames.append(node)
        propagation_plan(count, self.reference_frame, self.chained)  # frame count and reference checks
        volumes = [volume_from_node(node, f"frame {index}") for index, node in enumerate(frames)]  # all, before any run
        check_segmentation_on_volume(self.segmentation, volumes[self.reference_frame], "reference frame")
        return frames

    # -- running ------------------------------------------------------------------------------
    def start(self) -> None:
        if self.state != RunState.NOT_STARTED:
            raise RuntimeError("a propagation task can be started only once")
        self._started_at = time.perf_counter()
        self._undo = SceneUndoList(self.scene)
        self._frame_segmentations[self.reference_frame] = self.segmentation
        self.state = RunState.RUNNING
        self._log(f"Propagating '{self.segmentation.GetName()}' from frame {self.reference_frame} to"
                  f" {len(self.plan)} frame(s), {'frame to frame' if self.chained else 'each to the reference frame'}.")
        try:
            self._start_step()
        except Exception as exc:
            self._fail(str(exc))
            raise

    def _start_step(self) -> None:
        step = self.plan[self._step]
        fixed = volume_from_node(self.frames[step.fixed_frame], f"frame {step.fixed_frame}")
        moving = volume_from_node(self.frames[step.moving_frame], f"frame {step.moving_frame}")
        self._log(f"Frame {step.fixed_frame}: registering frame {step.moving_frame} onto it"
                  f" ({self._step + 1}/{len(self.plan)}).")
        self._run = self.engine_run_factory(fixed, moving, self.settings, on_log=self.on_log,
                                            on_progress=self._engine_progress)
        self._run.start()

    def poll(self) -> RunState:
        if self.state != RunState.RUNNING:
            return self.state
        try:
            run_state = self._run.poll()
            if run_state == RunState.SUCCEEDED:
                self._finish_step()
                self._step += 1
                if self._step < len(self.plan):
                    self._start_step()
                else:
                    self._commit()
            elif run_state in (RunState.FAILED, RunState.CANCELLED):
                self._fail(self._run.error_message or run_state.value, run_state)
        except Exception as exc:
            self._fail(str(exc))
        return self.state

    def wait(self, timeout_s: Optional[float] = None) -> RunState:
        return wait_until_finished(self, timeout_s, "propagation")

    def cancel(self) -> None:
        if self.state == RunState.RUNNING:
            if self._run is not None:
                self._run.cancel()
            self._fail("cancelled", RunState.CANCELLED)
            self._log("Propagation cancelled; the scene was not changed.")

    def raise_if_failed(self) -> None:
        if self.state in (RunState.FAILED, RunState.CANCELLED):
            raise SAMIRInputError(self.error_message or self.state.value)

    # -- steps --------------------------------------------------------------------------------
    def _finish_step(self) -> None:
        step = self.plan[self._step]
        engine = self._run.outputs
        fixed_node = self.frames[step.fixed_frame]
        transform = self._undo.add(add_grid_transform_node(self.scene, engine.displacement_lps, engine.grid,
                                                           "SAMIR frame transform"))
        transform.SetHideFromEditors(True)
        source = self._frame_segmentations[step.moving_frame]
        propagated = self._undo.add(propagate_segmentation(
            source, transform, fixed_node, name=f"{self.segmentation.GetName()} frame {self._index_value(step.fixed_frame)}"))
        propagated.SetHideFromEditors(True)
        display = propagated.GetDisplayNode()
        if display is not None:
            display.SetVisibility(False)
        remove_node(transform)
        self._frame_segmentations[step.fixed_frame] = propagated
        self._metrics.sdlogj[step.fixed_frame] = engine.sdlogj
        self._metrics.folding_percent[step.fixed_frame] = engine.folding_percent

    def _index_value(self, frame: int) -> str:
        return self.volume_sequence.GetNthIndexValue(frame)

    def _commit(self) -> None:
        outputs = self._metrics
        if self.as_sequence:
            sequence = self.output_sequence
            if sequence is None:
                sequence = self.scene.AddNewNodeByClass(
                    "vtkMRMLSequenceNode", self.scene.GenerateUniqueName(f"{self.segmentation.GetName()} sequence"))
            sequence.RemoveAllDataNodes()
            sequence.SetIndexName(self.volume_sequence.GetIndexName())
            sequence.SetIndexUnit(self.volume_sequence.GetIndexUnit())
            sequence.SetIndexType(self.volume_sequence.GetIndexType())
            for frame in range(len(self.frames)):
                sequence.SetDataNodeAtValue(self._frame_segmentations[frame], self._index_value(frame))
            if self.browser_node is not None and not self.browser_node.IsSynchronizedSequenceNode(sequence, True):
                self.browser_node.AddSynchronizedSequenceNode(sequence)
            outputs.segmentation_sequence = sequence
            self._undo.discard()  # the per-frame nodes now live in the sequence
        else:
            for frame in range(len(self.frames)):
                node = self._frame_segmentations[frame]
                if node is self.segmentation:
                    continue
                node.SetHideFromEditors(False)
                if node.GetDisplayNode() is not None:
                    node.GetDisplayNode().SetVisibility(True)
                outputs.segmentations.append(node)
            self._undo.created.clear()  # keep them
        outputs.elapsed_s = time.perf_counter() - self._started_at
        self.outputs = outputs
        self.state = RunState.SUCCEEDED
        self._report(1.0, "done")
        self._log(f"Propagation finished in {outputs.elapsed_s:.1f} s.")

    def _fail(self, message: str, state: RunState = RunState.FAILED) -> None:
        self.state = state
        self.error_message = message
        if self._undo is not None:
            self._undo.discard()
        if state == RunState.FAILED:
            self._log(f"Propagation failed: {message}")

    # -- reporting ----------------------------------------------------------------------------
    def _engine_progress(self, progress: EngineProgress) -> None:
        self._report((self._step + progress.overall_fraction) / len(self.plan),
                     f"frame {self.plan[self._step].fixed_frame}: {progress.stage}")

