"""Run the SAMIR engine in a separate Python process and read its results back (no Qt, no app).

Slicer's GUI must stay responsive while a registration runs for minutes, and torch must never be
imported into the application itself. So the engine runs as ``python -m samir.cli register ...
--progress json`` (Slicer: ``PythonSlicer``) in its own process group; a reader thread queues its
output lines, and :meth:`EngineProcess.poll` — called from the GUI's timer, or in a loop by
:meth:`EngineProcess.wait` — turns them into progress reports and log lines on the caller's thread.
:meth:`EngineProcess.cancel` kills the whole process tree. Inputs are written to, and outputs read
from, a private work folder, so a cancelled or failed run never touches the scene.

:class:`EngineRun` bundles the three steps (write inputs, run, read outputs) behind ``start`` /
``poll`` / ``cancel`` / ``outputs``; :class:`InProcessEngineRun` does the same in this process (for
scripts and tests that already have torch).
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import samir
import SimpleITK as sitk
from samir.geometry import SAMIRInputError, Volume, from_sitk, to_sitk
from samir import options

LogCallback = Callable[[str], None]


# Relative cost of each engine stage, for one percentage bar over the stages a run goes through.
STAGE_WEIGHTS = {"align": 4.0, "resample": 2.0, "load encoder": 3.0, "encode fixed": 10.0, "encode moving": 10.0, "network": 8.0,
                 "search": 5.0, "optimise": 60.0, "write outputs": 5.0}


def stage_spans(stages: Sequence[str]) -> Dict[str, tuple]:
    """``{stage: (start, end)}`` fractions of the whole run for the given stages, in order."""
    total = sum(STAGE_WEIGHTS[stage] for stage in stages)
    spans, start = {}, 0.0
    for stage in stages:
        end = start + STAGE_WEIGHTS[stage] / total
        spans[stage] = (start, end)
        start = end
    return spans


class EngineSettings:
    """A registration's options for the engine process: any option of the engine's schema
    (:data:`samir.options.OPTIONS`) by its name — ``None`` leaves it to the engine (the preset's value)
    — plus ``threads``, the engine process's CPU threads (``None``: all cores). Validation, the command
    line and the stages a run goes through are the schema's, so they cannot disagree with the engine."""

    def __init__(self, threads: Optional[int] = None, **values):
        unknown = set(values) - set(options.OPTION)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(sorted(unknown))}; the options are"
                            f" {', '.join(options.OPTION)}")
        self.__dict__["threads"] = threads
        self.__dict__["values"] = {**options.defaults(), **values}

    def __getattr__(self, name: str):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"EngineSettings has no option '{name}'")

    def __setattr__(self, name: str, value) -> None:
        if name in options.OPTION:
            self.values[name] = value
        elif name == "threads":
            self.__dict__["threads"] = value
        else:
            raise AttributeError(f"EngineSettings has no option '{name}'")

    def __eq__(self, other) -> bool:
        return isinstance(other, EngineSettings) and (self.values, self.threads) == (other.values, other.threads)

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.values.items() if v != options.default(k)}
        return f"EngineSettings({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    def validate(self) -> None:
        """Raise :class:`SAMIRInputError` for what the engine would refuse (before any process starts)."""
        options.check_values(self.values)
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise SAMIRInputError(f"threads must be a positive whole number, got {self.threads!r}")

    @property
    def uses_encoder(self) -> bool:
        return "load encoder" in self.stages()

    def cli_arguments(self) -> List[str]:
        return options.command_line(self.values)

    def register_options(self):
        """The same settings as a :class:`samir.register.RegistrationOptions` (imports torch)."""
        from samir.register import RegistrationOptions
        return RegistrationOptions.from_values(self.values)

    def stages(self) -> List[str]:
        """The engine stages a run with these settings reports, in order."""
        return options.planned_stages(self.values)

    def stage_spans(self) -> Dict[str, tuple]:
        return stage_spans(self.stages())


