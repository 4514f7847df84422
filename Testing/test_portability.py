"""Windows and macOS: nothing Unix-only at import time, memory numbers in the right units everywhere.

Most 3D Slicer users run Windows, where ``resource``, ``fcntl``, ``termios``, ``pwd`` and ``grp`` do not
exist; the engine runs there as ``python -m samir.cli``. These tests make those modules unimportable
in a fresh interpreter and import every engine and bridge module, then run ``samir --help``.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
POSIX_ONLY = ("resource", "fcntl", "termios", "pwd", "grp")

BLOCKER = textwrap.dedent(f"""
    import sys
    BLOCKED = {POSIX_ONLY!r}
    class NotOnWindows:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named '{{name}}' (made unimportable: Windows has none)")
            return None
    for name in BLOCKED:
        sys.modules.pop(name, None)
    sys.meta_path.insert(0, NotOnWindows())
""")


def run_python(code: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter without the POSIX-only modules. psutil is imported first: its
    Linux back end needs ``resource``, its Windows one does not."""
    env = dict(os.environ, PYTHONPATH=str(REPOSITORY / "SAMIRRegistration"))
    return subprocess.run([sys.executable, "-c", "import psutil\n" + BLOCKER + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_blocker_really_blocks_the_posix_modules():
    result = run_python("""
        failed = []
        for name in BLOCKED:
            try:
                __import__(name)
            except ModuleNotFoundError:
                failed.append(name)
        print(sorted(failed))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(sorted(POSIX_ONLY))


def test_every_engine_and_bridge_module_imports_and_samir_help_runs_without_posix_modules():
    pytest.importorskip("slicer")
    result = run_python("""
        import importlib, pkgutil
        import samir, SAMIRRegistrationLib
        names = []
        for package in (samir, SAMIRRegistrationLib):
            for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
                if info.name.endswith(".__main__"):  # importing it runs the command line
                    continue
                importlib.import_module(info.name)
                names.append(info.name)
        print("imported", len(names))
        from samir.cli import main
        try:
            main(["--help"])
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        from samir.resources import available_host_memory_mb, host_peak_rss_mb
        print("memory", host_peak_rss_mb() > 0, available_host_memory_mb() > 0)
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    imported = int(next(line for line in lines if line.startswith("imported")).split()[1])
    engine_modules = len(list((REPOSITORY / "SAMIRRegistration" / "samir").glob("*.py"))) - 2  # not __init__, __main__
    bridge_modules = len(list((REPOSITORY / "SAMIRRegistration" / "SAMIRRegistrationLib").glob("*.py"))) - 1
    assert imported == engine_modules + bridge_modules
    assert "usage: samir" in result.stdout and "register" in result.stdout
    assert "memory True True" in result.stdout


ALLOCATE = """
    import numpy as np
    block = np.ones(300 * 2 ** 20 // 8)  # 300 MB, touched
    from samir.resources import host_peak_rss_mb
    print(host_peak_rss_mb())
"""


def test_peak_rss_is_in_megabytes_with_getrusage():
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(ALLOCATE)], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPOSITORY / "SAMIRRegistration")), timeout=900)
    assert result.returncode == 0, result.stderr
    peak = float(result.stdout.strip())
    # the 300 MB block plus an interpreter with torch-free numpy: a unit mistake (bytes/kB) is off 1000x
    assert 300 <= peak < 4000


def test_peak_rss_without_resource_comes_from_psutil_in_megabytes():
    result = run_python(ALLOCATE)
    assert result.returncode == 0, result.stderr
    assert 300 <= float(result.stdout.strip()) < 4000


def test_ru_maxrss_is_bytes_on_macos_and_kilobytes_elsewhere():
    from samir.resources import host_peak_rss_mb
    linux, mac = host_peak_rss_mb("linux"), host_peak_rss_mb("darwin")
    assert linux == pytest.approx(1024 * mac, rel=0.05)
    assert linux > 50  # this process holds torch: tens of MB at least, in megabytes


def test_available_memory_agrees_with_the_kernel_and_honours_a_container_limit(monkeypatch):
    from samir import resources
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        pytest.skip("Linux only")
    kernel = next(int(line.split()[1]) / 1024 for line in meminfo.read_text().splitlines()
                  if line.startswith("MemAvailable:"))
    monkeypatch.setattr(resources, "_cgroup_available_mb", lambda: float("inf"))
    assert resources.available_host_memory_mb() == pytest.approx(kernel, rel=0.2)
    monkeypatch.setattr(resources, "_cgroup_available_mb", lambda: 1234.0)
    assert resources.available_host_memory_mb() == pytest.approx(min(kernel, 1234.0))
