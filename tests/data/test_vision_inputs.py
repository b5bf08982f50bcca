"""Corrupted raw files are stopped before any processing, with the file and the reason named."""
from __future__ import annotations

import gzip

import pytest

from tasks.errors import ChecksumError, DataFormatError
from tasks.prepare_vision import prepare_vision

LABELS = "train-labels-idx1-ubyte.gz"


def test_truncated_file(synthetic_source, tmp_path):
    src, cfg = synthetic_source
    blob = (src / LABELS).read_bytes()
    (src / LABELS).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataFormatError, match=r"train-labels-idx1-ubyte\.gz: not a valid gzip stream"):
        prepare_vision(cfg.data.vision, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_flipped_bytes(synthetic_source, tmp_path):
    src, cfg = synthetic_source
    blob = bytearray((src / "t10k-images-idx3-ubyte.gz").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (src / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(blob))
    with pytest.raises((DataFormatError, ChecksumError), match=r"t10k-images-idx3-ubyte\.gz"):
        prepare_vision(cfg.data.vision, tmp_path / "out")


def test_checksum_mismatch_names_file_and_both_hashes(synthetic_source, tmp_path):
    src, cfg = synthetic_source
    payload = bytearray(gzip.decompress((src / LABELS).read_bytes()))
    payload[-1] = (payload[-1] + 1) % 10  # still a valid IDX file, just not the pinned one
    (src / LABELS).write_bytes(gzip.compress(bytes(payload)))
    expected = cfg.data.vision.sha256["train-labels-idx1-ubyte"]
    with pytest.raises(ChecksumError, match=rf"{LABELS}: SHA-256 of its content is [0-9a-f]{{64}}, expected {expected}"):
        prepare_vision(cfg.data.vision, tmp_path / "out")
