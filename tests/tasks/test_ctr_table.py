"""A user's click-through table through the click-through kit: read by its declared schema (CSV or Parquet, the same
values from either), encoded from the training rows, encodable by a client from the registered vocabulary alone,
numeric columns binned at their training quantiles, checked by its contract, learned by a model with several multi-hot
groups that exports to ONNX, and a champion of an older version of the table scored in its own encoding. Real
files, real Great Expectations, PyTorch and onnxruntime."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.ctr.table import as_text, encode_with, prepare_table, read_table
from tasks.ctr.table_config import TableData, TableSplit, TableValidation
from tasks.ctr.table_validate import load_splits, validate_table
from tasks.errors import DataFormatError

RULES = TableValidation(positive_fraction=0.5, positive_tolerance=0.2, split_tolerance=0.05,
                        min_rows={"train": 100, "val": 20, "test": 20})
WHERE = "data.mine"


def _table(rows: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Clicks that depend on the device and on the tags: learnable from the declared columns."""
    rng = np.random.default_rng(seed)
    device = rng.choice(["phone", "tablet", "desktop"], rows)
    country = rng.choice([f"c{i}" for i in range(30)], rows)
    topics = ["|".join(rng.choice(["news", "sport", "music", "film"], rng.integers(0, 3), replace=False))
              for _ in range(rows)]
    ads = [",".join(rng.choice(["a", "b", "c"], rng.integers(1, 3), replace=False)) for _ in range(rows)]
    p = 0.2 + 0.5 * (device == "phone") + 0.2 * np.array(["sport" in t for t in topics])
    return pd.DataFrame({"event": np.arange(rows), "device": device, "country": country, "topics": topics,
                         "ads": ads, "clicked": np.where(rng.random(rows) < p, "true", "false")})


def _priced(rows: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Clicks that fall with a price: learnable only through the numeric column; an age beside it that does not
    matter; the split from a column, so that the training rows are known."""
    frame = _table(rows, seed)
    rng = np.random.default_rng(seed + 7)
    price = np.round(rng.gamma(2.0, 20.0, rows), 2)
    return frame.assign(price=price, age=rng.integers(18, 80, rows), part=np.where(
        frame.index >= rows * 0.9, "test", np.where(frame.index >= rows * 0.8, "val", "train")),
        clicked=np.where(rng.random(rows) < np.where(price < 30, 0.8, 0.2), "true", "false"))


NUMERIC = {"numeric": [{"column": "price", "buckets": 8}, {"column": "age", "buckets": 4}],
           "split": {"method": "column", "column": "part"}}


def _schema(path: str, **extra) -> TableData:
    return TableData(**{"table": {"path": path}, "label": "clicked", "categorical": ["device", "country"],
                        "multi_hot": [{"column": "topics"}, {"column": "ads", "separator": ","}],
                        "split": {"method": "hash", "val": 0.1, "test": 0.1, "key": ["event"]}, "seed": 0,
                        **extra})


def _prepare(frame: pd.DataFrame, tmp_path, name: str, **schema) -> dict:
    frame.to_csv(tmp_path / f"{name}.csv", index=False)
    return prepare_table(_schema(f"{name}.csv", **schema), tmp_path / name, WHERE, tmp_path)


def test_a_parquet_table_and_its_csv_read_the_same_values(tmp_path):
    frame = _table()
    frame["device"] = frame.device.astype(object)
    frame.loc[3, "device"] = None                       # missing in both formats
    frame.loc[4, "device"] = "NA"                       # a value in both formats, not a missing one
    frame["country"] = frame.event.astype(float) % 7    # integer ids that Parquet stores as floats beside a null
    frame.loc[5, "country"] = np.nan
    frame.assign(country=frame.country.astype("Int64").astype(str).replace("<NA>", "")).to_csv(
        tmp_path / "t.csv", index=False)                # the CSV a user exports: 3, not 3.0
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    from_csv, from_parquet = (read_table(_schema(name), WHERE, tmp_path) for name in ("t.csv", "t.parquet"))
    pd.testing.assert_frame_equal(from_csv, from_parquet)
    assert from_csv.device[3] is None and from_csv.device[4] == "NA" and from_csv.country[6] == "6"
    assert from_csv.country[5] is None
    big = as_text(pd.Series([2.0**63 * 10, np.nan, 3.0]), "t.parquet")   # whole floats past int64 too
    assert big.tolist() == ["92233720368547758080", None, "3"]
    csv, parquet = (prepare_table(_schema(f"t.{kind}"), tmp_path / kind, WHERE, tmp_path)
                    for kind in ("csv", "parquet"))
    assert csv["splits"] == parquet["splits"] and sum(s["rows"] for s in csv["splits"].values()) == 2000
    for name in ("train_fields", "train_genres", "test_fields", "test_y"):
        assert np.array_equal(np.load(tmp_path / "csv" / f"{name}.npy"), np.load(tmp_path / "parquet" / f"{name}.npy"))
    frame.assign(topics=[t.split("|") for t in frame.topics]).to_parquet(tmp_path / "lists.parquet", index=False)
    with pytest.raises(DataFormatError, match=r"column 'topics' holds lists; write tags as one text value"):
        read_table(_schema("lists.parquet"), WHERE, tmp_path)


def test_typed_cells_read_as_the_training_rows_text_value_by_value(tmp_path):
    """A client's typed rows (ids as numbers) encode as the training rows did (before: every such id fell to the
    'other' row); one fractional value in a float column leaves every other value's text, and so each row's split
    hash, as it was (before: 88 became 88.0 for all); an int64 id past 2**53 beside a null keeps its digits (before:
    read as a float, two ids merged)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = _table()
    frame["country"] = (frame.event % 37).astype(float)   # integer ids, stored as floats beside a null
    frame.loc[7, "country"] = np.nan
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    prepare_table(_schema("t.parquet"), tmp_path / "out", WHERE, tmp_path)
    vocab = json.loads((tmp_path / "out" / "vocabulary.json").read_text())
    text = pd.read_parquet(tmp_path / "out" / "test_rows.parquet")
    typed = text.assign(country=pd.to_numeric(text.country))   # what a client's JSON request holds: 3, not "3"
    assert np.array_equal(encode_with(typed, vocab)[0], np.load(tmp_path / "out" / "test_fields.npy"))
    assert (encode_with(typed, vocab)[0][:, 1] > vocab["fields"][1]["offset"]).mean() > 0.9   # known, not row 0

    before = read_table(_schema("t.parquet"), WHERE, tmp_path)
    grown = pd.concat([frame, frame.iloc[[0]].assign(event=len(frame), country=12.5)], ignore_index=True)
    grown.to_parquet(tmp_path / "grown.parquet", index=False)
    after = read_table(_schema("grown.parquet"), WHERE, tmp_path)
    assert after.country[: len(frame)].tolist() == before.country.tolist() and after.country.iloc[-1] == "12.5"

    ids = [1234567890123456789, 1234567890123456790, None, 7]
    pq.write_table(pa.table({"event": pa.array(ids, pa.int64()), "device": ["a", "b", "c", "d"],   # as Spark writes
                             "country": ["x"] * 4, "topics": [""] * 4, "ads": ["a"] * 4,
                             "clicked": ["true", "false", "true", "false"]}), tmp_path / "ids.parquet")
    assert read_table(_schema("ids.parquet"), WHERE, tmp_path).event.tolist() == [
        "1234567890123456789", "1234567890123456790", None, "7"]


