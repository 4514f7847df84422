"""The module file itself (SAMIRRegistration.py): logic and panel code run on real MRML (slicer-core)
with stand-ins for Qt and the application (Testing/slicer_app_standin.py).

What a user of the panel sees: a failed start restores the panel and keeps the previous result; no
wait cursor covers a question or a dialog; an old Slicer, Python or PyTorch is refused with what to
do; checkpoints live outside Slicer's cache folder; a result previewed under its transform does not
block the next run; the reference frame's range follows the sequence; the start-up imports no engine.
"""
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

import slicer_app_standin as standin  # noqa: E402
from samir.geometry import SAMIRInputError  # noqa: E402
from SAMIRRegistrationLib import dependencies, display, volumes  # noqa: E402
from SAMIRRegistrationLib.engine_runner import EngineOutputs, EngineRun, RunState  # noqa: E402
from slicer_test_support import new_scene, smooth_blobs, volume_node  # noqa: E402

TESTING = Path(__file__).resolve().parent


@pytest.fixture
def app(monkeypatch, tmp_path):
    dialogs = standin.install(monkeypatch, tmp_path)
    module = standin.import_module(monkeypatch)
    scene = new_scene()
    monkeypatch.setattr(slicer, "mrmlScene", scene)
    return types.SimpleNamespace(module=module, dialogs=dialogs, scene=scene, folder=tmp_path)


class FakeWidget:
    """Any Qt widget of the panel: attributes as set, unknown methods record their calls."""

    def __init__(self, name):
        self.objectName, self.calls = name, []
        self.enabled, self.visible, self.text, self.value, self.checked = True, True, "", 0, False
        self.currentPath, self.currentText, self.maximum = "", "", 9999

    def hide(self):
        self.visible = False

    def show(self):
        self.visible = True

    def setVisible(self, visible):
        self.visible = visible

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, args))


class FakeUI:
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        widget = FakeWidget(name)
        setattr(self, name, widget)
        return widget


class FakeParameterNode:
    """The wrapped parameter node: plain attributes (hashable, as observers need)."""


def parameters(**values):
    defaults = dict(inputKind="volume pair", fixedVolume=None, movingVolume=None, movingSequence=None,
                    referenceFrame=0, propagation="to reference frame", movingSegmentation=None,
                    outputTransform=None, outputVolume=None, outputSegmentation=None, outputSegmentationSequence=None,
                    outputJacobian=None, mode="zeroshot", refineIterations=0, encoder="litemedsam", preset="fast",
                    alignment="rigid", device="cpu", useFeatures=False, levels=0, iterations="",
                    overrideSmoothness=False, smoothness=0.3, encoderInputSize=0, useFeatureCache=True,
                    keepTemporaryFiles=False)
    defaults.update(values)
    node = FakeParameterNode()
    node.__dict__.update(defaults)
    node.connectGui = lambda ui: "tag"
    node.disconnectGui = lambda tag: None
    node.AddObserver = lambda event, callback, priority=0.0: 1
    node.RemoveObserver = lambda tag: None
    return node


class ZeroFieldRun(EngineRun):
    """The engine replaced by the identity (the module's bookkeeping is under test, not registration);
    it finishes at the second poll (the task polls once as it starts)."""

    def start(self):
        self.state, self.polls = RunState.RUNNING, 0

    def poll(self):
        self.polls += 1
        if self.state == RunState.RUNNING and self.polls > 1:
            field = np.zeros(self.fixed.shape + (3,), np.float32)
            self.outputs = EngineOutputs(field, self.fixed, self.moving, None, {"sdlogj": 0.0, "folding_percent": 0.0})
            self.state = RunState.SUCCEEDED
        return self.state


def zero_field_runs(keepTemporaryFiles=False):
    return lambda fixed, moving, settings, on_log=None, on_progress=None: ZeroFieldRun(
        fixed, moving, settings, on_log, on_progress)


def pair(scene):
    fixed = volume_node(scene, smooth_blobs((6, 10, 10)), "fixed")
    moving = volume_node(scene, smooth_blobs((6, 10, 10), seed=2), "moving")
    return fixed, moving


def widget_with_result(app):
    """A panel whose last run left a result (fixed, moving, transform) on display."""
    module = app.module
    widget = module.SAMIRRegistrationWidget()
    widget.ui, widget.logic = FakeUI(), module.SAMIRRegistrationLogic()
    fixed, moving = pair(app.scene)
    transform = app.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "previous result")
    outputs = types.SimpleNamespace(transform=transform, volume=None, jacobian=None)
    widget._parameterNode = parameters(fixedVolume=fixed, movingVolume=moving, outputTransform=transform)
    widget._lastResult = (fixed, moving, outputs)
    widget.ui.comparisonComboBox.currentText = module.COMPARE_FADE
    return widget, fixed, moving, outputs


