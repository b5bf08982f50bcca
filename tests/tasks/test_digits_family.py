"""The digits family: scikit-learn's bundled digits written out as an image folder and read back as a user's images."""
from __future__ import annotations

import gzip
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tasks.config import parse_config
from tasks.digits.fetch import bundle_path, read_bundle, write_folder
from tasks.errors import ChecksumError, ConfigError, DataSourceError
from tasks.image_folder import read_folder

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pinned():
    return yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["digits"]["bundle"]["sha256"]


def test_the_bundle_written_out_reads_back_as_the_same_images_and_labels(pinned, tmp_path):
    images, labels = read_bundle(bundle_path(), pinned)
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 255
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    write_folder(images, labels, tmp_path / "digits")
    _, classes, parts, skipped = read_folder(tmp_path / "digits", 1, None, None, "data.digits.image_folder")
    assert classes == [str(d) for d in range(10)] and not skipped and set(parts) == {"train"}
    x, y = parts["train"]
    # the folder is read class by class: compare as sets of (image, label)
    theirs = sorted((img.tobytes(), int(lab)) for img, lab in zip(images, labels, strict=True))
    ours = sorted((img.tobytes(), int(lab)) for img, lab in zip(x, y, strict=True))
    assert ours == theirs


@pytest.mark.slow
@pytest.mark.fault("data", "the digits bundle is not the content params pin (another scikit-learn's, or edited)",
                   "ChecksumError naming the file, both digests and data.digits.bundle.sha256; exit 2, no folder")
def test_a_bundle_that_is_not_the_pinned_one_is_refused_before_anything_is_written(pinned, tmp_path):
    payload = gzip.decompress(bundle_path().read_bytes())
    edited = tmp_path / "digits.csv.gz"
    edited.write_bytes(gzip.compress(payload.replace(b"0,0,5,13,9,1", b"0,0,5,13,9,2", 1)))
    with pytest.raises(ChecksumError, match=r"digits.csv.gz: SHA-256 of its content is [0-9a-f]{64}, expected "
                                            rf"{pinned} \(data.digits.bundle.sha256 in params.yaml\)"):
        read_bundle(edited, pinned)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["digits"]["bundle"]["sha256"] = "0" * 64
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "tasks.digits.fetch", "--params", str(tmp_path / "params.yaml"),
                           "--out", str(tmp_path / "images")], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI":
                               f"sqlite:///{tmp_path / 'mlflow.db'}"}, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "ChecksumError" in proc.stderr and "data.digits.bundle.sha256" in proc.stderr
    assert not (tmp_path / "images").exists()


@pytest.mark.fault("data", "the digits bundle is a corrupted or truncated gzip file",
                   "DataSourceError in one line naming the file (before: a zlib.error traceback for a corrupted one)")
def test_a_corrupted_or_truncated_bundle_is_a_one_line_error_naming_it(pinned, tmp_path):
    blob = bundle_path().read_bytes()
    flipped = blob[:30] + bytes(b ^ 0xFF for b in blob[30:60]) + blob[60:]   # the header reads, the stream does not
    for damaged in (flipped, blob[:len(blob) // 2]):
        (tmp_path / "digits.csv.gz").write_bytes(damaged)
        with pytest.raises(DataSourceError, match=r"digits\.csv\.gz: cannot be read \([^\n]+\)$"):
            read_bundle(tmp_path / "digits.csv.gz", pinned)


def test_the_digits_are_read_as_an_image_folder_only(raw_params):
    raw = {**raw_params, "data": {**raw_params["data"], "digits": {**raw_params["data"]["digits"], "image_folder": None}}}
    with pytest.raises(ConfigError, match=r"data.digits: Value error, image_folder: the digits are read as the image folder"):
        parse_config(raw)


def test_a_re_pinned_bundle_remakes_the_digits_bootstrap(config, pinned, tmp_path):
    """Before: the digits' bootstrap recorded the unpinned folder's path alone, so a bundle pinned anew (and the new
    images fetch_digits wrote from it) left the old images in the snapshot and every later stage stale."""
    import shutil

    from tasks.digits.intake import INTAKE
    from tasks.snapshot import ensure

    images, labels = read_bundle(bundle_path(), pinned)
    folder = tmp_path / "images"
    write_folder(images[:300], labels[:300], folder)
    data = config.data.digits
    cfg = config.model_copy(update={"data": config.data.model_copy(update={"digits": data.model_copy(update={
        "image_folder": data.image_folder.model_copy(update={"path": str(folder)})})})})
    first = ensure(tmp_path / "raw", "digits", INTAKE, cfg)["batches"][0]
    assert first["rows"] == {"train": 300} and first["pins"]["bundle_sha256"] == pinned
    shutil.rmtree(folder)
    write_folder(images[300:700], labels[300:700], folder)   # what another bundle would write, at the same path
    repinned = cfg.model_copy(update={"data": cfg.data.model_copy(update={"digits": cfg.data.digits.model_copy(
        update={"bundle": cfg.data.digits.bundle.model_copy(update={"sha256": "f" * 64})})})})
    again = ensure(tmp_path / "raw", "digits", INTAKE, repinned)["batches"][0]
    assert again["rows"] == {"train": 400} and again["pins"]["bundle_sha256"] == "f" * 64
    assert ensure(tmp_path / "raw", "digits", INTAKE, repinned)["batches"][0] == again   # unchanged pins: kept
