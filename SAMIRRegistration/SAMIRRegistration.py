"""3D Slicer module: deformable registration with SAMIR (frozen Segment-Anything encoders).

Panel (Resources/UI/SAMIRRegistration.ui, bound to the parameter node with SlicerParameterName)
-> module logic (this file: dependencies, weights, Slicer views) -> MRML bridge
(SAMIRRegistrationLib: nodes <-> engine, engine process, outputs into the scene) -> engine (samir),
which runs in a separate PythonSlicer process so that the application stays responsive while it
registers. (torch enters the application's own process only through the PyTorch extension, which
imports it to check and install it.)

Needs 3D Slicer 5.10 or later (Python 3.12). At Slicer start-up this file imports only the engine's
option names (pure Python); numpy, SimpleITK, the bridge and the engine are imported when the module
is first used, so a broken package cannot hide the module and start-up stays fast.
"""
import importlib
import logging
import os
import pathlib
import sys
from typing import Annotated, Callable, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLGridTransformNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLSequenceNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4 has no translation support
    def _(text: str) -> str:
        return text

MODULE_FOLDER = pathlib.Path(__file__).resolve().parent


def useBundledEngine(folder: pathlib.Path = MODULE_FOLDER) -> None:
    """Make ``import samir`` find the engine shipped beside this file, not a package of the same name
    installed in Slicer's Python (``samir`` is a common name; site-packages comes first on the path)."""
    loaded = sys.modules.get("samir")
    if loaded is not None:
        origin = pathlib.Path(getattr(loaded, "__file__", "") or ".").resolve().parent.parent
        if origin != folder:
            raise ImportError(f"another Python package named 'samir' ({loaded.__file__}) is already loaded in"
                              f" Slicer's Python; SAMIR's engine is in {folder / 'samir'}. Uninstall the other"
                              " package (slicer.util.pip_uninstall('samir')) and restart Slicer.")
    if not sys.path or pathlib.Path(sys.path[0]).resolve() != folder:
        sys.path.insert(0, str(folder))


useBundledEngine()
from samir.options import DEVICES, ENCODERS, OPTION, choices_of, default  # noqa: E402 - after the path fix

INPUT_PAIR = "volume pair"
INPUT_SEQUENCE = "4D sequence"
PROPAGATE_TO_REFERENCE = "to reference frame"
PROPAGATE_CHAINED = "frame to frame"
COMPARE_FADE = "fade"
COMPARE_CHECKERBOARD = "checkerboard"
SETTINGS_GROUP = "SAMIRRegistration"
POLL_INTERVAL_MS = 200

CITATION = ("SAMIR, an efficient registration framework via robust feature learning from SAM. "
            "Segment Anything: Kirillov et al., ICCV 2023. MedSAM / LiteMedSAM: Ma et al., Nature Communications 2024.")


#
# SAMIRRegistration
#


class SAMIRRegistration(ScriptedLoadableModule):
    """Module description (Uses ScriptedLoadableModule base class)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SAMIR Registration")
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["SAMIR developers"]
        self.parent.helpText = _("""
Deformable (diffeomorphic) registration of two 3D volumes, or of every frame of a 4D sequence, with
SAMIR: a coarse-to-fine pyramid of velocity fields, optimised zero-shot for the pair at hand (or predicted
by a trained SAMIR network), optionally guided by the features of a frozen Segment-Anything image
encoder (LiteMedSAM bundled; SAM ViT-B/L/H and MedSAM downloaded on demand).
<br><br>
Needs 3D Slicer 5.10 or later (Python 3.12); Slicer 5.8 and earlier bundle Python 3.9, which the
engine's packages do not support.
<br><br>
Outputs: a displacement-field transform (the moving volume placed under it lands on the fixed volume;
it can be saved as an ITK .h5 file), the warped moving volume, the moving segmentation propagated onto
the fixed volume (or onto every frame of the sequence), and a Jacobian-determinant map. SDlogJ and the
share of folding voxels are reported after each run.
<br><br>
The engine runs in a separate process: the first run may offer to install PyTorch (PyTorch extension)
and a few Python packages. See the <a href="https://github.com/samir-registration/SlicerSAMIR#3d-slicer-extension">
documentation</a>.
<br><br>
If you use SAMIR, please cite: {citation}
""").format(citation=CITATION)
        self.parent.acknowledgementText = _("""
