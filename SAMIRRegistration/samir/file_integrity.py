"""Is an image file whole? Checked before SimpleITK reads it (standard library only).

ITK reads a NIfTI file whose gzip stream ends early, or an uncompressed NIfTI shorter than its
header says, without a word: the missing voxels come back as zeros. A MetaImage whose zlib data is
damaged also reads "successfully". A registration of such an image runs to the end and writes a
confident, wrong result, so the formats below are checked against what their own header promises:

* gzip (``.nii.gz``, ``.img.gz``, a gzip-encoded NRRD): the stream is decompressed to its end, which
  also checks its CRC-32 and length fields; a stream that ends early or fails its check is damaged.
* MetaImage zlib data (``CompressedData = True``): decompressed to its end (Adler-32 checked).
* NIfTI-1/-2 (``.nii``, ``.nii.gz``, ``.hdr``/``.img`` pairs), MetaImage (``.mha``, ``.mhd`` with
  its data file) and NRRD (``.nrrd``, ``.nhdr`` with its data file): the voxel data present must be
  at least the size the header promises (voxels x bytes per voxel, after the data offset).

Not checkable and not checked: damage inside uncompressed voxel data (no checksum), ASCII/hex
encodings, multi-file data (MetaImage ``LIST``, NRRD file patterns) and other formats.
"""
from __future__ import annotations

import bz2
import gzip
import struct
import zlib
from pathlib import Path
from typing import Dict, Optional, Tuple

from .geometry import SAMIRInputError

CHUNK = 1 << 22
HEADER_BYTES = 1024  # enough for a NIfTI-2 header (540 bytes)
MAX_TEXT_HEADER = 1 << 16
GZIP_MAGIC = b"\x1f\x8b"
CUT_OFF_HINT = "an interrupted copy or download?"

METAIMAGE_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
                        "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8,
                        "MET_FLOAT": 4, "MET_DOUBLE": 8}


class DamagedFile(Exception):
    """The reason a file is not whole (completed into a message by :func:`check_image_file`)."""


def check_image_file(path: Path, what: str) -> None:
    """Raise :class:`SAMIRInputError` naming ``path`` and the damage if the file (or its data file) is
    cut off or corrupted; return quietly for whole files and formats that cannot be checked."""
    path = Path(path)
    try:
        _check(path)
    except DamagedFile as exc:
        raise SAMIRInputError(f"{what} '{path}' is damaged: {exc}") from None
    except OSError as exc:
        raise SAMIRInputError(f"{what} '{path}' could not be read: {exc.strerror or exc}") from None


def _check(path: Path) -> None:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti(path, path)
    elif name.endswith((".hdr", ".img", ".img.gz")):
        stem = path.name[:-len(".img.gz")] if name.endswith(".img.gz") else path.name[:-4]
        header = path.with_name(stem + ".hdr")
        data = next((path.with_name(stem + ext) for ext in (".img", ".img.gz", ".IMG") if
                     path.with_name(stem + ext).is_file()), None)
        if header.is_file() and data is not None:
            _check_nifti(header, data)
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(path)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(path)
    elif _starts_with(path, GZIP_MAGIC):
        _gzip_length(path, 0)


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(magic)) == magic


def _cut_off(have: int, need: int, what: str) -> DamagedFile:
    return DamagedFile(f"it is cut off: {what} holds {have:,} bytes, its header promises {need:,} ({CUT_OFF_HINT})")


# ---------------------------------------------------------------------------------------- streams


def _gzip_length(path: Path, offset: int, keep: int = 0) -> Tuple[int, bytes]:
    """(decompressed length, its first ``keep`` bytes) of the gzip stream at ``offset`` of ``path``."""
    first, total = b"", 0
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                while True:
                    block = stream.read1(CHUNK)
                    if not block:
                        break
                    if len(first) < keep:
                        first += block[:keep - len(first)]
                    total += len(block)
    except EOFError:
        raise DamagedFile(f"its gzip stream ends early after {total:,} decompressed bytes ({CUT_OFF_HINT})") from None
    except gzip.BadGzipFile as exc:
        raise DamagedFile(f"its gzip stream fails its check ({exc}): the file is corrupted") from None
    except zlib.error as exc:
        raise DamagedFile(f"its compressed data is corrupted (zlib: {exc})") from None
    return total, first


