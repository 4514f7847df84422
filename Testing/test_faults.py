"""Faults during a run: Ctrl-C / SIGTERM at any stage, two runs into one output folder, a disk that
fills up or an output that cannot be written. Each leaves no output folder that did not exist, no
staging folder or lock, and an existing output folder exactly as it was (byte for byte).

The registrations are tiny (20 x 22 x 24 voxels, a few iterations); the interruptions run the
command line in a separate process, the other faults are injected in this one.
"""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
from samir import io
from samir.cli import main
from samir.geometry import SAMIRInputError

from conftest import smooth_random_volume

REPOSITORY = Path(__file__).resolve().parents[1]
QUICK = ["--preset", "fast", "--alignment", "none", "--device", "cpu", "--progress", "none", "--iterations", "4,4"]
posix_only = pytest.mark.skipif(os.name == "nt", reason="sends POSIX signals to a child process")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults-pair")
    paths = {}
    for name, seed in (("fixed", 0), ("moving", 1)):
        image = sitk.GetImageFromArray(smooth_random_volume((20, 22, 24), seed=seed))
        image.SetSpacing((2.0, 2.0, 2.0))
        paths[name] = folder / f"{name}.nii.gz"
        sitk.WriteImage(image, str(paths[name]))
    return paths


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def earlier_outputs(folder: Path) -> dict:
    """An output folder as an earlier run left it (with a segmentation this run will not have)."""
    folder.mkdir(parents=True)
    for name in ("transform.h5", "warped.nii.gz", "warped_seg.nii.gz", "summary.json", "notes.txt"):
        (folder / name).write_bytes(f"earlier {name}".encode())
    return snapshot(folder)


def leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".previous-" in p.name
                  or p.name.endswith(".samir-lock"))


# ------------------------------------------------------------------------------------------------ interruption


def run_until_optimising(args, tmp_path):
    """Start ``samir register`` in a child process; return it once it reports the optimisation stage."""
    env = dict(os.environ, PYTHONPATH=str(REPOSITORY / "SAMIRRegistration"), SAMIR_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "samir.cli", "register", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    for line in process.stdout:
        if '"stage": "optimise"' in line or time.time() > deadline:
            break
    return process


@posix_only
@pytest.mark.parametrize("signal_name, exit_code, out_exists", [("SIGINT", 130, False), ("SIGTERM", 143, True)])
def test_interrupt_while_registering_leaves_nothing_and_prints_one_line(pair, tmp_path, signal_name, exit_code,
                                                                       out_exists):
    out = tmp_path / "results" / "out"  # SIGINT: neither folder exists; SIGTERM: an earlier run's folder
    before = earlier_outputs(out) if out_exists else None
    args = [str(pair["fixed"]), str(pair["moving"]), "--out", str(out), *QUICK[:-4], "--progress", "json",
            "--iterations", "2000,2000,2000"]
    process = run_until_optimising(args, tmp_path)
    process.send_signal(getattr(signal, signal_name))
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == exit_code, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    interrupt = "Ctrl-C" if signal_name == "SIGINT" else "SIGTERM"
    assert lines == [f"samir: interrupted ({interrupt}): no outputs were written, '{out}' is as it was"], stderr
    if out_exists:
        assert snapshot(out) == before and leftovers(out.parent) == []
    else:
        assert sorted(os.listdir(tmp_path)) == []  # not even the parent folder made for it


@pytest.mark.parametrize("fault", ["KeyboardInterrupt", "Ctrl-C held back", "OSError"])
@pytest.mark.parametrize("call", [1, 4, 7])  # 4 earlier outputs are moved aside (calls 1-4), then 3 new files in
def test_a_fault_while_moving_files_into_place_puts_everything_back(tmp_path, monkeypatch, fault, call):
    out = tmp_path / "out"
    before = earlier_outputs(out)
    replace, calls = os.replace, []

    def failing_replace(source, target):
        calls.append(source)
        if len(calls) == call:
            if fault == "KeyboardInterrupt":
                raise KeyboardInterrupt
            if fault == "OSError":
                raise OSError(errno.ENOSPC, "No space left on device")
            signal.raise_signal(signal.SIGINT)  # held back until the move is done, then undone
        replace(source, target)

    monkeypatch.setattr(io.os, "replace", failing_replace)
    expected = SAMIRInputError if fault == "OSError" else KeyboardInterrupt
    with pytest.raises(expected) as error:
        with io.staged_output_dir(out, replaces=["warped_seg.nii.gz"]) as stage:
            for name in ("transform.h5", "warped.nii.gz", "summary.json"):
                (stage / name).write_text(f"new {name}")
    assert snapshot(out) == before and leftovers(tmp_path) == []
    if fault == "Ctrl-C held back":  # the move was not stopped half-way: all 7 moves, then all 7 undone
        assert len(calls) == 14
    if fault == "OSError":
        assert isinstance(error.value, io.SAMIROutputError)
        assert str(error.value) == (f"could not write the outputs into '{out}' (No space left on device);"
                                    " it is as it was")


@pytest.mark.parametrize("existing", [True, False])
def test_an_interrupt_while_writing_the_outputs_leaves_the_folder_as_it_was(tmp_path, existing):
    out = tmp_path / "new" / "out"
    before = earlier_outputs(out) if existing else None
    with pytest.raises(KeyboardInterrupt):
        with io.staged_output_dir(out) as stage:
            (stage / "transform.h5").write_text("new")
            raise KeyboardInterrupt
    if existing:
        assert snapshot(out) == before and leftovers(out.parent) == []
    else:
        assert os.listdir(tmp_path) == []


def test_a_new_run_replaces_every_earlier_output_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    earlier_outputs(out)
    with io.staged_output_dir(out, replaces=["warped_seg.nii.gz"]) as stage:
        for name in ("transform.h5", "warped.nii.gz", "summary.json"):
            (stage / name).write_text(f"new {name}")
    # the earlier warped_seg.nii.gz would belong to another registration: it goes; the user's own file stays
    assert {name: data for name, (data, _) in snapshot(out).items()} == {
        "transform.h5": b"new transform.h5", "warped.nii.gz": b"new warped.nii.gz", "summary.json": b"new summary.json",
        "notes.txt": b"earlier notes.txt"}
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ disk full


def test_disk_full_while_writing_keeps_the_earlier_outputs(pair, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["register", str(pair["fixed"]), str(pair["moving"]), "--out", str(out), *QUICK]
    assert main(args) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert set(before) == {"transform.h5", "displacement.nii.gz", "warped.nii.gz", "jacobian.nii.gz", "summary.json"}
    write = sitk.WriteImage

    def fills_the_disk(image, path, *rest, **options):  # ITK wrote part of the file and said nothing
        write(image, path, *rest, **options)
        if Path(path).name == "warped.nii.gz":
            Path(path).write_bytes(Path(path).read_bytes()[:200])

    monkeypatch.setattr(io.sitk, "WriteImage", fills_the_disk)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("samir: error: 'warped.nii.gz' was written incompletely (is the disk"
                                               " full?)"), err
    assert snapshot(out) == before and leftovers(tmp_path) == []

    def no_space(image, path, *rest, **options):
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute:\nsitk::ERROR: No space left on"
                           " device")

    monkeypatch.setattr(io.sitk, "WriteImage", no_space)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["samir: error: could not write 'displacement.nii.gz': No space left on device"], err
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_an_output_folder_that_cannot_be_made_is_refused_before_registering(pair, tmp_path, capsys):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    started = time.perf_counter()
    code = main(["register", str(pair["fixed"]), str(pair["moving"]), "--out", str(blocker / "out"), *QUICK])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"samir: error: cannot write into '{blocker}': Not a directory"], err
    assert time.perf_counter() - started < 2.0  # refused before reading and registering
    assert sorted(os.listdir(tmp_path)) == ["a file"]


