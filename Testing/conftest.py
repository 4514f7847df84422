import os

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_report_header(config):
    """Which Slicer the bridge tests stand for (slicer-core 5.12 = the stable Slicer, 5.13 = the preview)."""
    import importlib.metadata
    try:
        import vtk
        return (f"slicer-core {importlib.metadata.version('slicer-core')} (VTK {vtk.vtkVersion.GetVTKVersion()})"
                f" from {os.path.dirname(importlib.import_module('slicer_core').__file__)}")
    except Exception as exc:  # noqa: BLE001 - a header only
        return f"slicer-core: not available ({exc})"


@pytest.fixture(scope="session", autouse=True)
def hermetic_cache_dirs(tmp_path_factory):
    """Never write to the user's real cache folders, and never download encoder weights in tests.

    Session-scoped so that module- and session-scoped fixtures (which run before function-scoped
    ones) see it too; tests that need a fresh folder set their own with ``monkeypatch.setenv``.
    """
    root = tmp_path_factory.mktemp("user-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root))
        patch.setenv("SAMIR_CACHE_DIR", str(root / "samir" / "features"))
        patch.setenv("SAMIR_WEIGHTS_DIR", str(root / "samir" / "weights"))
        patch.setenv("SAMIR_OFFLINE", "1")
        yield root


@pytest.fixture(scope="session")
def demo_pair():
    """MNI152 at 4 mm (nilearn wheel) and a deformed, contrast-changed, noisy copy with GM/WM labels."""
    from samir.demo import make_demo_pair
    return make_demo_pair(resolution=4, max_mm=12.0, seed=3)


@pytest.fixture(scope="session")
def demo_files(demo_pair, tmp_path_factory):
    from samir.io import write_volume
    folder = tmp_path_factory.mktemp("pair")
    paths = {}
    for key in ("fixed", "moving", "fixed_seg", "moving_seg"):
        paths[key] = folder / f"{key}.nii.gz"
        write_volume(demo_pair[key], paths[key])
    return paths


def smooth_random_volume(shape, seed=0, blobs=12):
    """A smooth random test image in [0, 1]."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    out = np.zeros(shape, np.float32)
    for _ in range(blobs):
        c = [rng.uniform(0, n) for n in shape]
        r = rng.uniform(2, max(3, min(shape) / 3))
        out += np.exp(-((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) / (2 * r * r))
    return out / out.max()


@pytest.fixture(scope="module")
def single_thread():
    """Torch on one thread for the module's tests (tiny tensors: faster, and bit-reproducible)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