# ------------------------------------------------------------------------------------------------
# starting a run from the panel


@pytest.mark.parametrize("failing", ["packages", "engine start"])
def test_a_failed_start_restores_the_panel_and_keeps_the_previous_result(app, monkeypatch, failing):
    widget, fixed, moving, outputs = widget_with_result(app)
    reason = {"packages": "pip could not reach the package index", "engine start": "PythonSlicer not found"}[failing]

    def broken(*args, **kwargs):
        raise SAMIRInputError(reason)

    if failing == "packages":
        monkeypatch.setattr(widget.logic, "setupPythonRequirements", broken)
    else:  # after the progress bar was shown and the inputs were checked
        monkeypatch.setattr(widget.logic, "setupPythonRequirements", lambda askConfirmation=True: True)
        monkeypatch.setattr(widget.logic, "engineRunFactory", broken)
        widget._parameterNode.outputVolume = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
    nodes_before = app.scene.GetNumberOfNodes()
    widget.onApplyButton()
    (message, cursors), = app.dialogs["errorDisplay"].calls
    assert "Failed to start the registration." in message and reason in message
    assert app.scene.GetNumberOfNodes() == nodes_before
    assert cursors == []  # the error is not covered by a wait cursor
    assert widget.ui.progressBar.visible is False
    assert widget.ui.statusLabel.text == "Not started."
    assert widget._lastResult == (fixed, moving, outputs)
    assert moving.GetTransformNodeID() == outputs.transform.GetID()  # the previous result is shown again
    assert widget.ui.applyButton.text == "Apply"


def test_no_wait_cursor_covers_the_download_question(app, monkeypatch):
    widget, fixed, moving, outputs = widget_with_result(app)
    monkeypatch.setattr(widget.logic, "setupPythonRequirements", lambda askConfirmation=True: True)
    widget._parameterNode.useFeatures, widget._parameterNode.encoder = True, "sam_vit_b"
    app.dialogs["confirmOkCancelDisplay"].answer = False  # the user declines the download
    widget.onApplyButton()
    (question, cursors), = app.dialogs["confirmOkCancelDisplay"].calls
    assert "sam_vit_b" in question and cursors == []
    assert widget.ui.statusLabel.text == "Not started." and widget._lastResult is not None


def test_a_started_run_replaces_the_previous_result_and_remembers_the_paths_used(app, monkeypatch, tmp_path):
    widget, fixed, moving, outputs = widget_with_result(app)
    monkeypatch.setattr(widget.logic, "setupPythonRequirements", lambda askConfirmation=True: True)
    monkeypatch.setattr(widget.logic, "engineRunFactory", zero_field_runs)
    checkpoint = tmp_path / "sam_vit_b_local.pth"
    checkpoint.write_bytes(b"a local encoder checkpoint")
    widget.ui.encoderWeightsPathLineEdit.currentPath = str(checkpoint)
    warped = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
    widget._parameterNode.outputVolume = warped
    widget.onApplyButton()
    assert widget.logic.isRunning and widget.ui.progressBar.visible
    assert widget.ui.applyButton.text == "Cancel"
    assert widget._lastResult is None
    assert moving.GetTransformNodeID() is None  # the preview was undone before the inputs were read
    assert ("addCurrentPathToHistory", ()) in widget.ui.encoderWeightsPathLineEdit.calls
    assert ("addCurrentPathToHistory", ()) not in widget.ui.networkWeightsPathLineEdit.calls  # none used
    widget.logic._poll()  # the timer's tick: the run finished
    assert widget.ui.statusLabel.text.startswith("Done in")
    assert widget._lastResult[2].volume is warped


def test_the_panel_offers_the_engines_choices_and_defaults(app):
    from typing import get_type_hints
    from samir import options
    hints = get_type_hints(app.module.SAMIRRegistrationParameterNode, include_extras=True)
    bound = {"mode": "mode", "preset": "preset", "alignment": "alignment", "device": "device", "encoder": "encoder"}
    for field, option in bound.items():
        (kind, choices), = hints[field].__metadata__
        expected = options.DEVICES if option == "device" else options.choices_of(option)
        assert kind == "choice" and choices == tuple(expected), field
        default = getattr(app.module.SAMIRRegistrationParameterNode, field)
        assert default == (options.default(option) or expected[0]), field
    (_, low, high), = hints["levels"].__metadata__
    assert (low, high) == (0, options.OPTION["levels"].maximum)