def _zlib_length(path: Path, offset: int, size: Optional[int]) -> int:
    """Decompressed length of the zlib stream of ``size`` bytes (``None``: to the end) at ``offset``."""
    decompressor, total = zlib.decompressobj(), 0
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            left = size
            while left is None or left > 0:
                block = raw.read(CHUNK if left is None else min(CHUNK, left))
                if not block:
                    break
                left = None if left is None else left - len(block)
                total += len(decompressor.decompress(block))
                if decompressor.eof:
                    break
            total += len(decompressor.flush())
    except zlib.error as exc:
        raise DamagedFile(f"its compressed voxel data is corrupted (zlib: {exc})") from None
    if not decompressor.eof:
        raise DamagedFile(f"its compressed voxel data ends early after {total:,} bytes ({CUT_OFF_HINT})")
    return total


def _bzip2_length(path: Path, offset: int) -> int:
    decompressor, total = bz2.BZ2Decompressor(), 0
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            while not decompressor.eof:
                block = raw.read(CHUNK)
                if not block:
                    break
                total += len(decompressor.decompress(block))
    except (OSError, ValueError) as exc:
        raise DamagedFile(f"its bzip2 data is corrupted ({exc})") from None
    if not decompressor.eof:
        raise DamagedFile(f"its bzip2 data ends early after {total:,} bytes ({CUT_OFF_HINT})")
    return total


# ---------------------------------------------------------------------------------------- NIfTI


