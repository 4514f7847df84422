"""Loading PyTorch files (encoder and network checkpoints, training states, cached features): the one
``torch.load`` of the engine, always with ``weights_only=True``.

``torch.load`` with ``weights_only=True`` never runs code from a file, but its errors say little
(a cut-off file: "failed finding central directory"), and a zip archive whose contents were
damaged loads without a word (PyTorch does not check the archive's CRCs). So the file is checked
first: empty, cut off (its zip archive incomplete), corrupted (a member fails its CRC-32), not a
PyTorch file at all; and an error while unpickling is turned into its reason (Python objects that
weights-only loading refuses, which a file of weights never needs).
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Optional, Union

import torch

from .geometry import SAMIRInputError

PathLike = Union[str, Path]
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = b"\x80"  # the pre-1.6 format starts with a pickle (protocol 2+)


def checkpoint_damage(path: Path) -> Optional[str]:
    """Why ``path`` cannot be a whole PyTorch file, or ``None`` when it may be one."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes): an interrupted download or copy?"
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(LEGACY_MAGIC):
        return None  # the legacy format has no checksums; torch.load says what is wrong with it
    if head != ZIP_MAGIC:
        return f"is not a PyTorch file (it starts with {head!r}, neither a zip archive nor the legacy format)"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
                return "is a zip archive but not a PyTorch file (it holds no data.pkl)"
            bad = archive.testzip()
    except zipfile.BadZipFile as exc:
        return (f"is cut off or damaged: its zip archive is incomplete ({exc}; {size:,} bytes): an interrupted"
                " download or copy?")
    except (OSError, EOFError, ValueError) as exc:  # zlib errors of compressed members, reads past the end
        return f"is corrupted: its zip archive cannot be read ({exc})"
    if bad is not None:
        return f"is corrupted: part '{bad}' of its zip archive fails its CRC check (a damaged copy?)"
    return None


def _unpickling_reason(exc: Exception) -> str:
    text = str(exc)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return (f"holds a pickled Python object ({refused.group(1)}), which weights-only loading refuses: a file of"
                " weights needs none, and loading one could run any code. Save the tensors only (a state_dict)")
    detail = re.search(r"WeightsUnpickler error: \s*(.+?)\s*(\n\n|$)", text, re.S)
    reason = " ".join(detail.group(1).split()) if detail else text.strip().splitlines()[0]
    return f"could not be loaded as a weights-only PyTorch file ({reason})"


def load_checkpoint(path: PathLike, what: str = "encoder checkpoint") -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, after :func:`checkpoint_damage`; any failure is a
    :class:`SAMIRInputError` naming ``what``, the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise SAMIRInputError(f"{what} '{path}' does not exist")
    try:
        damage = checkpoint_damage(path)
    except OSError as exc:
        raise SAMIRInputError(f"{what} '{path}' could not be read: {exc.strerror or exc}") from None
    if damage:
        raise SAMIRInputError(f"{what} '{path}' {damage}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SAMIRInputError(f"{what} '{path}' {_unpickling_reason(exc)}") from None
    except EOFError:
        raise SAMIRInputError(f"{what} '{path}' is cut off (it ends inside its data): an interrupted download"
                              " or copy?") from None
    except Exception as exc:  # torch raises RuntimeError, ValueError, ... for other damage
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise SAMIRInputError(f"{what} '{path}' could not be loaded as a weights-only PyTorch file: {first}") from None
