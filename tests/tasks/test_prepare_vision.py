from __future__ import annotations

import gzip
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.errors import DataFormatError, DataSourceError
from tasks.images.data_config import SplitSizes
from tasks.images.idx import parse_idx
from tasks.images.prepare import planned_rows, prepare_images, split
from tasks.images.source import acquire, from_idx
from tasks.stratify import stratified_pick
from tests.conftest import ROOT, idx_bytes

TRAIN_Y, TEST_X, TEST_Y = "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
COUNTS = pytest.mark.fault("data", "an images file and its labels file with different counts (pinned as they are)",
                           "DataFormatError naming both files and both counts, exit 2 without a traceback; no output")


def test_parse_idx_round_trip():
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(idx_bytes(arr), "a", 3), arr)


@pytest.mark.parametrize("mutate,pattern", [
    (lambda b: b"\x00\x00\x08\x01" + b[4:], r"declares dtype 0x08 and 1 dims, expected .* 3 dims"),
    (lambda b: b"\x01" + b[1:], r"bad IDX magic number"),
    (lambda b: b[:-5], r"declares shape \(2, 3, 4\) .* but has"),
    (lambda b: b[:6], r"header truncated"),
])
def test_parse_idx_rejects_malformed(mutate, pattern):
    payload = mutate(idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8)))
    with pytest.raises(DataFormatError, match=pattern):
        parse_idx(payload, "f.gz", 3)


@pytest.mark.fault("data", "a crafted IDX header whose dimensions multiply to 2**64 (0 in 64-bit integers), with no "
                   "pixel after it",
                   "DataFormatError naming the file, the declared shape and its size (before: the size check passed "
                   "and a numpy reshape error stopped the stage)")
def test_an_idx_header_whose_size_wraps_in_64_bits_is_refused_naming_its_shape():
    header = b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (2**31, 2**31, 4))
    with pytest.raises(DataFormatError, match=r"^f\.gz: IDX declares shape \(2147483648, 2147483648, 4\) "
                                              rf"\({16 + 2**64} bytes\) but has 16 bytes$"):
        parse_idx(header, "f.gz", 3)


def test_prepare_prefers_source_dir_and_writes_splits(synthetic_source, tmp_path):
    src, cfg = synthetic_source
    manifest = prepare_images(cfg.data.vision, tmp_path / "out", "vision")
    assert manifest["source"].startswith("params data.vision.source_dir")
    rows = {s: v["rows"] for s, v in manifest["splits"].items()}
    assert rows == {"train": 500, "val": 100, "test": 200}
    assert manifest["splits"]["val"]["class_counts"] == [10] * 10  # stratified
    x = np.load(tmp_path / "out" / "train_x.npy")
    assert x.dtype == np.uint8 and x.shape == (500, 28, 28)


def test_split_is_seeded_and_disjoint(synthetic_source):
    src, cfg = synthetic_source
    data = cfg.data.vision
    parts = from_idx(data, "data.vision")[2]
    (a, windows), (b, _) = (split(parts, data.val_size, 0, data.seed, data.subset) for _ in range(2))
    assert windows == {"golden": list(range(len(a["test"][1])))}   # no batch after the first: no recent window
    for name in a:
        np.testing.assert_array_equal(a[name][0], b[name][0])
    train_rows = {r.tobytes() for r in a["train"][0]}
    assert not any(r.tobytes() in train_rows for r in a["val"][0])


def test_a_subset_caps_the_golden_window_and_keeps_each_later_batchs_held_out_images(synthetic_source):
    """The smoke profile's subset: training, validation and the first batch's test rows are capped; the images later
    batches hold out (a few hundred) are kept whole, so the recent window still holds enough to decide on."""
    _, cfg = synthetic_source
    data = cfg.data.vision.model_copy(update={"subset": SplitSizes(train=300, val=40, test=60),
                                              "batch_test_fraction": 0.2})
    parts = from_idx(data, "data.vision")[2]
    rng = np.random.default_rng(7)
    later = [(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10) for n in (97, 130)]
    splits, windows = split(parts, data.val_size, 0, data.seed, data.subset, later, data.batch_test_fraction)
    assert windows == {"golden": list(range(60)), "recent": list(range(60 + 19, 60 + 19 + 26))}
    assert np.array_equal(splits["test"][0][windows["recent"][0]:], later[1][0][np.isin(
        [x.tobytes() for x in later[1][0]], [x.tobytes() for x in splits["test"][0]])])
    counts = [{"train": len(parts["train"][1]), "test": len(parts["test"][1])}, {"train": 97}, {"train": 130}]
    assert planned_rows(data, counts, "synthetic") == {name: len(y) for name, (_, y) in splits.items()}
    fewer, _ = split(parts, data.val_size, 0, data.seed, data.subset, later[:1], data.batch_test_fraction)
    assert np.array_equal(fewer["test"][0][:60], splits["test"][0][:60])   # the golden rows do not move


