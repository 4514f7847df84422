"""On-disk cache of encoder features, so a re-run on the same images skips the encoder.

An entry holds the raw :class:`~samir.features.SliceFeatures` of one volume (fp16, exactly what
:func:`~samir.features.encode_volume` returns) and is keyed by a SHA-256 over

* the image content: the normalised float32 voxels, their shape and spacing,
* the encoder: class, name, k, feature size, channels, and the identity of its weights (a
  fingerprint of the checkpoint file, or of the parameters for an encoder without a file),
* the normalisation, the slicing axis, the slice stride,
* how features are computed: device type and precision (bf16 autocast or fp32), so that e.g. CPU
  results never silently depend on features a GPU run left behind,
* the entry format version.

Entries are ``<key>.pt`` files (``torch.save`` of a dict of tensors and numbers, read back with
``weights_only=True``) written to a temporary file in the cache folder and renamed into place. The
folder is bounded in size (``SAMIR_CACHE_MAX_GB``, default 2 GB) with least-recently-used eviction: a
hit refreshes the entry's modification time. Unreadable entries are removed and count as misses; a
cache that cannot be written only costs the speed-up, never the registration.

Location: ``SAMIR_CACHE_DIR``, otherwise ``<user cache dir>/samir/features``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .weights_only import load_checkpoint
from .encoders import SliceEncoder
from .features import SliceFeatures, cpu_has_fast_bf16
from .geometry import SAMIRInputError
from .encoder_weights import user_cache_dir

CACHE_DIR_ENV = "SAMIR_CACHE_DIR"
MAX_GB_ENV = "SAMIR_CACHE_MAX_GB"
DEFAULT_MAX_GB = 2.0
FORMAT_VERSION = 1
STALE_TMP_S = 3600.0
_ENTRY = re.compile(r"^[0-9a-f]{64}\.pt$")

PathLike = Union[str, os.PathLike]


def default_cache_dir() -> Path:
    override = os.environ.get(CACHE_DIR_ENV)
    return Path(override).expanduser() if override else user_cache_dir() / "samir" / "features"


def max_bytes_from_env() -> int:
    value = os.environ.get(MAX_GB_ENV, "").strip()
    if not value:
        return int(DEFAULT_MAX_GB * 1e9)
    try:
        gigabytes = float(value)
    except ValueError:
        gigabytes = -1.0
    if not gigabytes >= 0:
        raise SAMIRInputError(f"{MAX_GB_ENV} must be a size in gigabytes (>= 0), got '{value}'")
    return int(gigabytes * 1e9)


def volume_digest(volume01: np.ndarray, spacing_zyx: Optional[Sequence[float]] = None) -> str:
    """SHA-256 of a normalised volume's float32 voxels, shape and spacing."""
    array = np.ascontiguousarray(volume01, dtype=np.float32)
    digest = hashlib.sha256()
    spacing = [round(float(s), 9) for s in spacing_zyx] if spacing_zyx is not None else None
    digest.update(json.dumps({"shape": list(array.shape), "spacing": spacing, "dtype": "float32"}).encode())
    digest.update(array.data)
    return digest.hexdigest()


_FILE_FINGERPRINTS: Dict[Tuple[str, int, int], str] = {}


def file_fingerprint(path: PathLike, sample: int = 1 << 20) -> str:
    """Cheap content identity of a (large) weights file: size + SHA-256 of its first and last MiB.

    PyTorch checkpoints are zip files whose central directory at the end lists a CRC-32 of every
    tensor, so the tail changes with any weight.
    """
    path = Path(path)
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_FINGERPRINTS:
        digest = hashlib.sha256(str(st.st_size).encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(sample))
            if st.st_size > sample:
                handle.seek(max(sample, st.st_size - sample))
                digest.update(handle.read(sample))
        _FILE_FINGERPRINTS[memo] = digest.hexdigest()
    return _FILE_FINGERPRINTS[memo]


def parameters_fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encoder_identity(encoder: SliceEncoder) -> dict:
    """What makes an encoder's features what they are: architecture, input size and weights."""
    identity = {"class": f"{type(encoder).__module__}.{type(encoder).__qualname__}", **encoder.describe(),
                "stride": int(encoder.stride)}
    checkpoint = getattr(encoder, "checkpoint", None)
    if checkpoint and Path(checkpoint).is_file():
        identity["weights"] = "file:" + file_fingerprint(checkpoint)
    else:
        identity["weights"] = "parameters:" + parameters_fingerprint(encoder)
    return identity