def nifti_layout(header: bytes) -> Optional[Tuple[int, int]]:
    """(data offset, voxel bytes) a NIfTI-1/-2 (or Analyze 7.5) header promises, ``None`` if it is not one.

    Raises :class:`DamagedFile` for a header that is itself cut off.
    """
    if len(header) < 4:
        raise DamagedFile(f"it ends inside the NIfTI header ({len(header)} bytes; {CUT_OFF_HINT})")
    for endian in "<>":
        header_size = struct.unpack(endian + "i", header[:4])[0]
        if header_size in (348, 540):
            break
    else:
        return None
    if len(header) < header_size:
        raise DamagedFile(f"it ends inside the NIfTI header ({len(header)} of {header_size} bytes; {CUT_OFF_HINT})")
    if header_size == 348:
        dims = struct.unpack(endian + "8h", header[40:56])
        bitpix = struct.unpack(endian + "h", header[72:74])[0]
        offset = struct.unpack(endian + "f", header[108:112])[0]
    else:
        bitpix = struct.unpack(endian + "h", header[14:16])[0]
        dims = struct.unpack(endian + "8q", header[16:80])
        offset = struct.unpack(endian + "q", header[168:176])[0]
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or bitpix % 8 or min(dims[1:dims[0] + 1]) < 1 or offset < 0:
        return None  # an invalid header: SimpleITK refuses it with its own message
    voxels = 1
    for size in dims[1:dims[0] + 1]:
        voxels *= int(size)
    return int(offset), voxels * (bitpix // 8)


def _read_start(path: Path, keep: int) -> Tuple[bytes, int]:
    """(first ``keep`` bytes, total length) of the file's content, decompressing a gzip file to its end."""
    if _starts_with(path, GZIP_MAGIC):
        total, first = _gzip_length(path, 0, keep)
        return first, total
    with open(path, "rb") as handle:
        return handle.read(keep), path.stat().st_size


def _check_nifti(header_path: Path, data_path: Path) -> None:
    header, length = _read_start(header_path, HEADER_BYTES)
    layout = nifti_layout(header)
    if layout is None:
        return
    offset, voxel_bytes = layout
    if data_path != header_path:
        _, length = _read_start(data_path, 0)
    need = offset + voxel_bytes
    if length < need:
        what = "its (decompressed) content" if _starts_with(data_path, GZIP_MAGIC) else "the file"
        if data_path != header_path:
            what = f"its data file '{data_path.name}'"
        raise _cut_off(length, need, what)


# ---------------------------------------------------------------------------------------- MetaImage


def _read_text_header(path: Path, last_key: Optional[str], separator: str) -> Tuple[Dict[str, str], int, bool]:
    """``{key: value}`` of a text header, the offset after it and whether it ended properly.

    The header ends after the ``last_key`` line (MetaImage) or at an empty line (NRRD).
    """
    fields: Dict[str, str] = {}
    with open(path, "rb") as handle:
        while handle.tell() < MAX_TEXT_HEADER:
            raw = handle.readline()
            if not raw:
                return fields, handle.tell(), False
            line = raw.decode("latin-1").rstrip("\r\n")
            if last_key is None and not line.strip():
                return fields, handle.tell(), True
            if line.startswith("#") or separator not in line or ":=" in line:
                continue
            key, _, value = line.partition(separator)
            key = key.strip()
            fields[key if last_key else key.lower()] = value.strip()
            if last_key and key == last_key:
                return fields, handle.tell(), True
    return fields, MAX_TEXT_HEADER, False


def _product(text: str) -> Optional[int]:
    try:
        values = [int(v) for v in text.split()]
    except ValueError:
        return None
    if not values or min(values) < 1:
        return None
    total = 1
    for value in values:
        total *= value
    return total


def _check_metaimage(path: Path) -> None:
    fields, offset, complete = _read_text_header(path, "ElementDataFile", "=")
    if not complete:
        raise DamagedFile(f"its MetaImage header has no ElementDataFile line (the file ends inside its header;"
                          f" {CUT_OFF_HINT})")
    voxels = _product(fields.get("DimSize", ""))
    element = METAIMAGE_TYPE_BYTES.get(fields.get("ElementType", ""))
    channels = _product(fields.get("ElementNumberOfChannels", "1"))
    if None in (voxels, element, channels) or fields.get("BinaryData", "True").lower() in ("false", "0"):
        return
    need = voxels * element * channels
    compressed = fields.get("CompressedData", "False").lower() in ("true", "1")
    data_file = fields["ElementDataFile"]
    if data_file.upper() == "LOCAL":
        data, start, label = path, offset, "the file after its header"
    elif data_file.upper().startswith("LIST") or "%" in data_file or len(data_file.split()) > 1:
        return
    else:
        data, label = path.parent / data_file, f"its data file '{data_file}'"
        if not data.is_file():
            raise DamagedFile(f"its data file '{data_file}' is missing")
        skip = int(float(fields.get("HeaderSize", "0") or 0))
        start = skip if skip >= 0 else (0 if compressed else max(0, data.stat().st_size - need))
    if compressed:
        size = fields.get("CompressedDataSize")
        got = _zlib_length(data, start, int(size) if size and data is path else None)
        if got < need:
            raise _cut_off(got, need, f"its decompressed voxel data ({label})")
    elif data.stat().st_size - start < need:
        raise _cut_off(data.stat().st_size - start, need, label)


# ---------------------------------------------------------------------------------------- NRRD


def nrrd_type_bytes(name: str) -> Optional[int]:
    """Bytes per value of an NRRD ``type`` (every spelling the format allows), ``None`` for ``block``."""
    text = name.lower().replace("_t", "")
    if text == "float":
        return 4
    if text == "double":
        return 8
    if "char" in text or text in ("int8", "uint8"):
        return 1
    if "short" in text or "16" in text:
        return 2
    if "long long" in text or "longlong" in text or "64" in text:
        return 8
    if "int" in text or "32" in text:
        return 4
    return None


def _check_nrrd(path: Path) -> None:
    if not _starts_with(path, b"NRRD"):
        return
    fields, offset, ended_with_blank = _read_text_header(path, None, ":")
    values, element = _product(fields.get("sizes", "")), nrrd_type_bytes(fields.get("type", ""))
    encoding = fields.get("encoding", "raw").lower()
    if values is None or element is None or encoding in ("ascii", "text", "txt", "hex"):
        return
    need = values * element
    data_file = fields.get("data file", fields.get("datafile"))
    if data_file is None:
        if not ended_with_blank:
            raise DamagedFile(f"it ends inside its header: no voxel data ({CUT_OFF_HINT})")
        data, start, label = path, offset, "the file after its header"
    elif data_file.upper().startswith("LIST") or len(data_file.split()) > 1:
        return
    else:
        data, start, label = path.parent / data_file, 0, f"its data file '{data_file}'"
        if not data.is_file():
            raise DamagedFile(f"its data file '{data_file}' is missing")
    start = _skip_lines(data, start, int(fields.get("line skip", fields.get("lineskip", "0")) or 0))
    byte_skip = int(fields.get("byte skip", fields.get("byteskip", "0")) or 0)
    if encoding in ("gzip", "gz"):
        got = _gzip_length(data, start)[0] - max(byte_skip, 0)
    elif encoding in ("bzip2", "bz2"):
        got = _bzip2_length(data, start) - max(byte_skip, 0)
    elif encoding == "raw":
        got = data.stat().st_size - start - max(byte_skip, 0)
    else:
        return
    if got < need:
        raise _cut_off(max(got, 0), need, label if encoding == "raw" else f"its decompressed voxel data ({label})")


def _skip_lines(path: Path, offset: int, lines: int) -> int:
    if lines <= 0:
        return offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        for _ in range(lines):
            handle.readline()
        return handle.tell()
