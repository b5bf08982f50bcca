"""MovieLens sources, checksums, the CTR protocol and the splits, on a small synthetic copy in both formats."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tasks.errors import ChecksumError, DataSourceError
from tasks.movielens import acquire
from tasks.prepare_recsys import FIELDS, prepare_recsys


def test_recbole_files_and_the_grouplens_zip_give_the_same_tables(synthetic_movielens):
    recbole, grouplens, cfg = synthetic_movielens
    source, from_recbole = acquire(cfg.data.recsys)
    assert str(recbole) in source
    _, from_zip = acquire(cfg.data.recsys.model_copy(update={"source_dir": str(grouplens)}))
    for name in ("ratings", "users", "items"):
        pd.testing.assert_frame_equal(from_recbole[name], from_zip[name])
    assert list(from_recbole["ratings"].columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert from_recbole["items"].genres.str.contains("|", regex=False).any()


def test_a_file_that_does_not_match_its_pin_is_refused(synthetic_movielens):
    recbole, _, cfg = synthetic_movielens
    with open(recbole / "ml-100k.inter", "a") as fh:
        fh.write("1\t1\t5\t1\n")
    with pytest.raises(ChecksumError, match=r"ml-100k\.inter has SHA-256 .*\(data\.recsys\.sha256"):
        acquire(cfg.data.recsys)


def test_no_source_names_every_place_it_tried(synthetic_movielens, tmp_path):
    _, _, cfg = synthetic_movielens
    with pytest.raises(DataSourceError, match=r"(?s)source_dir .*PyPI wheel recbole==0\.0\.0.*GroupLens"):
        acquire(cfg.data.recsys.model_copy(update={"source_dir": str(tmp_path / "empty")}))


def test_protocol_drops_rating_three_and_labels_the_rest(synthetic_movielens, tmp_path):
    _, _, cfg = synthetic_movielens
    manifest = prepare_recsys(cfg.data.recsys, tmp_path / "out")
    rows = pd.read_csv(tmp_path / "out" / "interactions.csv")
    assert 3 not in set(rows.rating) and set(rows.rating) == {1, 2, 4, 5}
    assert (rows.label == (rows.rating >= 4)).all()
    sizes = {s: v["rows"] for s, v in manifest["splits"].items()}
    assert sum(sizes.values()) == len(rows) and abs(sizes["test"] - round(0.1 * len(rows))) <= 1
    fields = np.load(tmp_path / "out" / "train_fields.npy")
    assert fields.shape == (sizes["train"], len(FIELDS)) and fields.dtype == np.int64
    for i, field in enumerate(manifest["fields"]):  # every column inside its own field's rows
        assert field["offset"] <= fields[:, i].min() and fields[:, i].max() < field["offset"] + field["size"]
    assert np.load(tmp_path / "out" / "train_genres.npy").shape[1] == 19
    assert json.loads((tmp_path / "out" / "features.json").read_text())["vocabulary"] == sum(
        f["size"] for f in manifest["fields"])


def test_splits_are_seeded_and_the_temporal_split_puts_the_newest_last(synthetic_movielens, tmp_path):
    _, _, cfg = synthetic_movielens
    prepare_recsys(cfg.data.recsys, tmp_path / "a")
    prepare_recsys(cfg.data.recsys, tmp_path / "b")
    assert (tmp_path / "a" / "interactions.csv").read_bytes() == (tmp_path / "b" / "interactions.csv").read_bytes()
    temporal = cfg.data.recsys.model_copy(update={"split": cfg.data.recsys.split.model_copy(update={"method": "temporal"})})
    prepare_recsys(temporal, tmp_path / "t")
    rows = pd.read_csv(tmp_path / "t" / "interactions.csv")
    newest = rows.groupby("split").timestamp.agg(["min", "max"])
    assert newest.loc["train", "max"] <= newest.loc["val", "min"] and newest.loc["val", "max"] <= newest.loc["test", "min"]