def test_integer_ids_a_csv_writes_as_floats_encode_as_the_parquet_files_and_a_clients(tmp_path):
    """pandas writes an integer column with nulls as floats ("196.0"). Before: a CSV's vocabulary kept "196.0", so
    the same frame as Parquet (196) encoded other embedding rows, and a client's typed 196 fell to the 'other' row.
    A whole number written as a float is that integer as a category, in the vocabulary and when encoding; a
    vocabulary written before (values "196.0") encodes 196, "196" and "196.0" alike. The text a row's split is
    hashed from stays as written: no row moves between splits."""
    frame = _table()
    frame["country"] = (frame.event % 37).astype(float)
    frame.loc[[7, 8], "country"] = np.nan
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    assert ",12.0," in (tmp_path / "t.csv").read_text()
    for kind in ("csv", "parquet"):
        prepare_table(_schema(f"t.{kind}"), tmp_path / kind, WHERE, tmp_path)
    for name in ("train_fields", "test_fields"):
        assert np.array_equal(np.load(tmp_path / "csv" / f"{name}.npy"), np.load(tmp_path / "parquet" / f"{name}.npy"))
    csv, parquet = (json.loads((tmp_path / kind / "vocabulary.json").read_text()) for kind in ("csv", "parquet"))
    assert csv["fields"][1]["values"] == parquet["fields"][1]["values"] and "12" in csv["fields"][1]["values"]
    rows = pd.read_parquet(tmp_path / "csv" / "test_rows.parquet")
    assert set(rows.country.dropna()) <= {f"{i}.0" for i in range(37)}   # as written: each row's split hash as before
    fields = np.load(tmp_path / "csv" / "test_fields.npy")
    typed = rows.assign(country=pd.to_numeric(rows.country))            # a client's JSON: 12, not "12.0"
    for request, vocab in ((typed, csv), (rows.assign(country=typed.country.astype("Int64").astype(str)), csv),
                           (typed, {**csv, "fields": [csv["fields"][0], {**csv["fields"][1], "values": [
                               f"{v}.0" for v in csv["fields"][1]["values"]]}]})):   # a vocabulary written before
        assert np.array_equal(encode_with(request, vocab)[0], fields)
    assert (fields[:, 1] > csv["fields"][1]["offset"]).mean() > 0.9   # known ids, not the 'other' row


def test_fields_and_tags_are_encoded_from_the_training_rows_with_a_row_for_other_values(tmp_path):
    frame = _table()
    frame["part"] = np.where(frame.index >= 1950, "test", np.where(frame.index >= 1750, "val", "train"))
    frame.loc[frame.index[-50:], "country"] = "never-seen"     # a country only outside training
    frame.loc[frame.index[:5], "country"] = np.nan              # missing
    manifest = _prepare(frame, tmp_path, "out", split={"method": "column", "column": "part"})
    vocab = json.loads((tmp_path / "out" / "vocabulary.json").read_text())
    device, country = vocab["fields"]
    assert (device["name"], device["values"], device["offset"], device["size"]) == (
        "device", ["desktop", "phone", "tablet"], 0, 4)                # row 0 of each field: other values
    assert country["offset"] == 4 and "never-seen" not in country["values"]
    assert (np.load(tmp_path / "out" / "test_fields.npy")[:, 1] == 4).all()    # the unseen country: row 0
    assert (np.load(tmp_path / "out" / "train_fields.npy")[:5, 1] == 4).all()  # so is a missing one
    assert [(g["name"], g["offset"], g["size"], g["tags"]) for g in vocab["groups"]] == [
        ("topics", 0, 4, ["film", "music", "news", "sport"]), ("ads", 4, 3, ["a", "b", "c"])]
    assert manifest["groups"] == [{"name": "topics", "offset": 0, "size": 4}, {"name": "ads", "offset": 4, "size": 3}]
    first = frame.iloc[0]
    expected = [t in first.topics.split("|") for t in vocab["groups"][0]["tags"]] + \
               [a in first.ads.split(",") for a in vocab["groups"][1]["tags"]]
    assert np.load(tmp_path / "out" / "train_genres.npy")[0].tolist() == [float(x) for x in expected]


