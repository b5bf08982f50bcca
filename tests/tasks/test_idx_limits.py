"""A .gz IDX file is decompressed no further than its header declares: a gzip bomb is a DataFormatError naming the
file (an arriving batch quarantined as unreadable), never a MemoryError that kills the ingestion."""
from __future__ import annotations

import gzip
import os
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from tasks.errors import DataFormatError
from tasks.images.idx import DEFLATE_MAX_RATIO, MAX_IDX_BYTES, gunzip, gzip_bytes, idx_bytes
from tests.conftest import ROOT

IMAGES, LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
BOMB = 256 << 20        # bytes of zeros the images file expands to
HEADROOM = 128 << 20    # address space the read gets beyond what the interpreter holds: less than BOMB

# Reads the batch folder argv[1] with at most HEADROOM more address space (RLIMIT_AS) than the imports left in use;
# prints the DataFormatError, or dies as the ingestion did (MemoryError, exit 1).
READ_UNDER_LIMIT = textwrap.dedent(f"""
    import resource, sys
    from pathlib import Path
    from tasks.errors import DataFormatError
    from tasks.images.batches import read_batch
    in_use = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (in_use + {HEADROOM}, resource.RLIM_INFINITY))
    try:
        read_batch(Path(sys.argv[1]))
    except DataFormatError as err:
        print(err)
""")


def _header(*dims: int) -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


def _gzip_zeros_after(header: bytes, zeros: int) -> bytes:
    """``header`` and ``zeros`` zero bytes, gzipped a MiB at a time (the test never holds the expanded file)."""
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    chunk, out = bytes(1 << 20), [packer.compress(header)]
    for _ in range(zeros // len(chunk)):
        out.append(packer.compress(chunk))
    return b"".join([*out, packer.flush()])


@pytest.mark.fault("data", "a batch's images .gz that declares 10x28x28 images but expands to 256 MB of zeros (a gzip "
                   "bomb; 25 MB of it would expand past the machine's memory)",
                   "DataFormatError naming the file, the batch quarantined as unreadable; memory bounded by the "
                   "declared size (before: the whole file was decompressed first, a MemoryError killed the ingestion "
                   "and every later run)")
def test_a_gzip_bomb_in_a_batch_is_refused_naming_the_file_within_bounded_memory(tmp_path):
    """Before: ``gunzip`` expanded the whole stream before the IDX header was read, so the read died of a MemoryError
    (no DataFormatError: the batch was never quarantined)."""
    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / IMAGES).write_bytes(_gzip_zeros_after(_header(10, 28, 28), BOMB))
    (folder / LABELS).write_bytes(gzip_bytes(idx_bytes(np.arange(10, dtype=np.uint8))))
    proc = subprocess.run([sys.executable, "-c", READ_UNDER_LIMIT, str(folder)], check=False, capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0 and "MemoryError" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.strip() == (f"{folder / IMAGES}: IDX declares shape (10, 28, 28) ({16 + 10 * 28 * 28} bytes) "
                                   "but decompresses to more; the file is corrupted or crafted")


def _peak_allocation(raw: bytes, name: str) -> tuple[str, int]:
    """The DataFormatError ``gunzip`` raises on ``raw`` and the most memory Python allocated meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(DataFormatError) as err:
            gunzip(raw, name)
        return str(err.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.fault("data", "an IDX .gz whose header declares a shape of 2**64 bytes with a few bytes after it",
                   "DataFormatError naming the file, its declared shape and the .gz's size, before any byte is "
                   "decompressed or allocated")
def test_a_header_declaring_more_than_gzip_can_expand_to_is_refused_unread():
    """Before: the file was decompressed whole and only then found short; a reader sized by the header alone would
    allocate 2**64 bytes."""
    raw = gzip.compress(_header(2**31, 2**31, 4) + bytes(100))
    message, peak = _peak_allocation(raw, "f.gz")
    assert message == (f"f.gz: IDX declares shape (2147483648, 2147483648, 4) ({16 + 2**64} bytes), more than its "
                       f"{len(raw)}-byte .gz can hold (gzip expands at most {DEFLATE_MAX_RATIO}-fold); the file is "
                       "corrupted or crafted")
    assert peak < 1 << 20


@pytest.mark.fault("data", "an IDX .gz large enough to expand to its header's 3 GB (3000 images of 1000x1000)",
                   "DataFormatError naming the file and the limit (MAX_IDX_BYTES, 2 GiB), before any byte of it is "
                   "decompressed")
def test_a_header_declaring_more_than_the_ceiling_is_refused_unread():
    """Before: the whole stream was decompressed, whatever it held: gigabytes from a few megabytes of .gz."""
    noise = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()   # incompressible
    raw = gzip.compress(_header(3000, 1000, 1000) + noise)
    assert DEFLATE_MAX_RATIO * len(raw) > 3 * 10**9 > MAX_IDX_BYTES   # only the ceiling refuses it
    message, peak = _peak_allocation(raw, "f.gz")
    assert message.startswith(f"f.gz: IDX declares shape (3000, 1000, 1000) ({16 + 3 * 10**9} bytes), more than the "
                              f"{MAX_IDX_BYTES} bytes an IDX file may hold")
    assert peak < 1 << 20


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda raw: raw[:-8] + bytes([raw[-8] ^ 0xFF]) + raw[-7:], id="crc-flipped"),
    pytest.param(lambda raw: raw + b"not gzip", id="trailing-garbage"),
])
def test_a_file_of_its_declared_size_is_still_checked_to_its_end(mutate):
    """Reading only the declared bytes still reads the stream to its end (CRC, trailing data), as before."""
    raw = mutate(gzip_bytes(idx_bytes(np.zeros((2, 3, 4), np.uint8))))
    with pytest.raises(DataFormatError, match=r"^f\.gz: not a valid gzip stream"):
        gunzip(raw, "f.gz")


def test_a_valid_file_reads_back_whole(tmp_path: Path):
    arr = np.random.default_rng(1).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    payload = idx_bytes(arr)
    assert gunzip(gzip_bytes(payload), "f.gz") == payload