@dataclass
class EngineProgress:
    stage: str
    stage_fraction: float
    overall_fraction: float
    elapsed_s: float


class RunState(str, Enum):
    NOT_STARTED = "not started"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)


def engine_package_folder() -> Path:
    """Folder that holds the ``samir`` package (goes on the engine process's PYTHONPATH)."""
    return Path(samir.__file__).resolve().parent.parent


def default_python_executable(search_folders: Sequence[Path] = ()) -> str:
    """``PythonSlicer`` (Slicer's Python with Slicer's environment): on the PATH or in ``search_folders``
    (Slicer's ``bin``); outside Slicer, this interpreter. Raises :class:`SAMIRInputError` when neither is
    found (inside Slicer ``sys.executable`` is the application, not a Python)."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    for folder in search_folders:
        for name in ("PythonSlicer.exe", "PythonSlicer"):
            if (Path(folder) / name).is_file():
                return str(Path(folder) / name)
    if sys.executable and Path(sys.executable).name.lower().startswith("python"):
        return sys.executable
    looked = ", ".join(["PATH", *map(str, search_folders)])
    raise SAMIRInputError(f"PythonSlicer not found (looked in {looked}): the SAMIR engine runs in Slicer's own"
                          " Python, PythonSlicer, which every Slicer installation has in its bin folder; reinstall"
                          " Slicer if it is missing")


def engine_environment(base: Optional[Dict[str, str]] = None, threads: Optional[int] = None) -> Dict[str, str]:
    env = dict(os.environ if base is None else base)
    folder = str(engine_package_folder())
    env["PYTHONPATH"] = folder + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if threads:
        env["SAMIR_THREADS"] = str(int(threads))
        env["OMP_NUM_THREADS"] = str(int(threads))
    return env


def engine_command(python_executable: str, fixed_path: Path, moving_path: Path, out_dir: Path,
                   settings: EngineSettings) -> List[str]:
    return [python_executable, "-m", "samir.cli", "register", str(fixed_path), str(moving_path), "--out", str(out_dir),
            "--progress", "json", *settings.cli_arguments()]


def parse_progress_line(line: str) -> Optional[dict]:
    """``{"stage", "fraction", "elapsed_s"}`` of a ``--progress json`` line, or ``None`` for other output."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict) or "stage" not in record or "fraction" not in record:
        return None
    return record


def overall_fraction(stage: str, fraction: float, spans: Dict[str, tuple]) -> Optional[float]:
    if stage not in spans:
        return None
    start, end = spans[stage]
    return start + (end - start) * min(1.0, max(0.0, float(fraction)))


def wait_until_finished(task, timeout_s: Optional[float] = None, what: str = "task",
                        pause: Callable[[], None] = lambda: time.sleep(0.05)) -> RunState:
    """Poll ``task`` (``poll()``, ``cancel()``, ``state``, ``error_message``) until it finishes or
    ``timeout_s`` passes, calling ``pause`` between polls (the Slicer module processes GUI events
    there). A task stopped by the timeout is cancelled, which leaves the scene as it was."""
    deadline = None if timeout_s is None else time.perf_counter() + timeout_s
    while not task.poll().finished:
        if deadline is not None and time.perf_counter() > deadline:
            task.cancel()
            task.error_message = f"the {what} did not finish within {timeout_s:.0f} s and was stopped"
            break
        pause()
    return task.state