def test_a_client_encodes_raw_rows_from_the_registered_vocabulary_alone(tmp_path):
    """vocabulary.json lists fields and tag groups in input order with their offsets (a JSON object's keys would be
    sorted), a group left without frequent tags keeping its one column: raw rows encoded from it alone are the
    arrays the model trained and is tested on."""
    frame = _table()
    frame["rare"] = [f"only-{i}" for i in range(len(frame))]   # every tag seen once: below min_count
    frame["zone"] = np.where(frame.index % 2 == 0, "a", "b")     # sorts before "device": order must not follow names
    schema = {"categorical": ["zone", "device", "country"], "min_count": 2,
              "multi_hot": [{"column": "topics"}, {"column": "rare"}, {"column": "ads", "separator": ","}]}
    _prepare(frame, tmp_path, "out", **schema)
    vocab = json.loads((tmp_path / "out" / "vocabulary.json").read_text())
    assert [f["name"] for f in vocab["fields"]] == ["zone", "device", "country"]
    assert [(g["name"], g["size"], g["tags"]) for g in vocab["groups"]][1] == ("rare", 1, [])
    test_rows = pd.read_parquet(tmp_path / "out" / "test_rows.parquet")
    fields, genres = encode_with(test_rows, vocab)
    assert np.array_equal(fields, np.load(tmp_path / "out" / "test_fields.npy"))
    assert np.array_equal(genres, np.load(tmp_path / "out" / "test_genres.npy")) and genres.shape[1] == 4 + 1 + 3


def test_rare_values_share_the_other_row_and_a_table_without_tags_gets_one_zero_column(tmp_path):
    frame = _table()
    frame.loc[frame.index[:1000], "country"] = "big"   # one country in half the rows, 29 in ~34 rows each
    manifest = _prepare(frame, tmp_path, "out", multi_hot=[], min_count=100)
    vocab = json.loads((tmp_path / "out" / "vocabulary.json").read_text())
    device, country = vocab["fields"]
    assert country["values"] == ["big"] and device["values"] == ["desktop", "phone", "tablet"]   # ~530 rows each
    rows = pd.read_parquet(tmp_path / "out" / "test_rows.parquet")
    codes = np.load(tmp_path / "out" / "test_fields.npy")[:, 1]
    assert set(codes[rows.country.to_numpy() == "big"]) == {country["offset"] + 1}
    assert set(codes[rows.country.to_numpy() != "big"]) == {country["offset"]}   # the rare ones share row 0
    assert manifest["groups"] == [{"name": "", "offset": 0, "size": 1}] and manifest["genres"] == ["(none)"]
    assert not np.load(tmp_path / "out" / "val_genres.npy").any()


@pytest.mark.fault("data", "a user's click table without a declared column, with a label that is no click, or "
                   "with a numeric column's value that is no finite number (or no value of it in the training rows)",
                   "the prepare stage stops in one line naming the file, the column and rows; nothing is written")
def test_a_table_that_does_not_match_its_schema_is_refused_in_one_line(tmp_path):
    frame = _table()
    frame.drop(columns=["ads"]).to_csv(tmp_path / "no-ads.csv", index=False)
    with pytest.raises(DataFormatError, match=r"^no-ads\.csv: has no column ads declared in data\.mine \(its "
                                              r"columns: event, device"):
        prepare_table(_schema("no-ads.csv"), tmp_path / "a", WHERE, tmp_path)
    frame.loc[1207, "clicked"] = "maybe"
    frame.to_csv(tmp_path / "bad-label.csv", index=False)
    with pytest.raises(DataFormatError, match=r"label column 'clicked' holds 1 value\(s\).*row 1207: 'maybe'"):
        prepare_table(_schema("bad-label.csv", subset=1500, seed=3), tmp_path / "b", WHERE, tmp_path)
    priced = _priced().astype({"price": object})
    priced.loc[[42, 1900], "price"] = ["cheap", "inf"]
    priced.to_csv(tmp_path / "bad-price.csv", index=False)
    with pytest.raises(DataFormatError, match=r"^bad-price\.csv: numeric column 'price' holds 2 value\(s\) that are "
                                              r"not finite numbers \(row 42: 'cheap', row 1900: 'inf'\); text that "
                                              r"means missing belongs in na_values$"):
        prepare_table(_schema("bad-price.csv", **NUMERIC), tmp_path / "c", WHERE, tmp_path)
    _priced().assign(price=lambda f: f.price.where(f.part != "train")).to_csv(tmp_path / "no-price.csv", index=False)
    with pytest.raises(DataFormatError, match=r"numeric column 'price' holds no value in the training rows"):
        prepare_table(_schema("no-price.csv", **NUMERIC), tmp_path / "d", WHERE, tmp_path)
    assert not any((tmp_path / name).exists() for name in "abcd")


@pytest.mark.fault("data", "a user's click table with a header (CSV) or a schema (Parquet) and no rows",
                   "the prepare stage stops in one line naming the file (before: ValueError: Item wrong length 2 "
                   "instead of 0, from the hash split)")
def test_a_table_without_rows_is_refused_in_one_line(tmp_path):
    """Before: a header alone went on to the hash split, where the hash of no rows came out as one value per key
    column (``ValueError: Item wrong length 2 instead of 0``)."""
    empty = _table().iloc[:0]
    empty.to_csv(tmp_path / "empty.csv", index=False)
    empty.to_parquet(tmp_path / "empty.parquet", index=False)
    for name in ("empty.csv", "empty.parquet"):
        with pytest.raises(DataFormatError, match=rf"^{re.escape(name)}: no rows$"):
            prepare_table(_schema(name, split={"method": "hash", "key": ["event", "device"]}), tmp_path / "out",
                          WHERE, tmp_path)
    assert not (tmp_path / "out").exists()


def _flipped(blob: bytes) -> bytes:
    """``blob`` with bytes in its first deflate block inverted: the gzip header reads, the stream does not."""
    return blob[:30] + bytes(b ^ 0xFF for b in blob[30:60]) + blob[60:]


@pytest.mark.fault("data", "a user's click table that is a truncated or corrupted .gz / .bz2 file",
                   "the prepare stage stops in one line naming the file (before: an EOFError or zlib.error traceback)")