# ------------------------------------------------------------------------------------------------ two runs


def test_a_second_run_into_the_same_folder_is_refused_and_a_dead_runs_lock_is_taken_over(pair, tmp_path, capsys):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        io.lock_path(out).write_text(f'{{"pid": {sleeper.pid}, "host": "{io.socket.gethostname()}",'
                                     f' "started": "2030-01-01 08:00:00"}}')
        code = main(["register", str(pair["fixed"]), str(pair["moving"]), "--out", str(out), *QUICK])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith(f"samir: error: output folder '{out}' is being written by another samir run"
                                            f" (process {sleeper.pid} on {io.socket.gethostname()}, since"
                                            " 2030-01-01 08:00:00)"), err
        assert not out.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # that process is gone: its lock and its half-made staging folder are cleared by the next run
    (tmp_path / ".out.partial-dead").mkdir()
    (tmp_path / ".out.partial-dead" / "warped.nii.gz").write_text("half")
    assert main(["register", str(pair["fixed"]), str(pair["moving"]), "--out", str(out), *QUICK]) == 0
    assert leftovers(tmp_path) == [] and (out / "summary.json").is_file()


def test_two_processes_taking_the_lock_at_once_one_wins(tmp_path):
    code = """
import sys, time
from pathlib import Path
from samir.io import output_folder_lock
from samir.geometry import SAMIRInputError
print("ready", flush=True)
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
try:
    with output_folder_lock(sys.argv[1]):
        print("took it", flush=True)
        time.sleep(1.0)
except SAMIRInputError as exc:
    print("refused:", exc, flush=True)
"""
    env = dict(os.environ, PYTHONPATH=str(REPOSITORY / "SAMIRRegistration"))
    out, go = tmp_path / "out", tmp_path / "go"
    processes = [subprocess.Popen([sys.executable, "-c", code, str(out), str(go)], env=env, stdout=subprocess.PIPE,
                                  text=True) for _ in range(3)]
    assert [p.stdout.readline().strip() for p in processes] == ["ready"] * 3
    go.touch()  # all three try at once
    results = sorted(p.communicate(timeout=60)[0].strip() for p in processes)
    assert results[-1] == "took it" and all(r.startswith("refused: output folder") for r in results[:-1]), results
    assert sorted(os.listdir(tmp_path)) == ["go"]  # the lock went with its holder
