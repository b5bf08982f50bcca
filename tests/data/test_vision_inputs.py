"""Corrupted raw files are stopped before any processing, with the file and the reason named."""
from __future__ import annotations

import gzip

import pytest

from tasks.errors import ChecksumError, DataFormatError
from tasks.images.prepare import prepare_images

LABELS = "train-labels-idx1-ubyte.gz"


@pytest.mark.fault("data", "a truncated .gz file",
                   "DataFormatError naming the file (not a valid gzip stream); no output folder")
def test_truncated_file(synthetic_source, tmp_path):
    src, cfg = synthetic_source
    blob = (src / LABELS).read_bytes()
    (src / LABELS).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataFormatError, match=r"train-labels-idx1-ubyte\.gz: not a valid gzip stream"):
        prepare_images(cfg.data.vision, tmp_path / "out", "vision")
    assert not (tmp_path / "out").exists()


@pytest.mark.fault("data", "flipped bytes inside a .gz file",
                   "DataFormatError or ChecksumError naming the file")
def test_flipped_bytes(synthetic_source, tmp_path):
    src, cfg = synthetic_source
    blob = bytearray((src / "t10k-images-idx3-ubyte.gz").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (src / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(blob))
    with pytest.raises((DataFormatError, ChecksumError), match=r"t10k-images-idx3-ubyte\.gz"):
        prepare_images(cfg.data.vision, tmp_path / "out", "vision")


@pytest.mark.fault("data", "a valid file whose content does not match its pinned SHA-256",
                   "ChecksumError naming the file, its hash and the pinned one")
def test_checksum_mismatch_names_file_and_both_hashes(synthetic_source, tmp_path):
    src, cfg = synthetic_source
    payload = bytearray(gzip.decompress((src / LABELS).read_bytes()))
    payload[-1] = (payload[-1] + 1) % 10  # still a valid IDX file, just not the pinned one
    (src / LABELS).write_bytes(gzip.compress(bytes(payload)))
    expected = cfg.data.vision.sha256["train-labels-idx1-ubyte"]
    with pytest.raises(ChecksumError, match=rf"{LABELS}: SHA-256 of its content is [0-9a-f]{{64}}, expected {expected}"):
        prepare_images(cfg.data.vision, tmp_path / "out", "vision")


@pytest.mark.fault("data", "a gzip file whose IDX magic number is wrong (pinned as it is)",
                   "DataFormatError naming the file, the magic found and the one expected; no output folder")
def test_wrong_idx_magic_number(synthetic_source, tmp_path):
    import hashlib

    src, cfg = synthetic_source
    payload = bytearray(gzip.decompress((src / LABELS).read_bytes()))
    payload[2] = 0x0D  # float32 instead of unsigned byte
    (src / LABELS).write_bytes(gzip.compress(bytes(payload)))
    pins = {**cfg.data.vision.sha256, "train-labels-idx1-ubyte": hashlib.sha256(payload).hexdigest()}
    with pytest.raises(DataFormatError, match=rf"{LABELS}: IDX magic 00000d01 declares dtype 0x0d .* expected dtype 0x08"):
        prepare_images(cfg.data.vision.model_copy(update={"sha256": pins}), tmp_path / "out", "vision")
    assert not (tmp_path / "out").exists()