@pytest.mark.parametrize("name,damage", [("cut.csv.gz", lambda b: b[:len(b) // 2]), ("flipped.csv.gz", _flipped),
                                         ("cut.csv.bz2", lambda b: b[:-20])])
def test_a_truncated_or_corrupted_compressed_table_is_a_one_line_error_naming_it(tmp_path, name, damage):
    import bz2
    import gzip

    text = _table().to_csv(index=False).encode()
    blob = bz2.compress(text) if name.endswith(".bz2") else gzip.compress(text)
    (tmp_path / name).write_bytes(damage(blob))
    with pytest.raises(DataFormatError, match=rf"^{re.escape(name)}: cannot be read as csv \(.+\)$"):
        read_table(_schema(name), WHERE, tmp_path)


def test_a_split_setting_the_method_would_ignore_is_refused():
    assert TableSplit(method="column", column="part").column == "part"
    for wrong, why in (({"method": "column", "column": "part", "key": ["id"]}, "would be ignored"),
                       ({"method": "column", "column": "part", "test": 0.2}, "would be ignored"),
                       ({"method": "hash", "column": "part"}, "`column` would be ignored"),
                       ({"method": "column"}, "needs `column`")):
        with pytest.raises(ValueError, match=why):
            TableSplit(**wrong)
    assert _schema("t.csv", split={"method": "hash"}).split_key() == ["device", "country", "topics", "ads"]
    assert TableSplit(method="time", column="when", test=0.2).column == "when"
    for wrong, why in (({"method": "time"}, "method time needs `column`"),
                       ({"method": "time", "column": "when", "key": ["id"]}, "`key` would be ignored")):
        with pytest.raises(ValueError, match=why):
            TableSplit(**wrong)


def test_a_time_split_tests_on_the_newest_rows_and_keeps_rows_of_one_time_together(tmp_path):
    """The newest 10 % by time are test, the 10 % before them val: what a model trained today meets tomorrow. Epoch
    seconds and ISO dates split alike; a row without a readable time stops the stage naming it."""
    frame = _table().sample(frac=1.0, random_state=1)                  # rows not in time order in the file
    frame["when"] = 1_700_000_000 + 3600 * (frame.event // 4)          # four rows an hour (ties: below)
    frame.to_csv(tmp_path / "epoch.csv", index=False)
    frame.assign(when=pd.to_datetime(frame.when, unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")).to_csv(
        tmp_path / "iso.csv", index=False)
    by_time = {"split": {"method": "time", "column": "when", "val": 0.1, "test": 0.1}}
    manifest = prepare_table(_schema("epoch.csv", **by_time), tmp_path / "epoch", WHERE, tmp_path)
    assert {k: v["rows"] for k, v in manifest["splits"].items()} == {"train": 1600, "val": 200, "test": 200}
    assert manifest["split_times"] == {"val_from": 1_700_000_000 + 3600 * 400, "test_from": 1_700_000_000 + 3600 * 450}
    test_rows = pd.read_parquet(tmp_path / "epoch" / "test_rows.parquet")
    assert sorted(test_rows.when.astype(int)) == sorted(frame.when[frame.event >= 1800])
    iso = prepare_table(_schema("iso.csv", **by_time), tmp_path / "iso", WHERE, tmp_path)
    assert iso["splits"] == manifest["splits"] and iso["split_times"] == manifest["split_times"]   # in seconds
    for split in ("train", "val", "test"):
        assert np.array_equal(*(np.load(tmp_path / kind / f"{split}_y.npy") for kind in ("iso", "epoch")))
    frame.loc[frame.event == 1999, "when"] = 1_700_000_000 + 3600 * 449   # five rows in the hour at the test cut
    frame.to_csv(tmp_path / "tie.csv", index=False)
    tie = prepare_table(_schema("tie.csv", **by_time), tmp_path / "tie", WHERE, tmp_path)
    assert {k: v["rows"] for k, v in tie["splits"].items()} == {"train": 1600, "val": 196, "test": 204}   # all five
    assert tie["split_times"]["test_from"] == 1_700_000_000 + 3600 * 449
    frame.astype({"when": object}).assign(when=lambda f: f.when.where(f.event != 7, "yesterday")).to_csv(
        tmp_path / "bad.csv", index=False)
    with pytest.raises(DataFormatError, match=r"^bad\.csv: time column 'when' holds 1 value\(s\) that are neither "
                                              r"finite numbers nor dates \(row \d+: 'yesterday'\)$"):
        prepare_table(_schema("bad.csv", **by_time), tmp_path / "bad", WHERE, tmp_path)
    pd.read_csv(tmp_path / "iso.csv").assign(when=lambda f: f.when.where(f.event != 7, "2023-13-45")).to_csv(
        tmp_path / "bad-date.csv", index=False)
    with pytest.raises(DataFormatError, match=r"holds 1 value\(s\) that are neither finite numbers nor dates \(row "
                                              r"\d+: '2023-13-45'\)$"):
        prepare_table(_schema("bad-date.csv", **by_time), tmp_path / "bad", WHERE, tmp_path)
    far = pd.read_csv(tmp_path / "iso.csv").assign(when=lambda f: f.when.where(f.event != 7, "9999-12-31T00:00:00Z"))
    far.to_csv(tmp_path / "far.csv", index=False)   # an open-ended date beyond nanoseconds' range: the newest row
    prepare_table(_schema("far.csv", **by_time), tmp_path / "far", WHERE, tmp_path)
    assert "9999-12-31T00:00:00Z" in pd.read_parquet(tmp_path / "far" / "test_rows.parquet").when.tolist()
    frame.assign(when=np.where(frame.event < 1900, "2024-05-01", "2024-05-02")).to_csv(tmp_path / "flat.csv",
                                                                                        index=False)
    with pytest.raises(DataFormatError, match=r"^flat\.csv: the split by time column 'when' leaves no train rows: "
                                              r"1900 rows share the time '2024-05-01' at its cut \(rows of one time "
                                              r"stay in one split\)$"):
        prepare_table(_schema("flat.csv", **by_time), tmp_path / "flat", WHERE, tmp_path)
    frame.head(2).to_csv(tmp_path / "tiny.csv", index=False)
    with pytest.raises(DataFormatError, match=r"^tiny\.csv: 2 rows are too few to split by time: test takes 1, val 1$"):
        prepare_table(_schema("tiny.csv", **by_time), tmp_path / "tiny", WHERE, tmp_path)


def test_a_schema_without_fields_or_with_a_column_twice_and_reversed_ranges_are_refused(raw_params):
    from tasks.config import parse_config
    from tasks.errors import ConfigError

    assert _schema("t.csv", categorical=[], **NUMERIC).columns()[:3] == ["clicked", "price", "age"]   # numeric only
    with pytest.raises(ValueError, match="no field: declare at least one categorical or numeric column"):
        _schema("t.csv", categorical=[])
    with pytest.raises(ValueError, match=r"columns \['device'\] are declared more than once"):
        _schema("t.csv", numeric=[{"column": "device"}])
    with pytest.raises(ValueError, match=r"ranges of \['price'\]: low is above high"):
        RULES.model_validate({**RULES.model_dump(), "ranges": {"price": [10, 1]}})
    with pytest.raises(ValueError, match=r"ranges of \['price'\]: low and high must be finite numbers"):
        RULES.model_validate({**RULES.model_dump(), "ranges": {"price": [float("nan"), 1]}})
    for key, value, kind in (("ranges", {"user_id": [0, 1]}, "numeric"), ("max_missing", {"click": 0.1},
                                                                          "categorical or numeric")):
        rules = {**raw_params["validate"], "clicks": {**raw_params["validate"]["clicks"], key: value}}
        with pytest.raises(ConfigError, match=rf"validate\.clicks\.{key}: \[.*\] are not {kind} columns of "
                                              r"data\.clicks"):
            parse_config({**raw_params, "validate": rules})
    with pytest.raises(ValueError, match=r"categorical or numeric columns may not be named \['label'\]: rename"):
        _schema("t.csv", categorical=["device", "label"])


def test_numeric_columns_are_cut_at_their_training_quantiles_and_a_client_encodes_them_alike(tmp_path):
    frame = _priced()
    frame.loc[[3, 1950], "price"] = np.nan                 # missing: row 0 of its field, in training and in test
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    manifest = _prepare(frame, tmp_path, "out", **NUMERIC)
    vocab = json.loads((tmp_path / "out" / "vocabulary.json").read_text())
    _, country, price, age = vocab["fields"]
    assert [f["kind"] for f in vocab["fields"]] == ["categorical", "categorical", "numeric", "numeric"]
    train = frame[frame.part == "train"]
    edges = np.unique(np.quantile(train.price.dropna(), np.arange(1, 8) / 8))
    assert price["edges"] == pytest.approx(edges.tolist()) and price["size"] == 2 + 7
    assert price["offset"] == country["offset"] + country["size"] and age["offset"] == price["offset"] + 9
    assert age["size"] == 2 + 3 and manifest["vocabulary"] == age["offset"] + age["size"]   # 18-79: 3 distinct edges
    codes = np.load(tmp_path / "out" / "train_fields.npy")[:, 2] - price["offset"]
    assert codes[3] == 0 and np.array_equal(np.delete(codes, 3), 1 + np.searchsorted(
        edges, np.delete(train.price.to_numpy(), 3), side="right"))
    assert np.bincount(np.delete(codes, 3))[1:].min() > 0.1 * len(train)   # eight bins of about an eighth each
    probe = frame.iloc[:3].astype({"price": object}).assign(price=[str(price["edges"][0]), None, "1e9"])
    fields, _ = encode_with(probe, vocab)                  # on an edge: the bin above it; missing: row 0
    assert fields[:, 2].tolist() == [price["offset"] + 2, price["offset"], price["offset"] + 8]
    test_rows = pd.read_parquet(tmp_path / "out" / "test_rows.parquet")
    assert np.array_equal(encode_with(test_rows, vocab)[0], np.load(tmp_path / "out" / "test_fields.npy"))
    prepare_table(_schema("t.parquet", **NUMERIC), tmp_path / "pq", WHERE, tmp_path)   # the same from Parquet
    assert json.loads((tmp_path / "pq" / "vocabulary.json").read_text()) == vocab
    assert np.array_equal(np.load(tmp_path / "pq" / "train_fields.npy"), np.load(tmp_path / "out" / "train_fields.npy"))


def test_values_declared_as_missing_read_as_missing_in_every_column(tmp_path):
    """A real export writes "unknown" where it knows nothing (MovieLens's release years: "unkonwn"): named in
    ``na_values``, such a value is missing, in a numeric column (row 0, not a refused number) as in a categorical."""
    frame = _priced().astype({"price": object})
    frame.loc[[10, 11], "price"] = "unknown"
    frame.loc[12, "device"] = "n/a"
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataFormatError, match=r"numeric column 'price' holds 2 value\(s\)"):
        prepare_table(_schema("t.csv", **NUMERIC), tmp_path / "strict", WHERE, tmp_path)
    frame.loc[13, "price"] = -1.0                        # a sentinel number: written "-1.0", listed as "-1"
    frame.to_csv(tmp_path / "t.csv", index=False)
    cfg = _schema("t.csv", na_values=["unknown", "n/a", "-1", "false"], **NUMERIC)   # "false": a label, read as is
    table = read_table(cfg, WHERE, tmp_path)
    assert table.price[10] is None and table.price[11] is None and table.device[12] is None and table.price[13] is None
    assert (table.clicked == "false").sum() == (frame.clicked == "false").sum()   # the label column is not a feature
    prepare_table(cfg, tmp_path / "out", WHERE, tmp_path)
    vocab = json.loads((tmp_path / "out" / "vocabulary.json").read_text())
    fields = np.load(tmp_path / "out" / "train_fields.npy")
    price = vocab["fields"][2]["offset"]
    assert fields[10, 2] == fields[11, 2] == fields[13, 2] == price and fields[12, 0] == 0
    assert "n/a" not in vocab["fields"][0]["values"] and vocab["na_values"] == ["unknown", "n/a", "-1", "false"]
    # a client encodes the raw row as training did, from vocabulary.json alone (before: -1.0 went into a bin)
    raw = frame.loc[[13]].astype({"price": object}).assign(price="-1.0")
    assert encode_with(raw, vocab)[0][0, 2] == price


def test_na_values_per_column_mark_only_the_columns_they_name(tmp_path):
    """A 0 that means "unknown" in one column is a real value in another: ``na_values`` as a mapping marks only the
    columns it names, in the training table as in a client's rows (vocabulary.json carries the mapping)."""
    frame = _priced()
    frame.loc[[20, 21], "age"] = 0                     # the export's "no age"
    frame.loc[22, "price"] = 0.0                       # a free item: a price, not a missing one
    frame.loc[23, "country"] = "0"
    frame.to_csv(tmp_path / "t.csv", index=False)
    cfg = _schema("t.csv", na_values={"age": ["0"], "country": ["0"]}, **NUMERIC)
    table = read_table(cfg, WHERE, tmp_path)
    assert table.age[20] is None and table.age[21] is None and table.country[23] is None
    assert float(table.price[22]) == 0.0 and table.device.notna().all()
    prepare_table(cfg, tmp_path / "out", WHERE, tmp_path)
    vocab = json.loads((tmp_path / "out" / "vocabulary.json").read_text())
    assert vocab["na_values"] == {"age": ["0"], "country": ["0"]}
    fields = np.load(tmp_path / "out" / "train_fields.npy")
    age, price = vocab["fields"][3]["offset"], vocab["fields"][2]["offset"]
    assert fields[20, 3] == fields[21, 3] == age and fields[22, 2] != price   # missing age: row 0; price 0: a bin
    encoded = encode_with(frame.loc[[20, 22]].astype(str), vocab)[0]
    assert encoded[0, 3] == age and encoded[1, 2] == fields[22, 2]
    with pytest.raises(ValueError, match=r"na_values names \['label'\], which are no categorical, numeric or "):
        _schema("t.csv", na_values={"label": ["0"]}, **NUMERIC)
    for nothing in ({}, {"age": []}):   # marks nothing, as [] does: the same data params digest a champion records
        assert _schema("t.csv", na_values=nothing, **NUMERIC).na_values == []


def test_a_vocabulary_written_before_numeric_fields_encodes_as_it_did(tmp_path):
    """A champion's vocabulary.json of the first table release names no kind and no na_values: its fields are
    categorical, and it is the same encoding as today's of the same data (no re-encoding of the test rows)."""
    from tasks.ctr.table_evaluate import same_encoding

    _prepare(_table(), tmp_path, "out")
    vocab = json.loads((tmp_path / "out" / "vocabulary.json").read_text())
    older = {k: v for k, v in vocab.items() if k != "na_values"}
    older["fields"] = [{k: v for k, v in f.items() if k != "kind"} for f in vocab["fields"]]
    rows = pd.read_parquet(tmp_path / "out" / "test_rows.parquet")
    assert all(np.array_equal(a, b) for a, b in zip(encode_with(rows, older), encode_with(rows, vocab), strict=True))
    assert same_encoding(older, vocab) and not same_encoding(older, {**vocab, "na_values": ["x"]})


def test_the_clicks_default_split_keeps_a_pair_clicked_twice_in_one_split(config):
    """A click log may hold a user's clicks on one item at several times. Before: the default key hashed the
    timestamp too, so a pair's rows fell in different splits, and the model (which reads user and item, not time) was
    tested on the very inputs it trained on."""
    from tasks.ctr.table_split import assign_splits

    rng = np.random.default_rng(0)
    pairs = pd.DataFrame({"user_id": rng.integers(1, 900, 400), "item_id": rng.integers(1, 1600, 400)})
    clicks = pd.concat([pairs.assign(timestamp=rng.integers(8.8e8, 8.9e8, 400)) for _ in range(3)], ignore_index=True)
    names, _ = assign_splits(clicks.astype(str), config.data.clicks)
    per_pair = pd.DataFrame({"pair": clicks.user_id.astype(str) + "/" + clicks.item_id.astype(str), "split": names})
    assert per_pair.groupby("pair").split.nunique().max() == 1
    assert set(names) == {"train", "val", "test"}


def test_a_champion_registered_before_numeric_columns_and_na_values_stays_comparable(config, raw_params):
    """The clicks family's data params digest before these fields existed (c5bd6f0) is still today's while they hold
    their defaults; before the fix every table family's champion read as made for another split, and the gate
    compared a candidate with none. Using one of them makes another split."""
    from tasks.config import parse_config
    from tasks.lineage import same_split

    data = raw_params["data"]
    # the split key of then (the timestamp in it: a split since changed)
    then = {**data["clicks"], "split": {**data["clicks"]["split"], "key": ["user_id", "item_id", "timestamp"]}}
    assert same_split("b49c10289a3fe387bc8c45eda697d62ef835e61b5690368804e1eef1fceeb3cd",
                      parse_config({**raw_params, "data": {**data, "clicks": then}}), "clicks")
    assert not same_split("b49c10289a3fe387bc8c45eda697d62ef835e61b5690368804e1eef1fceeb3cd", config, "clicks")
    marked = parse_config({**raw_params, "data": {**data, "clicks": {**then, "na_values": ["unkonwn"]}}})
    assert not same_split("b49c10289a3fe387bc8c45eda697d62ef835e61b5690368804e1eef1fceeb3cd", marked, "clicks")


def test_where_a_blocks_inner_source_is_found_leaves_the_data_params_as_they_were(raw_params):
    """Before: only the data block's own ``LOCATION`` fields were left out of the data params digest, so moving the
    clicks family's download cache (``data.clicks.source.download_cache``) made a champion read as split by other
    params, and the gate compared a candidate with none. What decides rows still counts (an image folder's content:
    tests/tasks/test_image_folder.py); a digest recorded by that release (b49c..., the test above) is still today's
    split."""
    import copy

    from tasks.config import parse_config
    from tasks.lineage import data_params, same_split

    def changed(family, *path_value):
        raw = copy.deepcopy(raw_params)
        *keys, value = path_value
        block = raw["data"][family]
        for key in keys[:-1]:
            block = block[key]
        block[keys[-1]] = value
        return parse_config(raw)

    today = parse_config(raw_params)
    for family, *moved in (("clicks", "source", "download_cache", "elsewhere/ml-100k"),
                           ("clicks", "source", "wheel", "version", "1.2.0")):
        assert data_params(changed(family, *moved), family) == data_params(today, family), moved
    assert not same_split(data_params(today, "clicks"), changed("clicks", "source", "positive_min_rating", 5), "clicks")


def test_how_values_encode_leaves_the_data_params_as_they_were(raw_params):
    """Before: ``min_count`` and a numeric column's ``buckets`` (how values encode; no row changes split) counted as
    split params: changing one made the champion read as split otherwise, and the gate compared a candidate with
    none (it scores a champion of another vocabulary in its own). A digest recorded before (2dac..., the params at
    6d66c9e, whose split key held the timestamp) is still that split."""
    import copy

    from tasks.config import parse_config
    from tasks.lineage import data_params, same_split

    def clicks(**changes):
        raw = copy.deepcopy(raw_params)
        raw["data"]["clicks"]["split"]["key"] = ["user_id", "item_id", "timestamp"]
        raw["data"]["clicks"].update(changes)
        return parse_config(raw)

    today, priced = clicks(), clicks(numeric=[{"column": "timestamp", "buckets": 10}])
    assert same_split("2dac4f714d2d858dd01e29b7ab88c620ce97934c3d2c0f1a48b30287242da256", today, "clicks")
    assert data_params(clicks(min_count=5), "clicks") == data_params(today, "clicks")
    assert data_params(clicks(numeric=[{"column": "timestamp", "buckets": 40}]), "clicks") == data_params(priced,
                                                                                                           "clicks")
    assert data_params(priced, "clicks") != data_params(today, "clicks")   # which columns are read still counts
    assert not same_split(data_params(today, "clicks"), clicks(seed=1), "clicks")


@pytest.mark.slow
def test_a_model_learns_what_only_a_numeric_column_says(tmp_path):
    from tasks.ctr.ctr_training import CtrSplit, evaluate_ctr, load_ctr_data

    _prepare(_priced(4000), tmp_path, "out", **NUMERIC)
    *_, test, shape = load_ctr_data(tmp_path / "out")
    assert evaluate_ctr(_trained_int8(shape, tmp_path / "out"), test)["auc"] > 0.7   # price < 30: 0.8 against 0.2
    assert len(CtrSplit.load(tmp_path / "out", "train")) == 3200


@pytest.mark.slow
def test_the_contract_passes_a_good_table_and_names_a_column_with_too_many_missing_values(tmp_path):
    frame = _table()
    _prepare(frame, tmp_path, "t")
    cfg = _schema("t.csv")
    report = validate_table("mine", read_table(cfg, WHERE, tmp_path), load_splits(tmp_path / "t"), cfg, RULES)
    assert report["success"], [c for c in report["checks"] if not c["success"]]

    frame.loc[frame.index[:300], "country"] = np.nan   # 15 % missing where none is allowed
    _prepare(frame, tmp_path, "t")
    report = validate_table("mine", read_table(cfg, WHERE, tmp_path), load_splits(tmp_path / "t"), cfg, RULES,
                            tmp_path / "docs")
    failed = [c for c in report["checks"] if not c["success"]]
    assert not report["success"] and [c["expectation"] for c in failed] == ["expect_column_values_to_not_be_null"]
    assert failed[0]["kwargs"]["column"] == "country" and (tmp_path / "docs" / "index.html").is_file()
    relaxed = RULES.model_copy(update={"max_missing": {"country": 0.2}})
    table = read_table(cfg, WHERE, tmp_path)
    assert validate_table("mine", table, load_splits(tmp_path / "t"), cfg, relaxed)["success"]


def test_the_contract_refuses_a_split_of_one_class(tmp_path):
    """Before: a validation split without a click passed the contract (its share of clicks within a wide
    tolerance), its AUC was NaN every epoch, and training kept the untrained weights without a word."""
    _prepare(_table(), tmp_path, "t")
    cfg, found = _schema("t.csv"), load_splits(tmp_path / "t")
    found["val"]["y"] = np.zeros_like(found["val"]["y"])
    wide = RULES.model_copy(update={"positive_tolerance": 0.5})
    report = validate_table("mine", read_table(cfg, WHERE, tmp_path), found, cfg, wide)
    failed = [c for c in report["checks"] if not c["success"]]
    assert [(c["suite"], c["expectation"]) for c in failed] == [
        ("mine_val", "expect_column_distinct_values_to_equal_set")], failed


def test_the_contract_checks_numeric_columns_missing_values_and_declared_ranges(tmp_path):
    frame = _priced()
    frame.loc[frame.index[:10], "price"] = np.nan          # 0.5 % missing
    _prepare(frame, tmp_path, "t", **NUMERIC)
    cfg = _schema("t.csv", **NUMERIC)
    table, found = read_table(cfg, WHERE, tmp_path), load_splits(tmp_path / "t")
    fair = RULES.model_copy(update={"max_missing": {"price": 0.01}, "ranges": {"price": [0.0, 1e6], "age": [18, 79]}})
    assert validate_table("mine", table, found, cfg, fair)["success"]
    strict = RULES.model_copy(update={"ranges": {"price": [0.0, 100.0]}})
    failed = [c for c in validate_table("mine", table, found, cfg, strict)["checks"] if not c["success"]]
    assert [(c["expectation"], c["kwargs"]["column"]) for c in failed] == [
        ("expect_column_values_to_not_be_null", "price"), ("expect_column_values_to_be_between", "price")]
    assert failed[1]["unexpected_count"] > 0 and all(v > 100 for v in failed[1]["unexpected_examples"])


def _trained_int8(shape: dict, data_dir, steps: int = 30, mlp: tuple[int, ...] = (8,), bits: int = 7):
    """A DeepFM (``mlp``: its hidden widths; none, an FM) trained briefly on ``data_dir``'s training rows, QAT-trained
    a little more (``bits``: its MLP's weights), converted to INT8."""
    from tasks.ctr.config import RecArch
    from tasks.ctr.ctr_training import CtrSplit
    from tasks.ctr.models import CtrModel, convert_ctr_int8, prepare_ctr_qat

    torch.manual_seed(0)
    train = CtrSplit.load(data_dir, "train")
    model = CtrModel(RecArch(dim=4, fm=True, mlp=list(mlp)), **shape)
    for stage in ("float", "qat"):
        optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
        for step in range(steps):
            fields, genres, y = train.batch(slice(step * 50 % len(train), step * 50 % len(train) + 50))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model.train()(fields, genres), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if stage == "float":
            model = prepare_ctr_qat(model, bits, True)
    return convert_ctr_int8(model.eval())


@pytest.mark.fault("params", "a click student without an MLP (an FM) whose QAT asks for 4-bit MLP weights",
                   "exports as INT8 tables (there is no MLP weight to store at 4 bits) with parity (before: the export "
                   "stopped, finding no weight to store as INT4)")
def test_an_fm_student_with_4_bit_mlp_weights_exports_its_tables_as_int8(tmp_path):
    import onnx as onnx_lib

    from tasks.ctr.ctr_onnx import export_ctr_int8, onnx_probabilities
    from tasks.ctr.ctr_training import CtrSplit, load_ctr_data
    from tasks.ctr.models import TABLES

    _prepare(_table(), tmp_path, "out")
    *_, test, shape = load_ctr_data(tmp_path / "out")
    int8 = _trained_int8(shape, tmp_path / "out", mlp=(), bits=4)
    path = export_ctr_int8(int8, tmp_path / "fm.onnx")
    assert {f"model.{t}.int8" for t in TABLES} <= {i.name for i in onnx_lib.load(str(path)).graph.initializer}
    with torch.no_grad():
        reference = torch.sigmoid(int8(test.fields, test.genres)).numpy()
    got = onnx_probabilities(path, CtrSplit.load(tmp_path / "out", "test"), threads=1)
    assert np.abs(got - reference).max() < 1e-4


def test_a_model_of_several_tag_groups_keeps_them_apart_and_exports_int8_that_matches(tmp_path):
    import onnx as onnx_lib

    from tasks.ctr.config import RecArch
    from tasks.ctr.ctr_onnx import export_ctr_int8, onnx_probabilities
    from tasks.ctr.ctr_training import CtrSplit, evaluate_ctr, load_ctr_data
    from tasks.ctr.models import TABLES, CtrModel

    _prepare(_table(), tmp_path, "out")
    *_, test, shape = load_ctr_data(tmp_path / "out")
    assert shape["groups"] == [4, 3] and shape["genres"] == 7
    model = CtrModel(RecArch(dim=4, fm=True, mlp=[8]), **shape).eval()
    _, vectors = model.forward_features(test.fields, test.genres)
    assert vectors.shape == (len(test), 2 + 2, 4) and model.mlp[0].in_features == 4 * 4   # two fields, two groups
    g, table = test.genres[:1], model.genre_embedding.weight   # each group the mean of its own tags' rows only
    assert torch.allclose(vectors[0, 2], ((g[:, :4] @ table[:4]) / g[:, :4].sum().clamp(min=1))[0])
    assert torch.allclose(vectors[0, 3], ((g[:, 4:] @ table[4:]) / g[:, 4:].sum().clamp(min=1))[0])
    int8 = _trained_int8(shape, tmp_path / "out")
    assert evaluate_ctr(int8, test)["auc"] > 0.7                # the device and the sport tag decide the clicks
    onnx = onnx_probabilities(export_ctr_int8(int8, tmp_path / "m.onnx"), CtrSplit.load(tmp_path / "out", "test"),
                              threads=1)
    with torch.no_grad():
        reference = torch.sigmoid(int8(test.fields, test.genres)).numpy()
    diff = np.abs(onnx - reference)   # the export's parity: an activation rounded the other way moves a row a little
    assert diff.max() < 0.01 and (diff < 1e-4).mean() > 0.99
    # every table stored as INT8, the tag groups' too (before: their slices were folded into unnamed float tables)
    stored = {i.name for i in onnx_lib.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert {f"model.{t}.int8" for t in TABLES} <= stored, sorted(stored)


def test_a_champion_of_an_older_table_is_scored_on_todays_test_rows_in_its_own_encoding(tmp_path):
    """The table grew (new countries, a new tag): the champion's vocabulary, registered with it, encodes today's test
    rows its way (other widths), so the gate can compare it; a client of it would send exactly these arrays."""
    from flows.registry import RegistryError, check_comparable
    from tasks.ctr.ctr_onnx import export_ctr_int8
    from tasks.ctr.ctr_training import load_ctr_data
    from tasks.ctr.table_evaluate import paired_data, split_quality

    older = _table(1200)
    older["topics"] = older.topics.str.replace("film", "music")   # no film tag yet
    _prepare(older, tmp_path, "old")
    today = pd.concat([older, _table(800, seed=1).assign(event=lambda f: f.event + 1200,
                                                         country=lambda f: f.country + "-new")])
    _prepare(today, tmp_path, "new")
    champion_dir = tmp_path / "champion"
    champion_dir.mkdir()
    export_ctr_int8(_trained_int8(load_ctr_data(tmp_path / "old")[3], tmp_path / "old"), champion_dir / "model.onnx")
    (champion_dir / "vocabulary.json").write_bytes((tmp_path / "old" / "vocabulary.json").read_bytes())
    candidate = export_ctr_int8(_trained_int8(load_ctr_data(tmp_path / "new")[3], tmp_path / "new"),
                                tmp_path / "c.onnx")

    theirs, mine = paired_data(champion_dir, tmp_path / "new", tmp_path / "scratch", None)
    assert mine == tmp_path / "new"
    assert np.load(theirs / "test_genres.npy").shape[1] == 3 + 3 < np.load(mine / "test_genres.npy").shape[1]
    assert np.array_equal(np.load(theirs / "test_y.npy"), np.load(mine / "test_y.npy"))
    new_rows = pd.read_parquet(tmp_path / "new" / "test_rows.parquet").country.str.endswith("-new").to_numpy()
    country = json.loads((tmp_path / "old" / "vocabulary.json").read_text())["fields"][1]
    assert (np.load(theirs / "test_fields.npy")[new_rows, 1] == country["offset"]).all()   # unseen: its row 0
    assert 0.5 < split_quality(champion_dir / "model.onnx", theirs, "test", 1)["test_auc"] <= 1.0
    assert paired_data(champion_dir, tmp_path / "old", tmp_path / "same", None) is None    # its own data: as is

    class Version:
        version, tags = "1", {}

    check_comparable("m", Version, champion_dir / "model.onnx", candidate, "", "mine", paired=True)
    with pytest.raises(RegistryError, match="made for other data"):   # without pairing the widths differ
        check_comparable("m", Version, champion_dir / "model.onnx", candidate, "", "mine")