def test_the_panels_settings_are_checked_by_the_engines_schema(app):
    logic = app.module.SAMIRRegistrationLogic()
    assert logic.parseIterations(" 80, 80;60 ") == (80, 80, 60) and logic.parseIterations("") is None
    with pytest.raises(SAMIRInputError, match="whole numbers separated by commas"):
        logic.parseIterations("80, many")
    with pytest.raises(SAMIRInputError, match="--iterations must be at least 1, got"):
        logic.engineSettings(parameters(iterations="0,-5"))
    with pytest.raises(SAMIRInputError, match="--smoothness must be at least 0"):
        logic.engineSettings(parameters(overrideSmoothness=True, smoothness=-1.0))
    settings = logic.engineSettings(parameters(mode="network", useFeatures=True), networkWeightsPath=__file__)
    assert settings.network == __file__ and settings.use_features is False and settings.encoder is None
    assert "--features" not in settings.cli_arguments()


# ------------------------------------------------------------------------------------------------
# the previewed result and the next run


def test_the_fade_preview_does_not_block_the_next_run(app):
    logic = app.module.SAMIRRegistrationLogic()
    fixed, moving = pair(app.scene)
    transform = app.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "result")
    logic.showFade(fixed, moving, types.SimpleNamespace(volume=None, transform=transform))
    assert moving.GetTransformNodeID() == transform.GetID()
    other = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
    task = logic.registerVolumes(fixed, moving, outputVolume=other, engineRunFactory=zero_field_runs())
    assert task.state == RunState.SUCCEEDED
    assert moving.GetTransformNodeID() is None and moving.GetAttribute(display.PREVIEW_PARENT_ATTRIBUTE) is None


def test_the_reference_frame_range_follows_the_sequence_after_the_gui_is_connected(app):
    widget = app.module.SAMIRRegistrationWidget()
    widget.ui, widget.logic = FakeUI(), app.module.SAMIRRegistrationLogic()
    sequence = app.scene.AddNewNodeByClass("vtkMRMLSequenceNode", "cine")
    for index in range(5):
        frame = slicer.vtkMRMLScalarVolumeNode()
        sequence.SetDataNodeAtValue(frame, str(index))
    widget.setParameterNode(parameters(inputKind="4D sequence", movingSequence=sequence))
    assert widget.ui.referenceFrameSpinBox.maximum == 4


# ------------------------------------------------------------------------------------------------
# packages, versions, weights, PythonSlicer


def test_an_old_slicer_is_refused_before_anything_is_installed(monkeypatch, tmp_path):
    standin.install(monkeypatch, tmp_path, version=(5, 8))
    module = standin.import_module(monkeypatch)
    dialogs_before = standin.Application.cursors
    with pytest.raises(dependencies.UnsupportedEnvironment, match=r"Slicer 5\.10 or later.*this is Slicer 5\.8"):
        module.SAMIRRegistrationLogic().setupPythonRequirements(askConfirmation=True)
    assert slicer.util.pip_install.calls == [] and slicer.util.confirmOkCancelDisplay.calls == []
    assert dialogs_before == []
    with pytest.raises(dependencies.UnsupportedEnvironment, match=r"Python 3\.9"):
        dependencies.check_slicer_and_python(None, (3, 9, 10))
    dependencies.check_slicer_and_python((5, 10), (3, 12, 10))
    dependencies.check_slicer_and_python((6, 0), (3, 13, 0))


def test_an_old_pytorch_is_refused_with_what_to_do(app, monkeypatch):
    assert dependencies.version_tuple("2.0.1+cu118") == (2, 0, 1)
    assert dependencies.version_tuple("2.14.1") == (2, 14, 1)
    assert dependencies.outdated_torch({"torch": "2.14.1", "torchvision": "0.29.1"}) == []
    assert dependencies.outdated_torch({"torch": "2.1", "torchvision": "0.16.0"}) == []
    assert dependencies.outdated_torch({"torch": "2.0.1+cu118", "torchvision": "0.15.2"}) == [
        "torch 2.0.1+cu118 (needs 2.1 or later)", "torchvision 0.15.2 (needs 0.16 or later)"]
    installed = {"torch": "1.13.1", "torchvision": "0.14.1"}
    monkeypatch.setattr(dependencies, "installed_version", lambda name: installed.get(name))
    with pytest.raises(dependencies.UnsupportedEnvironment, match="torch 1.13.1.*PyTorch Utils.*>=2.1"):
        app.module.SAMIRRegistrationLogic().setupPythonRequirements(askConfirmation=False)
    assert app.dialogs["pip_install"].calls == []


