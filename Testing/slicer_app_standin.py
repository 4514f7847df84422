"""Stand-ins for the parts of the 3D Slicer application that slicer-core lacks, so that the module file
``SAMIRRegistration.py`` can be imported and its logic and panel code run in a test.

slicer-core gives the real MRML classes and ``slicer.util``; it has no Qt and no application. This
module provides a minimal ``qt`` (timers, settings, the override cursor), ``slicer.app``,
``slicer.ScriptedLoadableModule`` and ``slicer.parameterNodeWrapper``, and replaces the dialogs of
``slicer.util`` with recorders. The override-cursor stack is kept, so a test can see whether a wait
cursor covered a dialog. ``slicer.util``'s own ``tryWithErrorDisplay`` and ``WaitCursor`` run as in Slicer.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import List

MODULE_FOLDER = Path(__file__).resolve().parents[1] / "SAMIRRegistration"


class Signal:
    def __init__(self):
        self.slots = []

    def connect(self, slot):
        self.slots.append(slot)


class QTimer:
    def __init__(self):
        self.timeout = Signal()
        self.active = False

    def setInterval(self, ms):
        self.interval = ms

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


class QSettings:
    store: dict = {}

    def value(self, key, default=None):
        return self.store.get(key, default)

    def setValue(self, key, value):
        self.store[key] = value


class Application:
    """``slicer.app`` and ``qt.QApplication`` in one: the override-cursor stack, paths, version."""

    cursors: List[object] = []

    def __init__(self, folder: Path, version=(5, 12)):
        self.cachePath = str(folder / "cache")
        self.temporaryPath = str(folder / "tmp")
        self.slicerHome = str(folder / "Slicer")
        self.majorVersion, self.minorVersion = version
        Path(self.temporaryPath).mkdir(parents=True, exist_ok=True)

    @classmethod
    def setOverrideCursor(cls, cursor):
        cls.cursors.append(cursor)

    @classmethod
    def restoreOverrideCursor(cls):
        cls.cursors.pop()

    def processEvents(self):
        pass

    def testingEnabled(self):
        return False


def qt_module() -> types.ModuleType:
    qt = types.ModuleType("qt")
    qt.QTimer, qt.QSettings, qt.QApplication = QTimer, QSettings, Application
    qt.Qt = types.SimpleNamespace(WaitCursor="wait", BusyCursor="busy", WindowModal="modal")
    qt.QThread = types.SimpleNamespace(msleep=lambda ms: None)
    return qt


def scripted_module_module() -> types.ModuleType:
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class Base:
        def __init__(self, parent=None):
            self.parent = parent if parent is not None else types.SimpleNamespace(isEntered=False)

    class Logic(Base):
        def getParameterNode(self):
            raise NotImplementedError("no parameter node in the stand-in")

    module.ScriptedLoadableModule = Base
    module.ScriptedLoadableModuleWidget = Base
    module.ScriptedLoadableModuleLogic = Logic
    module.ScriptedLoadableModuleTest = Base
    return module


def parameter_node_wrapper_module() -> types.ModuleType:
    module = types.ModuleType("slicer.parameterNodeWrapper")
    module.parameterNodeWrapper = lambda cls: cls
    module.Choice = lambda choices: ("choice", tuple(choices))
    module.WithinRange = lambda low, high: ("range", low, high)
    return module


class Recorder:
    """Replaces a ``slicer.util`` dialog: records (text, override cursors active) and answers."""

    def __init__(self, answer=True):
        self.calls: List[tuple] = []
        self.answer = answer

    def __call__(self, text="", *args, **kwargs):
        self.calls.append((text, list(Application.cursors)))
        return self.answer


def install(monkeypatch, folder: Path, version=(5, 12)):
    """Put the stand-ins in place (undone by ``monkeypatch``); returns the dialog recorders."""
    import slicer
    import slicer.util
    monkeypatch.setitem(sys.modules, "qt", qt_module())
    for name, module in (("ScriptedLoadableModule", scripted_module_module()),
                         ("parameterNodeWrapper", parameter_node_wrapper_module())):
        monkeypatch.setitem(sys.modules, f"slicer.{name}", module)
        monkeypatch.setattr(slicer, name, module, raising=False)
    monkeypatch.setattr(slicer, "app", Application(folder, version), raising=False)
    monkeypatch.setattr(Application, "cursors", [])
    monkeypatch.setattr(QSettings, "store", {})
    dialogs = {name: Recorder() for name in ("errorDisplay", "confirmOkCancelDisplay", "infoDisplay",
                                              "showStatusMessage", "pip_install", "setSliceViewerLayers")}
    for name, recorder in dialogs.items():
        monkeypatch.setattr(slicer.util, name, recorder)
    monkeypatch.setattr(slicer.util, "startupEnvironment", lambda: {"PATH": "/usr/bin"})
    monkeypatch.setattr(sys, "path", list(sys.path))  # the module puts its folder first
    return dialogs


def import_module(monkeypatch):
    """A fresh import of the module file (after :func:`install`)."""
    import importlib
    monkeypatch.syspath_prepend(str(MODULE_FOLDER))
    monkeypatch.delitem(sys.modules, "SAMIRRegistration", raising=False)
    return importlib.import_module("SAMIRRegistration")
