from __future__ import annotations

import numpy as np
import pytest

from tasks.errors import DataFormatError, DataSourceError
from tasks.idx import parse_idx
from tasks.prepare_vision import acquire, decode, prepare_vision, split, stratified_pick
from tests.conftest import idx_bytes


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


def test_prepare_prefers_source_dir_and_writes_splits(synthetic_source, tmp_path):
    src, cfg = synthetic_source
    manifest = prepare_vision(cfg.data.vision, tmp_path / "out")
    assert manifest["source"].startswith("params data.vision.source_dir")
    rows = {s: v["rows"] for s, v in manifest["splits"].items()}
    assert rows == {"train": 500, "val": 100, "test": 200}
    assert manifest["splits"]["val"]["class_counts"] == [10] * 10  # stratified
    x = np.load(tmp_path / "out" / "train_x.npy")
    assert x.dtype == np.uint8 and x.shape == (500, 28, 28)


def test_split_is_seeded_and_disjoint(synthetic_source):
    src, cfg = synthetic_source
    _, raw = acquire(cfg.data.vision)
    arrays = decode(raw, cfg.data.vision.sha256, "src")
    a, b = split(arrays, cfg.data.vision), split(arrays, cfg.data.vision)
    for name in a:
        np.testing.assert_array_equal(a[name][0], b[name][0])
    train_rows = {r.tobytes() for r in a["train"][0]}
    assert not any(r.tobytes() in train_rows for r in a["val"][0])


def test_stratified_pick_hands_out_remainder():
    labels = np.repeat(np.arange(3), [5, 5, 5])
    picked = stratified_pick(labels, 7, np.random.default_rng(0))
    assert len(picked) == 7 and len(set(picked)) == 7


def test_no_source_lists_every_source_tried(synthetic_source, tmp_path):
    _, cfg = synthetic_source
    data = cfg.data.vision.model_copy(update={"source_dir": str(tmp_path / "empty")})
    with pytest.raises(DataSourceError) as err:
        acquire(data)
    text = str(err.value)
    assert "params data.vision.source_dir" in text and "Debian dataset-fashion-mnist" in text
    assert "official URL http://127.0.0.1:9/" in text and "missing train-images-idx3-ubyte.gz" in text


def test_falls_back_to_download_cache(synthetic_source, tmp_path):
    """A populated download cache is a source of its own: nothing is fetched when every file is there."""
    src, cfg = synthetic_source
    cache = tmp_path / "dl"
    cache.mkdir()
    for f in src.iterdir():
        (cache / f.name).write_bytes(f.read_bytes())
    data = cfg.data.vision.model_copy(update={"source_dir": None})
    source, raw = acquire(data)
    assert source.startswith("download") and set(raw) == set(cfg.data.vision.sha256)


def test_real_fashion_mnist_matches_pins(real_splits):
    train_x, train_y = real_splits["train"]
    assert train_x.shape[1:] == (28, 28) and set(np.unique(train_y)) == set(range(10))
