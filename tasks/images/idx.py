"""Reader for the IDX format of (Fashion-)MNIST, strict about magic numbers and sizes."""
from __future__ import annotations

import gzip
import io
import math

import numpy as np

from tasks.errors import CORRUPT_STREAM, DataFormatError

_UBYTE = 0x08
#: DEFLATE spends at least 2 bits on its longest match (258 bytes), so no gzip stream expands more than 1032-fold
#: (zlib's documented limit): an IDX header declaring more than that many times its .gz's size is lying, and is
#: refused before a byte of it is decompressed.
DEFLATE_MAX_RATIO = 1032
#: The largest IDX file read (2 GiB of unsigned bytes), whatever its .gz: 4x the largest published IDX set (EMNIST
#: ByClass's training images, 547 MB; Fashion-MNIST's are 47 MB), and what training's float32 copy of it (8 GiB) still
#: fits beside on a 16 GB machine. The DEFLATE bound alone would let a 25 MB .gz of zeros declare and deliver 25 GB,
#: past the machine's memory: past this ceiling the batch is unreadable (DataFormatError, quarantined), no MemoryError.
MAX_IDX_BYTES = 2**31
_CHUNK = 1 << 24   # bytes decompressed per read: memory grows with what the stream delivers, not what it declares


def _idx_header(stream: gzip.GzipFile, name: str) -> tuple[bytes, tuple[int, ...]]:
    """The IDX header at the start of ``stream`` (magic, then 4 bytes per dimension) and its dimensions; only
    unsigned bytes are read, whose payload size the dimensions alone give."""
    magic = stream.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
        raise DataFormatError(f"{name}: bad IDX magic number {magic.hex()!r}, expected 0000{_UBYTE:02x} and the "
                              "number of dimensions")
    if magic[2] != _UBYTE:
        raise DataFormatError(f"{name}: IDX magic {magic.hex()} declares dtype 0x{magic[2]:02x} and {magic[3]} dims, "
                              f"expected dtype 0x{_UBYTE:02x} (ubyte)")
    header = magic + stream.read(4 * magic[3])
    if len(header) < 4 + 4 * magic[3]:
        raise DataFormatError(f"{name}: IDX header truncated ({len(header)} bytes)")
    return header, tuple(int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(magic[3]))


def _read_declared(stream: gzip.GzipFile, raw_size: int, name: str) -> bytes:
    """The IDX payload of ``stream``, decompressing no more than its header declares (and one byte to tell a longer
    stream); a size past what ``raw_size`` bytes of gzip can hold, or past ``MAX_IDX_BYTES``, is refused unread."""
    header, dims = _idx_header(stream, name)
    expected = len(header) + math.prod(dims)
    declared = f"{name}: IDX declares shape {dims} ({expected} bytes)"
    if expected > DEFLATE_MAX_RATIO * raw_size:
        raise DataFormatError(f"{declared}, more than its {raw_size}-byte .gz can hold (gzip expands at most "
                              f"{DEFLATE_MAX_RATIO}-fold); the file is corrupted or crafted")
    if expected > MAX_IDX_BYTES:
        raise DataFormatError(f"{declared}, more than the {MAX_IDX_BYTES} bytes an IDX file may hold "
                              "(MAX_IDX_BYTES in tasks/images/idx.py); split its images over several files")
    parts, left = [header], expected - len(header) + 1
    while left > 0 and (part := stream.read(min(left, _CHUNK))):
        parts.append(part)
        left -= len(part)
    if left <= 0:   # the declared bytes and one more: the stream holds more than its header says
        raise DataFormatError(f"{declared} but decompresses to more; the file is corrupted or crafted")
    return b"".join(parts)


def gunzip(raw: bytes, name: str) -> bytes:
    """Decompress a .gz IDX file, reading no more than its header declares: a gzip bomb (a small .gz of zeros that
    expands to gigabytes) is refused as a DataFormatError, not met as a MemoryError. A truncated or corrupted file, or
    one longer than its header declares, raises DataFormatError naming it (a shorter one: ``parse_idx``)."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw), mode="rb") as stream:
            payload = _read_declared(stream, len(raw), name)
    except (OSError, *CORRUPT_STREAM) as err:
        raise DataFormatError(f"{name}: not a valid gzip stream ({err}); the file is truncated or corrupted, "
                              "delete it so it is fetched again") from err
    return payload


def parse_idx(payload: bytes, name: str, ndim: int) -> np.ndarray:
    """Parse an uncompressed IDX payload of unsigned bytes with ``ndim`` dimensions."""
    if len(payload) < 4 or payload[0] != 0 or payload[1] != 0:
        raise DataFormatError(f"{name}: bad IDX magic number {payload[:4].hex()!r}, expected 0000{_UBYTE:02x}{ndim:02x}")
    if payload[2] != _UBYTE or payload[3] != ndim:
        raise DataFormatError(f"{name}: IDX magic {payload[:4].hex()} declares dtype 0x{payload[2]:02x} and "
                              f"{payload[3]} dims, expected dtype 0x{_UBYTE:02x} (ubyte) and {ndim} dims")
    header = 4 + 4 * ndim
    if len(payload) < header:
        raise DataFormatError(f"{name}: IDX header truncated ({len(payload)} bytes)")
    dims = tuple(int.from_bytes(payload[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)   # Python ints: numpy's int64 product wraps (2**31 * 2**31 * 4 is 0)
    if len(payload) != expected:
        raise DataFormatError(f"{name}: IDX declares shape {dims} ({expected} bytes) but has {len(payload)} bytes")
    return np.frombuffer(payload, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(payload: bytes, name: str, ndims: tuple[int, ...]) -> np.ndarray:
    """Parse an IDX payload whose number of dimensions (its magic's last byte) is one of ``ndims``."""
    ndim = payload[3] if len(payload) >= 4 and payload[3] in ndims else ndims[0]
    return parse_idx(payload, name, ndim)


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX payload of an unsigned-byte array (what ``parse_idx`` reads back)."""
    if array.dtype != np.uint8:
        raise DataFormatError(f"IDX holds unsigned bytes; got {array.dtype} values")
    header = bytes([0, 0, _UBYTE, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def gzip_bytes(payload: bytes) -> bytes:
    """``payload`` gzipped reproducibly (no timestamp, no file name): the same array is the same file."""
    return gzip.compress(payload, compresslevel=6, mtime=0)