def test_missing_packages_are_installed_after_a_question_without_a_wait_cursor(app, monkeypatch):
    missing = ["psutil>=5.9"]
    monkeypatch.setattr(dependencies, "missing_pip_requirements", lambda: list(missing))

    def install(arguments):
        app.dialogs["pip_install"].calls.append((arguments, list(standin.Application.cursors)))
        missing.clear()

    monkeypatch.setattr(slicer.util, "pip_install", install)
    assert app.module.SAMIRRegistrationLogic().setupPythonRequirements(askConfirmation=True)
    (question, cursors), = app.dialogs["confirmOkCancelDisplay"].calls
    assert "psutil>=5.9" in question and cursors == []
    (arguments, cursors), = app.dialogs["pip_install"].calls
    assert arguments[0] == "psutil>=5.9" and arguments[1] == "-c" and cursors == []


def test_checkpoints_are_kept_outside_slicers_cache_and_old_ones_are_moved_out(app, monkeypatch, tmp_path):
    monkeypatch.delenv("SAMIR_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    legacy = Path(slicer.app.cachePath, "SAMIR", "weights")
    legacy.mkdir(parents=True)
    (legacy / "sam_vit_b_01ec64.pth").write_bytes(b"checkpoint kept by SAMIR 0.1.0")
    (legacy / "unrelated.txt").write_text("not ours")
    app.module.SAMIRRegistrationLogic()
    from samir.encoder_weights import weights_dir
    folder = weights_dir()
    assert Path(slicer.app.cachePath) not in folder.parents
    assert (folder / "sam_vit_b_01ec64.pth").read_bytes() == b"checkpoint kept by SAMIR 0.1.0"
    assert not (legacy / "sam_vit_b_01ec64.pth").exists() and (legacy / "unrelated.txt").exists()
    assert "SAMIR_WEIGHTS_DIR" not in os.environ  # the engine process finds the same folder by itself


def test_python_slicer_is_found_in_slicers_bin_folder_or_named_as_missing(app, monkeypatch):
    from SAMIRRegistrationLib import engine_runner
    monkeypatch.setattr(engine_runner.shutil, "which", lambda name: None)
    monkeypatch.setattr(engine_runner.sys, "executable", str(app.folder / "Slicer" / "bin" / "SlicerApp-real"))
    logic = app.module.SAMIRRegistrationLogic()
    with pytest.raises(SAMIRInputError, match="PythonSlicer not found"):
        logic.engineRunFactory()
    python_slicer = Path(slicer.app.slicerHome, "bin", "PythonSlicer")
    python_slicer.parent.mkdir(parents=True)
    python_slicer.write_text("")
    factory = logic.engineRunFactory()
    fixed, moving = pair(app.scene)
    run = factory(volumes.volume_from_node(fixed), volumes.volume_from_node(moving), None)
    assert run.python_executable == str(python_slicer)


# ------------------------------------------------------------------------------------------------
# start-up: nothing heavy, and the engine shipped with the module even beside another 'samir'


def run_module_import(code: str, tmp_path) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTING)!r})
        import pytest
        import slicer_app_standin as standin
        patch = pytest.MonkeyPatch()
        standin.install(patch, __import__("pathlib").Path({str(tmp_path)!r}))
    """) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


def test_slicer_start_up_imports_no_engine_bridge_simpleitk_or_torch(tmp_path):
    result = run_module_import("""
        sys.path.insert(0, str(standin.MODULE_FOLDER))
        import SAMIRRegistration
        heavy = [m for m in ("SimpleITK", "torch", "SAMIRRegistrationLib", "samir.geometry", "samir.register")
                 if m in sys.modules]
        print("heavy", heavy, SAMIRRegistration.choices_of("preset"))
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "heavy [] ('fast', 'balanced', 'accurate')" in result.stdout


def test_another_package_named_samir_does_not_shadow_the_engine(tmp_path):
    foreign = tmp_path / "site-packages" / "samir"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text("FOREIGN = True\n")
    result = run_module_import(f"""
        sys.path.insert(0, {str(foreign.parent)!r})  # installed in Slicer's Python, found first
        sys.path.append(str(standin.MODULE_FOLDER))  # where Slicer puts scripted modules
        import SAMIRRegistration, samir.options
        print("engine", samir.options.__file__)
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"engine {standin.MODULE_FOLDER / 'samir' / 'options.py'}" in result.stdout
    result = run_module_import(f"""
        sys.path.insert(0, {str(foreign.parent)!r})
        import samir  # something imported the other package first
        sys.path.append(str(standin.MODULE_FOLDER))
        import SAMIRRegistration
    """, tmp_path)
    assert result.returncode != 0
    assert "another Python package named 'samir'" in result.stderr and str(foreign) in result.stderr
