"""Reader for the IDX format of (Fashion-)MNIST, strict about magic numbers and sizes."""
from __future__ import annotations

import gzip
import math

import numpy as np

from tasks.errors import CORRUPT_STREAM, DataFormatError

_UBYTE = 0x08


def gunzip(raw: bytes, name: str) -> bytes:
    """Decompress a .gz payload; a truncated or corrupted file raises DataFormatError naming it."""
    try:
        return gzip.decompress(raw)
    except (OSError, *CORRUPT_STREAM) as err:
        raise DataFormatError(f"{name}: not a valid gzip stream ({err}); the file is truncated or corrupted, "
                              "delete it so it is fetched again") from err


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
