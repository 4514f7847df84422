"""Devices and memory: choosing a working device, surviving out-of-memory, refusing what cannot fit.

* :func:`resolve_device`: ``auto`` = CUDA if present *and working*, else Apple MPS if it passes a
  numerical self-check against the CPU, else CPU.
* :func:`run_with_oom_fallback`: run a step with smaller batches and then on the CPU when the GPU
  runs out of memory, logging what was done (the run's ``notes``).
* :func:`estimate_peak_memory_mb` / :func:`check_host_memory`: refuse a volume whose estimated
  peak host memory exceeds what is available, with the estimate and what to do instead, rather
  than being killed by the operating system half-way.
* :func:`host_peak_rss_mb` / :func:`available_host_memory_mb`: the same numbers on Linux, macOS and
  Windows (most Slicer users run Windows, which has no ``resource`` module: it is imported only
  where it exists).
"""
from __future__ import annotations

import logging
import math
import sys
from typing import Callable, List, Optional, Sequence, TypeVar

import torch
import torch.nn.functional as F

from .geometry import SAMIRInputError

log = logging.getLogger("samir")
T = TypeVar("T")

# Peak host memory model, fitted on measured runs (bench/README, "Design notes") and kept conservative:
# a fixed runtime cost, per voxel of the full grid (images, field, Jacobian, outputs) and per voxel of
# the finest optimised level (autograd of warping and scaling and squaring).
BASE_MB = 700.0
BYTES_PER_VOXEL = 240.0
BYTES_PER_OPTIMISED_VOXEL = 600.0
BYTES_PER_IMAGE_LOSS_VOXEL = 170.0  # the full-resolution stage: field, warped image and NCC statistics with autograd
BYTES_PER_NETWORK_VOXEL = 500.0  # head inference at full resolution (slabs, channel groups)
FEATURE_BYTES_PER_SLICE = 256 * 64 * 64 * 2 * 3  # fp16 features of one slice, and their reduction


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _free_device_memory(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def mps_self_check() -> bool:
    """MPS gives the CPU's answer on the operations the engine relies on (grid sampling, 3D conv)."""
    try:
        if not torch.backends.mps.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        x = torch.rand((1, 2, 6, 7, 8), generator=g)
        grid = torch.rand((1, 6, 7, 8, 3), generator=g) * 2 - 1
        weight = torch.rand((3, 2, 3, 3, 3), generator=g)
        expected = F.conv3d(F.grid_sample(x, grid, align_corners=False), weight, padding=1)
        got = F.conv3d(F.grid_sample(x.to("mps"), grid.to("mps"), align_corners=False), weight.to("mps"), padding=1)
        return bool(torch.allclose(expected, got.cpu(), atol=1e-4, rtol=1e-4))
    except Exception:  # any failure means "do not use it"
        return False


def cuda_works(device: str = "cuda") -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        torch.zeros(1, device=device).add_(1).item()
        return True
    except Exception:
        return False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if cuda_works():
            return torch.device("cuda")
        if mps_self_check():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not mps_self_check():
            raise SAMIRInputError("device 'mps' was requested but Apple MPS is not available here or failed its"
                                  " numerical self-check; use --device cpu or auto")
        return torch.device("mps")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SAMIRInputError(f"device '{name}' was requested but CUDA is not available here; use --device cpu or auto")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise SAMIRInputError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SAMIRInputError(f"device '{name}' does not exist: {torch.cuda.device_count()} CUDA device(s) found")
        if not cuda_works(name):
            raise SAMIRInputError(f"device '{name}' is present but does not work (driver or memory problem);"
                                  " use --device cpu")
        return dev
    raise SAMIRInputError(f"unknown device '{name}'; use auto, cpu, mps, cuda or cuda:N")


def run_with_oom_fallback(step: Callable[[torch.device, int], T], device: torch.device, batch_size: int,
                          what: str, notes: List[str]) -> T:
    """``step(device, batch_size)``; on out-of-memory, halve the batch down to 1, then use the CPU.

    Each retry is logged and appended to ``notes`` so the run's summary says what was done.
    """
    batch = max(1, int(batch_size))
    while True:
        try:
            return step(device, batch)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not _is_oom(exc):
                raise
            _free_device_memory(device)
            if batch > 1:
                new_batch = max(1, batch // 2)
                note = f"{what}: out of memory on {device} with batch {batch}; retried with batch {new_batch}"
                batch = new_batch
            elif device.type != "cpu":
                note = f"{what}: out of memory on {device} even with batch 1; retried on the CPU (slower)"
                device = torch.device("cpu")
            else:
                raise SAMIRInputError(f"{what}: out of host memory even with batch 1; use --preset fast or a "
                                      "downsampled volume") from None
            log.warning(note)
            notes.append(note)


# ``ru_maxrss`` is in kilobytes on Linux and the BSDs but in bytes on macOS.
RU_MAXRSS_BYTES = {"darwin": 1}
RU_MAXRSS_DEFAULT_BYTES = 1024


def host_peak_rss_mb(platform: Optional[str] = None) -> float:
    """Peak resident memory of this process so far (MB): ``getrusage`` where it exists, else psutil's
    peak working set (Windows)."""
    try:
        import resource  # POSIX only
    except ImportError:
        import psutil
        info = psutil.Process().memory_info()
        return float(getattr(info, "peak_wset", info.rss)) / 2 ** 20
    unit = RU_MAXRSS_BYTES.get(platform or sys.platform, RU_MAXRSS_DEFAULT_BYTES)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2 ** 20


def _cgroup_available_mb() -> float:
    """What a Linux container's memory limit leaves (infinite elsewhere or without a limit)."""
    available = math.inf
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
            if text and text != "max":
                limit = int(text) / 2 ** 20
                used_path = path.replace("memory.max", "memory.current").replace("limit_in_bytes", "usage_in_bytes")
                used = int(open(used_path).read().strip()) / 2 ** 20
                available = min(available, limit - used)
        except (OSError, ValueError):
            continue
    return available


def available_host_memory_mb() -> float:
    """Memory the OS can give this process now (psutil's ``available``; a cgroup limit if lower)."""
    import psutil
    return float(min(psutil.virtual_memory().available / 2 ** 20, _cgroup_available_mb()))


def estimate_peak_memory_mb(shape_zyx: Sequence[int], optimised_voxels: int, encoded_slices: int = 0,
                            network: bool = False, on_gpu: bool = False, image_loss_voxels: int = 0) -> float:
    """Estimated peak host memory of one registration (MB). On a GPU the optimisation is not on the host.

    ``optimised_voxels``: the finest optimised velocity grid; ``image_loss_voxels``: the image grid of a
    full-resolution stage (velocity on a coarser grid), if there is one."""
    voxels = math.prod(shape_zyx)
    total = BASE_MB * 2 ** 20 + BYTES_PER_VOXEL * voxels + FEATURE_BYTES_PER_SLICE * encoded_slices
    if not on_gpu:
        total += max(BYTES_PER_OPTIMISED_VOXEL * optimised_voxels, BYTES_PER_IMAGE_LOSS_VOXEL * image_loss_voxels)
        total += BYTES_PER_NETWORK_VOXEL * voxels if network else 0
    return total / 2 ** 20


def check_host_memory(estimate_mb: float, shape_zyx: Sequence[int], available_mb: Optional[float] = None) -> None:
    available_mb = available_host_memory_mb() if available_mb is None else available_mb
    if estimate_mb > 0.9 * available_mb:
        raise SAMIRInputError(
            f"this registration needs about {estimate_mb / 1024:.1f} GB of memory for a "
            f"{'x'.join(map(str, shape_zyx))} volume, but only {available_mb / 1024:.1f} GB is available; "
            "use --preset fast, downsample the images (or crop them to the region of interest), "
            "or run on a GPU (--device cuda)")