def test_stratified_pick_hands_out_remainder():
    labels = np.repeat(np.arange(3), [5, 5, 5])
    picked = stratified_pick(labels, 7, np.random.default_rng(0))
    assert len(picked) == 7 and len(set(picked)) == 7


def test_no_source_lists_every_source_tried(synthetic_source, tmp_path):
    _, cfg = synthetic_source
    data = cfg.data.vision.model_copy(update={"source_dir": str(tmp_path / "empty")})
    with pytest.raises(DataSourceError) as err:
        acquire(data, "data.vision")
    text = str(err.value)
    assert "params data.vision.source_dir" in text and "Debian dataset-fashion-mnist" in text
    assert "official URL http://127.0.0.1:9/" in text and "missing train-images-idx3-ubyte.gz" in text
    # a data set without a download URL: the sources tried, not an AssertionError's traceback
    with pytest.raises(DataSourceError, match=r"params data.vision.url: not set"):
        acquire(data.model_copy(update={"url": None}), "data.vision")


def test_falls_back_to_download_cache(synthetic_source, tmp_path):
    """A populated download cache is a source of its own: nothing is fetched when every file is there."""
    src, cfg = synthetic_source
    cache = tmp_path / "dl"
    cache.mkdir()
    for f in src.iterdir():
        (cache / f.name).write_bytes(f.read_bytes())
    data = cfg.data.vision.model_copy(update={"source_dir": None})
    source, raw = acquire(data, "data.vision")
    assert source.startswith("download") and set(raw) == set(cfg.data.vision.sha256)


def test_real_fashion_mnist_matches_pins(real_splits):
    train_x, train_y = real_splits["train"]
    assert train_x.shape[1:] == (28, 28) and set(np.unique(train_y)) == set(range(10))