def compute_kind(device: torch.device) -> str:
    """Device type and encoder precision (mirrors :func:`samir.features._autocast`)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "cuda-bf16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "cpu-bf16"
    return f"{device.type}-fp32"


def entry_key(volume01: np.ndarray, spacing_zyx: Optional[Sequence[float]], normalization: str,
              encoder: SliceEncoder, axis: int, slice_stride: int, device: torch.device) -> str:
    parts = {"format": FORMAT_VERSION, "volume": volume_digest(volume01, spacing_zyx),
             "encoder": encoder_identity(encoder), "normalization": str(normalization), "axis": int(axis),
             "slice_stride": int(slice_stride), "compute": compute_kind(device)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _valid_ints(values, count: int) -> bool:
    return isinstance(values, (list, tuple)) and len(values) == count and all(isinstance(v, int) for v in values)


class FeatureCache:
    """Size-bounded LRU store of :class:`SliceFeatures` in a folder."""

    def __init__(self, directory: Optional[PathLike] = None, max_bytes: Optional[int] = None):
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.max_bytes = int(max_bytes) if max_bytes is not None else max_bytes_from_env()
        if self.max_bytes < 0:
            raise SAMIRInputError(f"feature cache size must be >= 0 bytes, got {self.max_bytes}")
        self.lookups: Dict[str, bool] = {}  # label -> hit, for the registration summary

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}.pt"

    def _discard(self, path: Path, why: str) -> None:
        warnings.warn(f"feature cache: removed unreadable entry {path.name} ({why})", RuntimeWarning, stacklevel=3)
        try:
            path.unlink()
        except OSError:
            pass

    def get(self, key: str) -> Optional[SliceFeatures]:
        """The cached features for ``key``, or None. Corrupted entries are removed."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            payload = load_checkpoint(path, "cached features")
        except SAMIRInputError as exc:  # evicted by another process meanwhile, cut off, corrupted, ...
            if path.exists():
                self._discard(path, str(exc).split(f"'{path}' ", 1)[-1])
            return None
        features = payload.get("features") if isinstance(payload, dict) else None
        if not (isinstance(payload, dict) and payload.get("format") == FORMAT_VERSION and payload.get("key") == key
                and isinstance(features, torch.Tensor) and features.dtype == torch.float16 and features.dim() == 4
                and payload.get("axis") in (0, 1, 2) and _valid_ints(payload.get("volume_shape"), 3)
                and _valid_ints(payload.get("pad_before"), 2) and isinstance(payload.get("padded_size"), int)):
            self._discard(path, "unexpected content")
            return None
        try:
            os.utime(path)  # least recently used = oldest modification time
        except OSError:
            pass
        return SliceFeatures(features, int(payload["axis"]), tuple(payload["volume_shape"]),
                             tuple(payload["pad_before"]), int(payload["padded_size"]))

    def put(self, key: str, features: SliceFeatures) -> bool:
        """Store ``features`` under ``key`` (atomically); False when it was not stored."""
        tensor = features.features.detach().to("cpu", torch.float16)
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()  # do not save a larger storage this tensor is a view of
        if tensor.numel() * tensor.element_size() > self.max_bytes:
            return False
        payload = {"format": FORMAT_VERSION, "key": key, "features": tensor, "axis": int(features.axis),
                   "volume_shape": [int(n) for n in features.volume_shape],
                   "pad_before": [int(n) for n in features.pad_before], "padded_size": int(features.padded_size)}
        tmp_name = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".tmp-", suffix=".pt", delete=False) as tmp:
                tmp_name = tmp.name
                torch.save(payload, tmp)
            os.replace(tmp_name, self.path_for(key))
            tmp_name = None
        except OSError as exc:
            warnings.warn(f"feature cache: could not write to '{self.directory}' ({exc}); continuing without it",
                          RuntimeWarning, stacklevel=2)
            return False
        finally:
            if tmp_name is not None:
                try:
                    os.unlink(tmp_name)
                except OSError:
                    pass
        self.evict(keep=self.path_for(key))
        return True

    def entries(self) -> List[Tuple[Path, int, float]]:
        """``(path, bytes, last use)`` of every entry, least recently used first."""
        out = []
        try:
            candidates = list(self.directory.iterdir())
        except OSError:
            return []
        for path in candidates:
            if not _ENTRY.match(path.name):
                continue
            try:
                st = path.stat()
            except OSError:
                continue
            out.append((path, st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e[2])

    def _temporary_files(self) -> List[Path]:
        try:
            return [p for p in self.directory.iterdir() if p.name.startswith(".tmp-") and p.suffix == ".pt"]
        except OSError:
            return []

    def evict(self, keep: Optional[Path] = None) -> int:
        """Delete least recently used entries until the folder fits ``max_bytes``; returns how many."""
        now = time.time()
        for tmp in self._temporary_files():  # left behind by a killed process
            try:
                if now - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink()
            except OSError:
                pass
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed = 0
        for path, size, _ in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and path == keep:
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                continue
            total -= size
            removed += 1
        return removed

    def clear(self) -> Tuple[int, int]:
        """Delete every entry (only files this cache wrote); returns ``(entries, bytes)`` removed."""
        count = freed = 0
        for path, size, _ in self.entries():
            try:
                path.unlink()
            except OSError:
                continue
            count, freed = count + 1, freed + size
        for tmp in self._temporary_files():
            try:
                tmp.unlink()
            except OSError:
                pass
        return count, freed

    def stats(self) -> dict:
        entries = self.entries()
        return {"directory": str(self.directory), "entries": len(entries),
                "bytes": sum(size for _, size, _ in entries), "max_bytes": self.max_bytes}

    def fetch_or_encode(self, label: str, volume01: np.ndarray, spacing_zyx: Optional[Sequence[float]],
                        normalization: str, encoder: SliceEncoder, axis: int, slice_stride: int,
                        device: torch.device, encode: Callable[[], SliceFeatures]) -> SliceFeatures:
        """Cached features of ``volume01`` if present, else ``encode()`` (stored for next time)."""
        key = entry_key(volume01, spacing_zyx, normalization, encoder, axis, slice_stride, device)
        features = self.get(key)
        self.lookups[label] = features is not None
        if features is None:
            features = encode()
            self.put(key, features)
        return features

    def report(self) -> dict:
        """For ``result.info``: whether each volume's features came from the cache."""
        return {"enabled": True, **{f"{label}_hit": hit for label, hit in self.lookups.items()}}