SAMIR uses the frozen image encoders of Segment Anything (Meta AI, Apache-2.0) and MedSAM / LiteMedSAM
(bowang-lab, Apache-2.0). The module follows the 3D Slicer scripted-module template and the conventions of
the SlicerElastix and MONAIAuto3DSeg extensions.
""")


#
# Parameter node
#


@parameterNodeWrapper
class SAMIRRegistrationParameterNode:
    """Everything the panel shows, saved with the scene. Local checkpoint paths are machine settings instead."""

    inputKind: Annotated[str, Choice([INPUT_PAIR, INPUT_SEQUENCE])] = INPUT_PAIR
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    movingSequence: vtkMRMLSequenceNode
    referenceFrame: int = 0  # no range here: connectGui would impose it; the range follows the sequence
    propagation: Annotated[str, Choice([PROPAGATE_TO_REFERENCE, PROPAGATE_CHAINED])] = PROPAGATE_TO_REFERENCE
    movingSegmentation: vtkMRMLSegmentationNode
    outputTransform: vtkMRMLGridTransformNode
    outputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    outputSegmentationSequence: vtkMRMLSequenceNode
    outputJacobian: vtkMRMLScalarVolumeNode
    # choices and defaults are the engine's option schema's (samir/options.py)
    mode: Annotated[str, Choice(list(choices_of("mode")))] = default("mode")
    refineIterations: Annotated[int, WithinRange(0, 1000)] = default("refine_iterations")
    encoder: Annotated[str, Choice(list(ENCODERS))] = ENCODERS[0]
    preset: Annotated[str, Choice(list(choices_of("preset")))] = default("preset")
    alignment: Annotated[str, Choice(list(choices_of("alignment")))] = default("alignment")
    device: Annotated[str, Choice(list(DEVICES))] = default("device")
    useFeatures: bool = False
    levels: Annotated[int, WithinRange(0, int(OPTION["levels"].maximum))] = 0  # 0: the preset's
    iterations: str = ""
    overrideSmoothness: bool = False
    smoothness: Annotated[float, WithinRange(0.0, 100.0)] = 0.3
    encoderInputSize: Annotated[int, WithinRange(0, 1024)] = 0  # 0: the encoder's
    useFeatureCache: bool = True
    keepTemporaryFiles: bool = False


#
# SAMIRRegistrationWidget
#


class SAMIRRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel (Uses ScriptedLoadableModuleWidget base class)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[SAMIRRegistrationLogic] = None
        self._parameterNode: Optional[SAMIRRegistrationParameterNode] = None
        self._parameterNodeGuiTag = None
        self._lastResult = None  # (fixed node, outputs) of the last successful pair run

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAMIRRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SAMIRRegistrationLogic()

        self.ui.progressBar.hide()
        self.ui.comparisonComboBox.addItems([COMPARE_FADE, COMPARE_CHECKERBOARD])
        self.ui.networkWeightsPathLineEdit.currentPath = self.logic.savedPath("NetworkWeightsPath")
        self.ui.encoderWeightsPathLineEdit.currentPath = self.logic.savedPath("EncoderWeightsPath")
        self.ui.networkWeightsPathLineEdit.settingKey = f"{SETTINGS_GROUP}/NetworkWeightsHistory"
        self.ui.encoderWeightsPathLineEdit.settingKey = f"{SETTINGS_GROUP}/EncoderWeightsHistory"

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeightsButton)
        self.ui.networkWeightsPathLineEdit.connect("currentPathChanged(QString)",
                                                   lambda path: self.logic.savePath("NetworkWeightsPath", path))
        self.ui.encoderWeightsPathLineEdit.connect("currentPathChanged(QString)",
                                                   lambda path: self.logic.savePath("EncoderWeightsPath", path))
        self.ui.movingSequenceSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMovingSequenceChanged)
        self.ui.comparisonComboBox.connect("currentIndexChanged(int)", self.onComparisonChanged)
        self.ui.fadeSliderWidget.connect("valueChanged(double)", self.onFadeChanged)
        self.ui.showGridCheckBox.connect("toggled(bool)", self.onShowGridToggled)
        self.ui.showJacobianCheckBox.connect("toggled(bool)", self.onShowJacobianToggled)
        self._setResultControlsEnabled(False)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic is not None and self.logic.isRunning:
            self.logic.cancel()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic.isRunning:
            self.logic.cancel()
        if self._lastResult:
            self.logic.endTransformPreview(self._lastResult[1])
        self._lastResult = None
        self._setResultControlsEnabled(False)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            volumes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
            if len(volumes) >= 2:
                self._parameterNode.fixedVolume = volumes[0]
                self._parameterNode.movingVolume = volumes[1]

    def setParameterNode(self, inputParameterNode: Optional[SAMIRRegistrationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
            self.onMovingSequenceChanged(self._parameterNode.movingSequence)
            self._updateGUI()

    # -- panel state ------------------------------------------------------------------------------
    def _setRowVisible(self, widget, visible: bool) -> None:
        widget.setVisible(visible)
        label = getattr(self.ui, widget.objectName + "Label", None)
        if label is not None:
            label.setVisible(visible)

    def _updateGUI(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        if parameters is None:
            return
        sequenceInput = parameters.inputKind == INPUT_SEQUENCE
        for widget in (self.ui.fixedVolumeSelector, self.ui.movingVolumeSelector, self.ui.outputTransformSelector,
                       self.ui.outputVolumeSelector, self.ui.outputSegmentationSelector,
                       self.ui.outputJacobianSelector):
            self._setRowVisible(widget, not sequenceInput)
        for widget in (self.ui.movingSequenceSelector, self.ui.referenceFrameSpinBox, self.ui.propagationComboBox,
                       self.ui.outputSegmentationSequenceSelector):
            self._setRowVisible(widget, sequenceInput)
        networkMode = parameters.mode == "network"
        self._setRowVisible(self.ui.networkWeightsPathLineEdit, networkMode)
        self._setRowVisible(self.ui.refineIterationsSpinBox, networkMode)
        self._setRowVisible(self.ui.useFeaturesCheckBox, not networkMode)
        self._setRowVisible(self.ui.encoderComboBox, not networkMode)
        encoderUsed = networkMode or parameters.useFeatures
        self.ui.downloadWeightsButton.enabled = encoderUsed and parameters.encoder != "litemedsam" and not networkMode
        self.ui.smoothnessSpinBox.enabled = parameters.overrideSmoothness
        self._updateApplyButton()

    def _updateApplyButton(self) -> None:
        if self.logic.isRunning:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the registration; the scene is left as it was")
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = _("Apply")
        reason = self._reasonNotReady()
        self.ui.applyButton.enabled = reason is None
        self.ui.applyButton.toolTip = reason or _("Run the registration")

    def _reasonNotReady(self) -> Optional[str]:
        parameters = self._parameterNode
        if parameters is None:
            return _("No parameter node")
        if parameters.inputKind == INPUT_SEQUENCE:
            if not parameters.movingSequence:
                return _("Select a volume sequence")
            if not parameters.movingSegmentation:
                return _("Select the segmentation drawn on the reference frame")
            return None
        if not parameters.fixedVolume or not parameters.movingVolume:
            return _("Select a fixed and a moving volume")
        if parameters.fixedVolume == parameters.movingVolume:
            return _("Fixed and moving volume must be different volumes")
        if not (parameters.outputTransform or parameters.outputVolume or parameters.outputJacobian
                or parameters.movingSegmentation):
            return _("Select at least one output (transform, warped volume, Jacobian map) or a segmentation")
        return None

    def onMovingSequenceChanged(self, node) -> None:
        frames = node.GetNumberOfDataNodes() if node is not None else 1
        self.ui.referenceFrameSpinBox.maximum = max(0, frames - 1)

    # -- running ----------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self.logic.isRunning:
            self.ui.applyButton.enabled = False
            self.ui.applyButton.text = _("Cancelling...")
            slicer.app.processEvents()
            self.logic.cancel()  # kills the engine process tree; onCompleted restores the button
            return
        started = False
        try:
            # no wait cursor over this block: it asks questions and shows download and pip dialogs
            with slicer.util.tryWithErrorDisplay(_("Failed to start the registration.")):
                started = self.startRun()
        except Exception:  # shown to the user by tryWithErrorDisplay; the panel is restored below
            logging.exception("SAMIR: the registration did not start")
        if not started:
            self.ui.progressBar.hide()
            self.ui.statusLabel.text = _("Not started.")
            if self._lastResult:  # the previous result is still the one shown
                self.onComparisonChanged()
        self._updateApplyButton()

    def startRun(self) -> bool:
        """Check packages, settings and weights, then start the engine; True once it runs. The previous
        result stays on display until the new run has started."""
        if not self.logic.setupPythonRequirements(askConfirmation=True):
            self.addLog(_("Python packages were not installed; nothing was run."))
            return False
        settings = self.logic.engineSettings(self._parameterNode, self.ui.networkWeightsPathLineEdit.currentPath,
                                             self.ui.encoderWeightsPathLineEdit.currentPath)
        if not self.ensureEncoderWeights(settings):
            return False
        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.statusLabel.text = _("Starting...")
        parameters = self._parameterNode
        common = dict(settings=settings, keepTemporaryFiles=parameters.keepTemporaryFiles, waitForCompletion=False,
                      logCallback=self.addLog, progressCallback=self.onProgress, completedCallback=self.onCompleted)
        with slicer.util.WaitCursor():  # writing the inputs for the engine process
            if parameters.inputKind == INPUT_SEQUENCE:
                self.logic.propagateSegmentationThroughSequence(
                    parameters.movingSequence, parameters.movingSegmentation, parameters.referenceFrame,
                    chained=parameters.propagation == PROPAGATE_CHAINED,
                    outputSequence=parameters.outputSegmentationSequence, **common)
            else:
                self.logic.registerVolumes(
                    parameters.fixedVolume, parameters.movingVolume,
                    movingSegmentation=parameters.movingSegmentation, outputTransform=parameters.outputTransform,
                    outputVolume=parameters.outputVolume, outputSegmentation=parameters.outputSegmentation,
                    outputJacobian=parameters.outputJacobian, **common)
        self._clearResultDisplay()
        for lineEdit, used in ((self.ui.networkWeightsPathLineEdit, settings.network),
                               (self.ui.encoderWeightsPathLineEdit, settings.encoder_weights)):
            if used:  # ctkPathLineEdit keeps a history only of the paths it is told to add
                lineEdit.addCurrentPathToHistory()
        return True

    def onProgress(self, fraction: float, stage: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = stage

    def addLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(text)

    def onCompleted(self, task) -> None:
        from SAMIRRegistrationLib.engine_runner import RunState
        self.ui.progressBar.hide()
        self._updateApplyButton()
        if task.state == RunState.SUCCEEDED:
            outputs = task.outputs
            self.ui.statusLabel.text = _("Done in {seconds:.1f} s").format(seconds=outputs.elapsed_s)
            if hasattr(outputs, "transform"):  # pair registration
                self._lastResult = (task.fixed_node, task.moving_node, outputs)
                self.ui.qualityValueLabel.text = _("SDlogJ {sdlogj:.4f}, folding {folding:.4f} %").format(
                    sdlogj=outputs.sdlogj, folding=outputs.folding_percent)
                self._setResultControlsEnabled(True)
                self.onComparisonChanged()
            else:
                worst = max(outputs.folding_percent.values()) if outputs.folding_percent else float("nan")
                self.ui.qualityValueLabel.text = _("{frames} frames, worst folding {folding:.4f} %").format(
                    frames=len(outputs.sdlogj) + 1, folding=worst)
                self.logic.showSegmentationSequence(outputs.segmentation_sequence, self._parameterNode.movingSequence)
        elif task.state == RunState.CANCELLED:
            self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
        else:
            self.ui.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(_("Registration failed: {message}").format(message=task.error_message),
                                     detailedText="\n".join(self.ui.logTextEdit.toPlainText().splitlines()[-40:]))

    # -- encoder weights ------------------------------------------------------------------------
    def ensureEncoderWeights(self, settings) -> bool:
        """Offer to download a checkpoint the run needs; False if the user declined or cancelled."""
        from SAMIRRegistrationLib import weights
        entry = weights.checkpoint_to_download(settings.encoder if settings.uses_encoder else None,
                                               settings.encoder_weights)
        if entry is None:
            return True
        question = _("The {encoder} encoder needs its checkpoint, which is not on this computer yet:\n\n{details}\n\n"
                     "Download it now? (Or pick a local copy under 'Encoder weights file'.)").format(
            encoder=settings.encoder, details=weights.describe_checkpoint(settings.encoder))
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("Download encoder weights")):
            return False
        return self.downloadEncoderWeights(settings.encoder)

    def onDownloadWeightsButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to download the encoder weights.")):
            from SAMIRRegistrationLib import weights
            encoder = self._parameterNode.encoder
            if weights.checkpoint_to_download(encoder) is None:
                slicer.util.infoDisplay(_("The {encoder} checkpoint is already available.").format(encoder=encoder))
                return
            self.downloadEncoderWeights(encoder)

    def downloadEncoderWeights(self, encoder: str) -> bool:
        from SAMIRRegistrationLib import weights
        dialog = qt.QProgressDialog(_("Downloading the {encoder} checkpoint...").format(encoder=encoder),
                                    _("Cancel"), 0, 100, slicer.util.mainWindow())
        dialog.setWindowTitle(_("Download encoder weights"))
        dialog.setWindowModality(qt.Qt.WindowModal)
        dialog.setMinimumDuration(0)
        dialog.show()

        def progress(done: int, total: Optional[int]) -> bool:
            if total:
                dialog.setMaximum(100)
                dialog.setValue(int(100 * done / total))
                dialog.setLabelText(_("Downloading the {encoder} checkpoint: {done:.0f} of {total:.0f} MB").format(
                    encoder=encoder, done=done / 2 ** 20, total=total / 2 ** 20))
            else:
                dialog.setMaximum(0)
            slicer.app.processEvents()
            return not dialog.wasCanceled

        try:
            path = weights.download_checkpoint(encoder, progress)
            self.addLog(_("Encoder checkpoint ready: {path}").format(path=path))
            return True
        except weights.DownloadCancelled:
            self.addLog(_("Download cancelled; the partial file is kept and the next download resumes it."))
            return False
        finally:
            dialog.close()

    # -- results ----------------------------------------------------------------------------------
    def _setResultControlsEnabled(self, enabled: bool) -> None:
        for widget in (self.ui.comparisonComboBox, self.ui.fadeSliderWidget, self.ui.showGridCheckBox,
                       self.ui.showJacobianCheckBox):
            widget.enabled = enabled
        if not enabled:
            self.ui.qualityValueLabel.text = _("no result yet")

    def _clearResultDisplay(self) -> None:
        for checkBox in (self.ui.showGridCheckBox, self.ui.showJacobianCheckBox):
            checkBox.blockSignals(True)
            checkBox.checked = False
            checkBox.blockSignals(False)
        if self._lastResult:
            self.logic.endTransformPreview(self._lastResult[1])
        self._lastResult = None
        self._setResultControlsEnabled(False)

    def onComparisonChanged(self, index=None) -> None:
        if not self._lastResult:
            return
        fixed, moving, outputs = self._lastResult
        with slicer.util.tryWithErrorDisplay(_("Cannot show the comparison.")):
            if self.ui.comparisonComboBox.currentText == COMPARE_CHECKERBOARD:
                self.logic.endTransformPreview(moving)
                self.logic.showCheckerboard(fixed, outputs.volume)
                self.ui.fadeSliderWidget.enabled = False
            else:
                self.logic.showFade(fixed, moving, outputs, self.ui.fadeSliderWidget.value)
                self.ui.fadeSliderWidget.enabled = True

    def onFadeChanged(self, value: float) -> None:
        if self._lastResult and self.ui.comparisonComboBox.currentText == COMPARE_FADE:
            slicer.util.setSliceViewerLayers(foregroundOpacity=value)

    def onShowGridToggled(self, show: bool) -> None:
        if self._lastResult:
            fixed, _moving, outputs = self._lastResult
            self.logic.showTransformGrid(outputs.transform, fixed, show)

    def onShowJacobianToggled(self, show: bool) -> None:
        if self._lastResult:
            fixed, _moving, outputs = self._lastResult
            with slicer.util.tryWithErrorDisplay(_("Cannot show the Jacobian map.")):
                self.logic.showJacobian(fixed, outputs.jacobian, show)
            if not show:
                self.onComparisonChanged()


#
# SAMIRRegistrationLogic
#


class SAMIRRegistrationLogic(ScriptedLoadableModuleLogic):
    """Registration that can run without the panel (scripts, tests).

    The work is done by SAMIRRegistrationLib; this class adds what needs the Slicer application:
    Python packages, PythonSlicer, a timer that polls a running task, and the slice-view displays of a
    result. Encoder checkpoints live in the engine's weights folder, outside Slicer's cache path (which
    *Clear cache* deletes); those an earlier version kept there are moved over once.
    """

    LEGACY_WEIGHTS_SUBFOLDER = ("SAMIR", "weights")  # under slicer.app.cachePath, where SAMIR 0.1.0 kept them

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.task = None
        self._timer: Optional[qt.QTimer] = None
        self._completedCallback: Optional[Callable] = None
        from SAMIRRegistrationLib import weights
        for path in weights.adopt_checkpoints(pathlib.Path(slicer.app.cachePath, *self.LEGACY_WEIGHTS_SUBFOLDER)):
            logging.info(f"SAMIR: moved the checkpoint {path.name} out of Slicer's cache folder to {path.parent}")

    def getParameterNode(self) -> SAMIRRegistrationParameterNode:
        return SAMIRRegistrationParameterNode(super().getParameterNode())

    # -- settings ---------------------------------------------------------------------------------
    @staticmethod
    def savedPath(key: str) -> str:
        return str(qt.QSettings().value(f"{SETTINGS_GROUP}/{key}", ""))

    @staticmethod
    def savePath(key: str, path: str) -> None:
        qt.QSettings().setValue(f"{SETTINGS_GROUP}/{key}", path)

    @staticmethod
    def parseIterations(text: str) -> Optional[tuple]:
        """``"80, 80,60"`` -> ``(80, 80, 60)``; empty -> ``None`` (the preset's). Raises ValueError."""
        from samir.options import OPTION
        return OPTION["iterations"].parse(text)

    def engineSettings(self, parameters: SAMIRRegistrationParameterNode, networkWeightsPath: str = "",
                       encoderWeightsPath: str = ""):
        """:class:`EngineSettings` of the panel's parameters; raises ValueError (the engine's option
        schema) for an invalid one. 0 in a number field and an empty text mean "the preset's"."""
        from SAMIRRegistrationLib.engine_runner import EngineSettings
        networkMode = parameters.mode == "network"
        settings = EngineSettings(
            mode=parameters.mode, network=(networkWeightsPath or None) if networkMode else None,
            refine_iterations=int(parameters.refineIterations) if networkMode else 0,
            encoder=None if networkMode else parameters.encoder, encoder_weights=encoderWeightsPath or None,
            preset=parameters.preset, alignment=parameters.alignment, device=parameters.device,
            use_features=bool(parameters.useFeatures) and not networkMode,
            use_cache=bool(parameters.useFeatureCache),
            input_size=int(parameters.encoderInputSize) or None, levels=int(parameters.levels) or None,
            iterations=self.parseIterations(parameters.iterations),
            smoothness=float(parameters.smoothness) if parameters.overrideSmoothness else None)
        settings.validate()
        return settings

    # -- Python packages ----------------------------------------------------------------------------
    @staticmethod
    def slicerVersion() -> tuple:
        return (int(slicer.app.majorVersion), int(slicer.app.minorVersion))

    def setupPythonRequirements(self, askConfirmation: bool = True) -> bool:
        """Make sure the engine's packages are importable in Slicer's Python; False if the user declined.

        Refuses a Slicer older than 5.10 (its Python 3.9 cannot install the engine's packages) and a
        PyTorch older than the engine needs, with what to do. PyTorch comes from the PyTorch extension;
        the other packages are pip-installed with a constraints file that keeps Slicer's numpy and
        SimpleITK (and the installed torch) as they are. No wait cursor is shown over the questions
        and dialogs.
        """
        from SAMIRRegistrationLib import dependencies
        dependencies.check_slicer_and_python(self.slicerVersion())
        if dependencies.torch_available():
            dependencies.check_torch_version()
        elif not self._installTorch(askConfirmation, dependencies):
            return False
        missing = dependencies.missing_pip_requirements()
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    _("SAMIR needs these Python packages, which will be installed now (numpy, SimpleITK and"
                      " PyTorch are left as they are):\n\n{packages}").format(packages="\n".join(missing)),
                    windowTitle=_("Install Python packages")):
                return False
            constraints = dependencies.write_constraints_file(pathlib.Path(slicer.app.temporaryPath))
            slicer.util.showStatusMessage(_("Installing Python packages for SAMIR..."))
            slicer.util.pip_install(dependencies.pip_install_arguments(missing, constraints))
            importlib.invalidate_caches()
            still_missing = dependencies.missing_pip_requirements()
            if still_missing:
                raise RuntimeError(_("Installing {packages} failed; see the Python console.").format(
                    packages=", ".join(still_missing)))
        return True

    @staticmethod
    def _installTorch(askConfirmation: bool, dependencies) -> bool:
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError(_("SAMIR needs PyTorch: install the 'PyTorch' extension with the Extensions"
                                 " Manager, restart Slicer and try again.")) from None
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=askConfirmation, torchVersionRequirement=f">={dependencies.MINIMUM_TORCH_VERSION}",
            torchvisionVersionRequirement=f">={dependencies.MINIMUM_TORCHVISION_VERSION}")
        return torch is not None

    def engineRunFactory(self, keepTemporaryFiles: bool = False):
        """Engine runs in PythonSlicer, with Slicer's startup environment (and a weights folder the user set)."""
        from SAMIRRegistrationLib import weights
        from SAMIRRegistrationLib.engine_runner import default_python_executable
        from SAMIRRegistrationLib.registration import subprocess_engine_runs
        pythonSlicer = default_python_executable([pathlib.Path(slicer.app.slicerHome) / "bin"])
        environment = dict(slicer.util.startupEnvironment())
        if weights.WEIGHTS_DIR_ENV in os.environ:
            environment[weights.WEIGHTS_DIR_ENV] = os.environ[weights.WEIGHTS_DIR_ENV]
        workFolder = pathlib.Path(slicer.app.temporaryPath) / "SAMIR"
        workFolder.mkdir(parents=True, exist_ok=True)
        return subprocess_engine_runs(python_executable=pythonSlicer, environment=environment,
                                      work_folder=workFolder, keep_work_folder=keepTemporaryFiles)

    # -- running ----------------------------------------------------------------------------------
    @property
    def isRunning(self) -> bool:
        return self.task is not None and not self.task.state.finished

    def registerVolumes(self, fixedVolume, movingVolume, movingSegmentation=None, outputTransform=None,
                        outputVolume=None, outputSegmentation=None, outputJacobian=None,
                        settings=None, keepTemporaryFiles: bool = False,
                        waitForCompletion: bool = True, logCallback: Optional[Callable[[str], None]] = None,
                        progressCallback: Optional[Callable[[float, str], None]] = None,
                        completedCallback: Optional[Callable] = None, engineRunFactory=None):
        """Register ``movingVolume`` onto ``fixedVolume``; fill the outputs that are given.

        :param movingSegmentation: segmentation to propagate onto the fixed volume (into
            ``outputSegmentation``, or a new node).
        :param outputTransform: grid transform node; the moving volume placed under it lands on the fixed one.
        :param outputVolume: the moving volume resampled onto the fixed grid.
        :param outputJacobian: Jacobian-determinant map on the fixed grid (coloured, with a legend).
        :param settings: :class:`SAMIRRegistrationLib.EngineSettings` (default: zero-shot, balanced preset).
        :param waitForCompletion: block until done (scripts, tests) and raise on failure; otherwise
            return at once and report through the callbacks while a timer polls the engine process.
        :return: the task (``task.outputs`` holds the filled nodes, SDlogJ and folding %).
        """
        from SAMIRRegistrationLib.engine_runner import EngineSettings
        from SAMIRRegistrationLib.registration import PairRegistrationTask
        if self.isRunning:
            raise RuntimeError(_("A registration is already running; cancel it first."))
        self.endTransformPreview(movingVolume)  # a previous result shown on it must not be read as its geometry
        task = PairRegistrationTask(
            fixedVolume, movingVolume, moving_segmentation=movingSegmentation, output_transform=outputTransform,
            output_volume=outputVolume, output_segmentation=outputSegmentation, output_jacobian=outputJacobian,
            settings=settings or EngineSettings(), engine_run_factory=engineRunFactory or self.engineRunFactory(
                keepTemporaryFiles), on_log=logCallback or logging.info, on_progress=progressCallback,
            color_logic=self._colorLogic())
        return self._run(task, waitForCompletion, completedCallback)

    def propagateSegmentationThroughSequence(self, volumeSequence, segmentation, referenceFrame: int,
                                             chained: bool = False, outputSequence=None, settings=None,
                                             keepTemporaryFiles: bool = False, waitForCompletion: bool = True,
                                             logCallback: Optional[Callable[[str], None]] = None,
                                             progressCallback: Optional[Callable[[float, str], None]] = None,
                                             completedCallback: Optional[Callable] = None, engineRunFactory=None):
        """Register every frame of ``volumeSequence`` and carry ``segmentation`` (drawn on frame
        ``referenceFrame``) to each: a segmentation sequence synchronised with the volume sequence's browser."""
        from SAMIRRegistrationLib.engine_runner import EngineSettings
        from SAMIRRegistrationLib.sequences import SequencePropagationTask
        if self.isRunning:
            raise RuntimeError(_("A registration is already running; cancel it first."))
        browser = None
        sequencesLogic = self._sequencesLogic()
        if sequencesLogic is not None and volumeSequence is not None:
            browser = sequencesLogic.GetFirstBrowserNodeForSequenceNode(volumeSequence)
        task = SequencePropagationTask(
            volumeSequence, segmentation, referenceFrame, chained=chained, output_sequence=outputSequence,
            browser_node=browser, settings=settings or EngineSettings(),
            engine_run_factory=engineRunFactory or self.engineRunFactory(keepTemporaryFiles),
            on_log=logCallback or logging.info, on_progress=progressCallback)
        return self._run(task, waitForCompletion, completedCallback)

    def _run(self, task, waitForCompletion: bool, completedCallback: Optional[Callable]):
        self.task = task
        self._completedCallback = completedCallback
        task.start()
        if waitForCompletion:
            from SAMIRRegistrationLib.engine_runner import wait_until_finished
            wait_until_finished(task, what="registration",
                                pause=lambda: (slicer.app.processEvents(), qt.QThread.msleep(50)))
            self._finished()
            task.raise_if_failed()
            return task
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self._poll)
        self._timer.start()
        return task

    def _poll(self) -> None:
        if self.task is None or self.task.poll().finished:
            self._finished()

    def _finished(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        callback, self._completedCallback = self._completedCallback, None
        if callback is not None and self.task is not None:
            callback(self.task)

    def cancel(self) -> None:
        """Stop the running registration (kills the engine process tree; the scene is left as it was)."""
        if self.isRunning:
            self.task.cancel()
            self._finished()

    # -- showing results --------------------------------------------------------------------------
    @staticmethod
    def _colorLogic():
        modules = getattr(slicer, "modules", None)
        return modules.colors.logic() if modules is not None and hasattr(modules, "colors") else None

    @staticmethod
    def _sequencesLogic():
        modules = getattr(slicer, "modules", None)
        return modules.sequences.logic() if modules is not None and hasattr(modules, "sequences") else None

    def showFade(self, fixedVolume, movingVolume, outputs, opacity: float = 0.5) -> None:
        """Fixed in the background, the warped volume (or the moving volume previewed under the transform,
        undone by :meth:`endTransformPreview`, which the next run calls) on top."""
        from SAMIRRegistrationLib.display import preview_under_transform
        foreground = outputs.volume
        if foreground is None and outputs.transform is not None:
            preview_under_transform(movingVolume, outputs.transform)
            foreground = movingVolume
        slicer.util.setSliceViewerLayers(background=fixedVolume, foreground=foreground, foregroundOpacity=opacity,
                                         fit=True)

    @staticmethod
    def endTransformPreview(movingVolume) -> None:
        """Put a volume :meth:`showFade` placed under a result transform back under its own parent."""
        from SAMIRRegistrationLib.display import end_transform_preview
        end_transform_preview(movingVolume)

    def showCheckerboard(self, fixedVolume, warpedVolume, squares: int = 8):
        """A checkerboard volume of fixed and warped (created once, refreshed) shown alone."""
        from SAMIRRegistrationLib.display import add_checkerboard_node
        name = f"{fixedVolume.GetName()} checkerboard"
        existing = slicer.mrmlScene.GetFirstNodeByName(name)
        board = add_checkerboard_node(fixedVolume, warpedVolume, squares, output_node=existing, name=name)
        if fixedVolume.GetDisplayNode() is not None:
            board.GetDisplayNode().SetAndObserveColorNodeID(fixedVolume.GetDisplayNode().GetColorNodeID())
        slicer.util.setSliceViewerLayers(background=board, foreground=None, fit=True)
        return board

    def showTransformGrid(self, transformNode, fixedVolume, show: bool = True) -> None:
        from SAMIRRegistrationLib.grid_transforms import show_transform_grid
        if transformNode is None:
            return
        if show:
            show_transform_grid(transformNode, fixedVolume)
        elif transformNode.GetDisplayNode() is not None:
            transformNode.GetDisplayNode().SetVisibility(False)

    def showJacobian(self, fixedVolume, jacobianVolume, show: bool = True) -> None:
        """Jacobian map over the fixed volume with its colour legend (or hidden again)."""
        from SAMIRRegistrationLib.display import show_jacobian
        if jacobianVolume is None:
            raise ValueError(_("No Jacobian map was computed: select a 'Jacobian map' output and run again."))
        legend = show_jacobian(jacobianVolume, self._colorLogic())
        if legend is not None:
            legend.SetVisibility(show)
        if show:
            slicer.util.setSliceViewerLayers(background=fixedVolume, foreground=jacobianVolume, foregroundOpacity=0.6)

    def showSegmentationSequence(self, segmentationSequence, volumeSequence) -> None:
        """Make the browser's proxy segmentation visible (the frame shown follows the volume sequence)."""
        sequencesLogic = self._sequencesLogic()
        if sequencesLogic is None or segmentationSequence is None:
            return
        browser = sequencesLogic.GetFirstBrowserNodeForSequenceNode(volumeSequence)
        if browser is not None:
            sequencesLogic.UpdateProxyNodesFromSequences(browser)
            proxy = browser.GetProxyNode(segmentationSequence)
            if proxy is not None:
                proxy.CreateDefaultDisplayNodes()
                proxy.GetDisplayNode().SetVisibility(True)


#
# SAMIRRegistrationTest
#


class SAMIRRegistrationTest(ScriptedLoadableModuleTest):
    """Runs inside 3D Slicer (Reload and Test, or ctest): registrations through the real module logic."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SyntheticPairAndBadInput()
        self.setUp()
        self.test_SampleDataPair()

    @staticmethod
    def _quickSettings():
        from SAMIRRegistrationLib.engine_runner import EngineSettings
        return EngineSettings(preset="fast", device="auto", levels=3, iterations=(40, 40, 30))

    def test_SyntheticPairAndBadInput(self):
        """Offline: a blob pair made here; outputs filled, alignment improved, bad input refused."""
        import numpy as np
        self.delayDisplay("Synthetic pair")
        logic = SAMIRRegistrationLogic()
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))
        zz, yy, xx = np.indices((24, 40, 40), dtype=np.float32)

        def blob(radius):
            return (100.0 / (1 + np.exp((np.sqrt(((zz - 12) / 6) ** 2 + ((yy - 20) / radius) ** 2
                                                 + ((xx - 20) / radius) ** 2) - 1) * 8))).astype(np.float32)

        fixed = slicer.util.addVolumeFromArray(blob(12.0), ijkToRAS=np.diag([2.0, 2.0, 3.0, 1.0]), name="fixed")
        moving = slicer.util.addVolumeFromArray(blob(10.0), ijkToRAS=np.diag([2.0, 2.0, 3.0, 1.0]), name="moving")
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", "SAMIR transform")
        warped = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
        jacobian = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Jacobian")
        task = logic.registerVolumes(fixed, moving, outputTransform=transform, outputVolume=warped,
                                     outputJacobian=jacobian, settings=self._quickSettings())
        fixedArray = slicer.util.arrayFromVolume(fixed)
        before = np.abs(slicer.util.arrayFromVolume(moving) - fixedArray).mean()
        after = np.abs(slicer.util.arrayFromVolume(warped) - fixedArray).mean()
        self.assertLess(after, 0.7 * before)
        self.assertLess(task.outputs.folding_percent, 0.5)
        self.assertIsNotNone(transform.GetTransformFromParentAs("vtkOrientedGridTransform", False, True))
        self.assertGreater(slicer.util.arrayFromVolume(jacobian).max(), 1.0)

        self.delayDisplay("Bad input leaves the scene as it was")
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(ValueError):
            logic.registerVolumes(fixed, fixed, outputVolume=warped, settings=self._quickSettings())
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Synthetic pair passed")

    def test_SampleDataPair(self):
        """MRBrainTumor1/2 from Sample Data (downloaded): a fast registration improves the alignment."""
        import numpy as np
        import SampleData
        from SAMIRRegistrationLib.engine_runner import EngineSettings
        self.delayDisplay("Loading sample data")
        fixed = SampleData.downloadSample("MRBrainTumor1")
        moving = SampleData.downloadSample("MRBrainTumor2")
        logic = SAMIRRegistrationLogic()
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))
        warped = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", "SAMIR transform")
        self.delayDisplay("Registering (fast preset)")
        task = logic.registerVolumes(fixed, moving, outputTransform=transform, outputVolume=warped,
                                     settings=EngineSettings(preset="fast"))
        unregistered = slicer.modules.volumes.logic().ResampleVolumeToReferenceVolume(moving, fixed)
        fixedArray = slicer.util.arrayFromVolume(fixed).astype(np.float32)
        before = np.abs(slicer.util.arrayFromVolume(unregistered) - fixedArray).mean()
        after = np.abs(slicer.util.arrayFromVolume(warped) - fixedArray).mean()
        self.assertLess(after, before)
        self.assertLess(task.outputs.folding_percent, 1.0)
        logic.showFade(fixed, moving, task.outputs)
        self.delayDisplay(f"Sample data passed: mean |fixed - moving| {before:.1f} -> {after:.1f}")