def _write_idx(src: Path, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Write ``arrays`` over the source's files; return their pins, as a user re-pinning params.yaml would."""
    pins = {}
    for name, arr in arrays.items():
        payload = idx_bytes(arr)
        (src / f"{name}.gz").write_bytes(gzip.compress(payload, mtime=0))
        pins[name] = hashlib.sha256(payload).hexdigest()
    return pins


@pytest.mark.parametrize("arrays,update,pattern", [
    pytest.param({TRAIN_Y: np.repeat(np.arange(10, dtype=np.uint8), 60)[:599]}, {},
                 r"train-images-idx3-ubyte\.gz has 600 images but train-labels-idx1-ubyte\.gz has 599 labels",
                 id="train-counts", marks=COUNTS),
    pytest.param({TEST_X: np.zeros((150, 28, 28), np.uint8)}, {},
                 r"t10k-images-idx3-ubyte\.gz has 150 images but t10k-labels-idx1-ubyte\.gz has 200 labels",
                 id="test-counts", marks=COUNTS),
    pytest.param({TEST_X: np.zeros((200, 32, 32), np.uint8)}, {},
                 r"t10k-images-idx3-ubyte\.gz holds 32x32 images but train-images-idx3-ubyte\.gz 28x28",
                 id="image-size", marks=pytest.mark.fault(
                     "data", "test images of another size than the training images (pinned as they are)",
                     "DataFormatError naming both files and both sizes; no output")),
    pytest.param({TEST_X: np.zeros((0, 28, 28), np.uint8), TEST_Y: np.zeros(0, np.uint8)}, {},
                 r"t10k-images-idx3-ubyte\.gz and t10k-labels-idx1-ubyte\.gz hold no rows", id="empty-test",
                 marks=pytest.mark.fault("data", "an images file and its labels file with no rows (pinned as they are)",
                                         "DataFormatError naming both files; no output")),
    pytest.param({}, {"val_size": 600},
                 r"data\.vision\.val_size \(600\) in params\.yaml must be smaller than the 600 rows of "
                 r"train-labels-idx1-ubyte\.gz", id="val-size", marks=pytest.mark.fault(
                     "data", "data.vision.val_size not smaller than the training rows",
                     "DataFormatError naming val_size, the file and its rows; no output")),
])
def test_inconsistent_raw_files_are_named_before_anything_is_written(synthetic_source, tmp_path, arrays, update,
                                                                     pattern):
    src, cfg = synthetic_source
    pins = {**cfg.data.vision.sha256, **_write_idx(src, arrays)}
    # the smoke profile's subset: with it, a test-count mismatch failed in split too (IndexError)
    subset = SplitSizes(train=300, val=50, test=100)
    data = cfg.data.vision.model_copy(update={"sha256": pins, "subset": subset, **update})
    with pytest.raises(DataFormatError, match=rf"source_dir \({re.escape(str(src))}\): {pattern}"):
        prepare_images(data, tmp_path / "out", "vision")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow   # the stage as a process of its own: ~17 s
@COUNTS
def test_the_stage_cli_reports_inconsistent_files_in_one_line_and_exits_2(synthetic_source, raw_params, tmp_path):
    src, cfg = synthetic_source
    pins = {**cfg.data.vision.sha256, **_write_idx(src, {TRAIN_Y: np.zeros(599, np.uint8)})}
    vision = {**raw_params["data"]["vision"], **cfg.data.vision.model_dump(mode="json"), "sha256": pins}
    params = {**raw_params, "data": {**raw_params["data"], "vision": vision}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("PIPELINE_PARENT_RUN_ID", None)
    # the published files are read where they join the raw snapshot (stage snapshot_vision): nothing is kept of them
    proc = subprocess.run([sys.executable, "-m", "tasks.vision.snapshot", "--snapshot", "data/raw", "--params",
                           "params.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and errors[0].startswith("error: DataFormatError: ") and "has 599 labels" in errors[0]
    assert not (tmp_path / "data" / "raw").exists() and not list((tmp_path / "data").rglob("*.gz"))


def test_a_later_batch_holds_out_no_repeat_and_one_without_repeats_splits_as_before():
    from tasks.images.prepare import carve, digests, hold_out

    gen = np.random.default_rng(0)
    x, y = gen.integers(0, 256, (200, 4, 4), dtype=np.uint8), np.arange(200) % 5
    plain = carve(x, y, 30, np.random.default_rng([7, 1, 1]))
    same = hold_out(x, y, 30, np.random.default_rng([7, 1, 1]), set())
    for a, b in zip((*plain[0], *plain[1]), (*same[0], *same[1]), strict=True):   # bit for bit
        np.testing.assert_array_equal(a, b)
    repeated = x.copy()
    repeated[:10] = x[10:20]   # ten pairs within the batch, and ten images seen in an earlier batch
    seen = set(digests(x[20:30]))
    _, (held, labels) = hold_out(repeated, y, 30, np.random.default_rng([7, 1, 1]), seen)
    assert len(labels) == 30 and not set(digests(held)) & (seen | set(digests(x[10:20])))
    with pytest.raises(DataFormatError, match=r"a batch of 200 images holds only 20 seen neither before nor twice"):
        hold_out(x, y, 30, np.random.default_rng(0), set(digests(x[20:])))


def test_a_later_batchs_validation_rows_are_never_copies_of_training_images():
    """Before: the test rows of a later batch left out repeated images, its validation rows did not: a copy of a
    training image could be a validation row, and the scores recipes are chosen on read it as unseen."""
    from tasks.images.prepare import digests, split

    gen = np.random.default_rng(0)
    x, y = gen.integers(0, 256, (100, 4, 4), dtype=np.uint8), np.arange(100) % 2
    test = (gen.integers(0, 256, (20, 4, 4), dtype=np.uint8), np.arange(20) % 2)
    fresh = gen.integers(0, 256, (30, 4, 4), dtype=np.uint8)
    later = [(np.concatenate([x[:10], fresh]), np.concatenate([y[:10], np.arange(30) % 2]))]   # 10 repeats
    splits, _ = split({"train": (x, y), "test": test}, 20, 0, 0, None, later, test_share=0.1)
    train, val = (set(digests(splits[name][0])) for name in ("train", "val"))
    assert len(splits["val"][1]) == 20 + round(36 * 20 / 100) and not train & val
    plain = [(fresh, np.arange(30) % 2)]   # a batch without repeats: split as it always was
    before, _ = split({"train": (x, y), "test": test}, 20, 0, 0, None, plain, test_share=0.1)
    for name, (images, labels) in before.items():
        assert len(labels) == {"train": 80 + 27 - 5, "val": 20 + 5, "test": 23}[name], name