class EngineProcess:
    """One command in its own process group; output lines parsed into log and progress on ``poll``."""

    ERROR_PREFIX = "samir: error:"

    def __init__(self, command: Sequence[str], environment: Optional[Dict[str, str]] = None,
                 working_directory: Optional[Path] = None, on_log: Optional[LogCallback] = None,
                 on_progress: Optional[Callable[[EngineProgress], None]] = None,
                 stage_spans: Optional[Dict[str, tuple]] = None):
        self.command = [str(part) for part in command]
        self.environment = environment
        self.working_directory = working_directory
        self.on_log = on_log
        self.on_progress = on_progress
        self.stage_spans = stage_spans or EngineSettings().stage_spans()
        self.state = RunState.NOT_STARTED
        self.return_code: Optional[int] = None
        self.error_message = ""
        self.log_lines: List[str] = []
        self.progress: Optional[EngineProgress] = None
        self._process: Optional[subprocess.Popen] = None
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader: Optional[threading.Thread] = None
        self._started_at = 0.0
        self._best_fraction = 0.0

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        if self.state != RunState.NOT_STARTED:
            raise RuntimeError("an EngineProcess can be started only once")
        options = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                       env=self.environment, cwd=str(self.working_directory) if self.working_directory else None,
                       text=True, encoding="utf-8", errors="replace", bufsize=1)
        if os.name == "nt":
            info = subprocess.STARTUPINFO()
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # no console window
            options.update(startupinfo=info, creationflags=subprocess.CREATE_NEW_PROCESS_GROUP)
        else:
            options.update(start_new_session=True)  # own process group: cancel kills the whole tree
        self._started_at = time.perf_counter()
        try:
            self._process = subprocess.Popen(self.command, **options)
        except OSError as exc:
            self.state = RunState.FAILED
            self.error_message = f"could not start the SAMIR engine ({self.command[0]}): {exc}"
            raise SAMIRInputError(self.error_message) from None
        self.state = RunState.RUNNING
        self._reader = threading.Thread(target=self._read_output, name="SAMIR engine output", daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        stream = self._process.stdout
        for line in iter(stream.readline, ""):
            self._lines.put(line.rstrip("\r\n"))
        stream.close()
        self._lines.put(None)  # end of output

    def poll(self) -> RunState:
        """Handle the output that arrived (callbacks run on this thread); return the state."""
        if self.state != RunState.RUNNING:
            return self.state
        finished_output = False
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                finished_output = True
                break
            self._handle_line(line)
        if finished_output:
            self.return_code = self._process.wait()
            if self.state == RunState.RUNNING:  # not cancelled meanwhile
                self._finish()
        return self.state

    def wait(self, timeout_s: Optional[float] = None) -> RunState:
        return wait_until_finished(self, timeout_s, "SAMIR engine")

    def cancel(self) -> None:
        """Kill the process and all its children; the state becomes CANCELLED."""
        if self.state != RunState.RUNNING:
            return
        self.state = RunState.CANCELLED
        kill_process_tree(self._process)
        try:
            self.return_code = self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._log("Registration cancelled.")

    def _handle_line(self, line: str) -> None:
        record = parse_progress_line(line)
        if record is None:
            if line.startswith(self.ERROR_PREFIX):
                self.error_message = line[len(self.ERROR_PREFIX):].strip()
            self._log(line)
            return
        stage, fraction = str(record["stage"]), float(record["fraction"])
        overall = overall_fraction(stage, fraction, self.stage_spans)
        if overall is None:
            overall = self._best_fraction
        self._best_fraction = max(self._best_fraction, overall)  # never goes back
        self.progress = EngineProgress(stage, fraction, self._best_fraction,
                                       float(record.get("elapsed_s", time.perf_counter() - self._started_at)))
        if self.on_progress:
            self.on_progress(self.progress)

    def _log(self, line: str) -> None:
        self.log_lines.append(line)
        if self.on_log:
            self.on_log(line)

    def _finish(self) -> None:
        if self.return_code == 0:
            self.state = RunState.SUCCEEDED
            return
        self.state = RunState.FAILED
        if not self.error_message:
            tail = "\n".join(line for line in self.log_lines[-15:] if line.strip())
            self.error_message = f"the SAMIR engine stopped with exit code {self.return_code}" + (f":\n{tail}" if tail else "")


def kill_process_tree(process: subprocess.Popen) -> None:
    """Kill ``process`` and everything it started (its process group on POSIX, ``taskkill /T`` on Windows)."""
    if os.name == "nt":
        if process.poll() is None:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
        return
    try:  # started with start_new_session: the group id is the leader's pid, even after the leader exited
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if process.poll() is None:
            process.kill()


# ---------------------------------------------------------------------------------------------
# inputs and outputs


@dataclass
class EngineOutputs:
    """What a registration produced, on the fixed grid."""

    displacement_lps: np.ndarray  # (D, H, W, 3) float32, LPS mm, fixed point -> moving point
    grid: Volume  # the fixed grid (geometry; its array is the fixed image or a placeholder)
    warped: Optional[Volume] = None
    jacobian: Optional[Volume] = None
    summary: Dict[str, object] = field(default_factory=dict)

    @property
    def sdlogj(self) -> float:
        return float(self.summary.get("sdlogj", float("nan")))

    @property
    def folding_percent(self) -> float:
        return float(self.summary.get("folding_percent", float("nan")))


INPUT_FILES = {"fixed": "fixed.nrrd", "moving": "moving.nrrd"}


def write_engine_inputs(folder: Path, fixed: Volume, moving: Volume) -> Dict[str, Path]:
    """Write the two volumes for the engine (NRRD keeps the exact geometry); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, volume in (("fixed", fixed), ("moving", moving)):
        paths[role] = folder / INPUT_FILES[role]
        sitk.WriteImage(to_sitk(volume), str(paths[role]), useCompression=False)
    return paths


def _read_on_grid(path: Path, grid: Volume, vector: bool = False) -> Volume:
    image = sitk.ReadImage(str(path))
    volume = from_sitk(image, name=path.name)
    if volume.array.shape[:3] != tuple(grid.shape[-3:]) or not np.allclose(volume.spacing, grid.spacing, rtol=1e-4):
        raise SAMIRInputError(f"engine output '{path.name}' is not on the fixed grid: shape {volume.array.shape},"
                              f" spacing {volume.spacing} (expected {tuple(grid.shape[-3:])}, {grid.spacing})")
    # keep the exact fixed geometry (NIfTI stores it in single precision)
    return grid.with_array(volume.array, name=path.name) if not vector else Volume(
        volume.array, grid.spacing, grid.origin, grid.direction, path.name)


def read_engine_outputs(out_dir: Path, fixed: Volume) -> EngineOutputs:
    """Read the engine's output folder (``samir.pipeline.OUTPUT_FILES``) back, on ``fixed``'s exact grid."""
    out_dir = Path(out_dir)
    summary_path = out_dir / "summary.json"
    if not summary_path.is_file():
        raise SAMIRInputError(f"the engine wrote no summary in '{out_dir}'")
    summary = json.loads(summary_path.read_text())
    displacement = _read_on_grid(out_dir / "displacement.nii.gz", fixed, vector=True).array.astype(np.float32)
    warped = _read_on_grid(out_dir / "warped.nii.gz", fixed) if (out_dir / "warped.nii.gz").is_file() else None
    jacobian = _read_on_grid(out_dir / "jacobian.nii.gz", fixed) if (out_dir / "jacobian.nii.gz").is_file() else None
    return EngineOutputs(displacement, fixed, warped, jacobian, summary)


# ---------------------------------------------------------------------------------------------
# one registration, behind start / poll / cancel


class EngineRun:
    """Register ``moving`` to ``fixed``: ``start()``, then ``poll()`` until finished, then ``outputs``."""

    def __init__(self, fixed: Volume, moving: Volume, settings: EngineSettings,
                 on_log: Optional[LogCallback] = None, on_progress: Optional[Callable[[EngineProgress], None]] = None):
        self.fixed, self.moving, self.settings = fixed, moving, settings
        self.on_log, self.on_progress = on_log, on_progress
        self.state = RunState.NOT_STARTED
        self.outputs: Optional[EngineOutputs] = None
        self.error_message = ""

    def start(self) -> None:
        raise NotImplementedError

    def poll(self) -> RunState:
        return self.state

    def cancel(self) -> None:
        if not self.state.finished:
            self.state = RunState.CANCELLED

    def wait(self, timeout_s: Optional[float] = None) -> RunState:
        return wait_until_finished(self, timeout_s, "SAMIR engine")

    def _log(self, text: str) -> None:
        if self.on_log:
            self.on_log(text)


class SubprocessEngineRun(EngineRun):
    """The engine's command line in a separate process (what Slicer uses)."""

    def __init__(self, fixed: Volume, moving: Volume, settings: EngineSettings,
                 on_log: Optional[LogCallback] = None, on_progress: Optional[Callable[[EngineProgress], None]] = None,
                 python_executable: Optional[str] = None, environment: Optional[Dict[str, str]] = None,
                 work_folder: Optional[Path] = None, keep_work_folder: bool = False):
        super().__init__(fixed, moving, settings, on_log, on_progress)
        self.python_executable = python_executable or default_python_executable()
        self.environment = environment
        self.work_folder_base = work_folder
        self.keep_work_folder = keep_work_folder
        self.work_folder: Optional[Path] = None
        self.process: Optional[EngineProcess] = None

    def start(self) -> None:
        self.settings.validate()
        self.work_folder = Path(tempfile.mkdtemp(prefix="samir-", dir=self.work_folder_base))
        try:
            paths = write_engine_inputs(self.work_folder / "inputs", self.fixed, self.moving)
            command = engine_command(self.python_executable, paths["fixed"], paths["moving"],
                                     self.work_folder / "outputs", self.settings)
            self._log("Running: " + " ".join(command))
            self.process = EngineProcess(command, engine_environment(self.environment, self.settings.threads),
                                         self.work_folder, self.on_log, self.on_progress, self.settings.stage_spans())
            self.process.start()
        except Exception:
            self._cleanup()
            raise
        self.state = RunState.RUNNING

    def poll(self) -> RunState:
        if self.state != RunState.RUNNING:
            return self.state
        process_state = self.process.poll()
        if process_state == RunState.SUCCEEDED:
            try:
                self.outputs = read_engine_outputs(self.work_folder / "outputs", self.fixed)
                self.state = RunState.SUCCEEDED
            except Exception as exc:  # unreadable outputs are a failed run
                self.error_message = f"could not read the engine's outputs: {exc}"
                self.state = RunState.FAILED
            self._cleanup()
        elif process_state in (RunState.FAILED, RunState.CANCELLED):
            self.error_message = self.process.error_message
            self.state = process_state
            self._cleanup()
        return self.state

    def cancel(self) -> None:
        if self.state == RunState.RUNNING:
            self.process.cancel()
            self.state = RunState.CANCELLED
            self._cleanup()

    def _cleanup(self) -> None:
        if self.work_folder is not None and not self.keep_work_folder:
            shutil.rmtree(self.work_folder, ignore_errors=True)


class InProcessEngineRun(EngineRun):
    """The engine in this process, synchronously inside ``start()`` (needs torch here)."""

    def start(self) -> None:
        self.settings.validate()
        from samir.register import register
        from samir.resampling import warp_volume
        self.state = RunState.RUNNING
        spans = self.settings.stage_spans()
        started = time.perf_counter()

        def report(stage: str, fraction: float) -> None:
            overall = overall_fraction(stage, fraction, spans)
            if self.on_progress and overall is not None:
                self.on_progress(EngineProgress(stage, fraction, overall, time.perf_counter() - started))

        try:
            result = register(self.fixed, self.moving, self.settings.register_options(), progress=report)
            displacement = result.displacement_lps
            warped = warp_volume(self.moving, self.fixed, displacement, device=result.info["device"])
            summary = {"sdlogj": result.sdlogj, "folding_percent": result.folding_percent, **result.info,
                       "timings_s": result.timings}
            self.outputs = EngineOutputs(displacement, self.fixed, warped,
                                         self.fixed.with_array(result.jacobian.astype(np.float32)), summary)
            self.state = RunState.SUCCEEDED
        except Exception as exc:
            self.error_message = str(exc)
            self.state = RunState.FAILED
