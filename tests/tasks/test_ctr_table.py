"""A user's click-through table through the click-through kit: read by its declared schema (CSV or Parquet), encoded
from the training rows, checked by its contract, and learned by a model with several multi-hot groups that exports
to ONNX. Real files, real Great Expectations, real PyTorch and onnxruntime."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.ctr.table import prepare_table, read_table
from tasks.ctr.table_config import TableData, TableValidation
from tasks.ctr.table_validate import load_splits, validate_table
from tasks.errors import DataFormatError

RULES = TableValidation(positive_fraction=0.5, positive_tolerance=0.2, split_tolerance=0.05,
                        min_rows={"train": 100, "val": 20, "test": 20})


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


def _schema(path: str, **extra) -> TableData:
    return TableData(**{"table": {"path": path}, "label": "clicked", "categorical": ["device", "country"],
                        "multi_hot": [{"column": "topics"}, {"column": "ads", "separator": ","}],
                        "split": {"method": "hash", "val": 0.1, "test": 0.1, "key": ["event"]}, "seed": 0,
                        **extra})


def test_a_parquet_table_and_its_csv_give_the_same_encoded_splits(tmp_path):
    frame = _table()
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    from_csv = prepare_table(_schema("t.csv"), tmp_path / "csv", tmp_path)
    from_parquet = prepare_table(_schema("t.parquet"), tmp_path / "pq", tmp_path)
    assert from_csv["splits"] == from_parquet["splits"] and from_csv["fields"] == from_parquet["fields"]
    for name in ("train_fields", "train_genres", "test_fields", "test_y"):
        assert np.array_equal(np.load(tmp_path / "csv" / f"{name}.npy"), np.load(tmp_path / "pq" / f"{name}.npy"))
    assert sum(s["rows"] for s in from_csv["splits"].values()) == 2000
    assert 0.05 < from_csv["splits"]["test"]["rows"] / 2000 < 0.15


def test_fields_and_tags_are_encoded_from_the_training_rows_with_a_row_for_other_values(tmp_path):
    frame = _table()
    frame.loc[frame.index[-50:], "country"] = "never-seen"     # some rows' country only outside training, or not
    frame.loc[frame.index[:5], "country"] = np.nan              # missing
    frame.to_csv(tmp_path / "t.csv", index=False)
    cfg = _schema("t.csv", split={"method": "column", "column": "part"})
    frame["part"] = np.where(frame.index >= 1950, "test", np.where(frame.index >= 1750, "val", "train"))
    frame.to_csv(tmp_path / "t.csv", index=False)
    manifest = prepare_table(cfg, tmp_path / "out", tmp_path)
    vocab = json.loads((tmp_path / "out" / "vocabulary.json").read_text())
    assert vocab["fields"]["device"] == ["desktop", "phone", "tablet"]
    assert "never-seen" not in vocab["fields"]["country"]
    assert vocab["multi_hot"] == {"topics": ["film", "music", "news", "sport"], "ads": ["a", "b", "c"]}
    device, country = manifest["fields"]
    assert (device["offset"], device["size"]) == (0, 4) and country["offset"] == 4   # row 0 of each: other values
    test_fields = np.load(tmp_path / "out" / "test_fields.npy")
    assert (test_fields[:, 1] == country["offset"]).all()        # the unseen country is the field's row 0
    assert (np.load(tmp_path / "out" / "train_fields.npy")[:5, 1] == country["offset"]).all()   # so is a missing one
    assert manifest["groups"] == [{"name": "topics", "offset": 0, "size": 4}, {"name": "ads", "offset": 4, "size": 3}]
    genres = np.load(tmp_path / "out" / "train_genres.npy")
    first = frame.iloc[0]
    expected = [t in first.topics.split("|") for t in vocab["multi_hot"]["topics"]] + \
               [a in first.ads.split(",") for a in vocab["multi_hot"]["ads"]]
    assert genres[0].tolist() == [float(x) for x in expected]


def test_rare_values_share_the_other_row_and_a_table_without_tags_gets_one_zero_column(tmp_path):
    frame = _table()
    frame.to_csv(tmp_path / "t.csv", index=False)
    cfg = _schema("t.csv", multi_hot=[], min_count=1000)   # only a device seen 1000 times keeps its own row
    manifest = prepare_table(cfg, tmp_path / "out", tmp_path)
    vocab = json.loads((tmp_path / "out" / "vocabulary.json").read_text())
    assert vocab["fields"]["country"] == [] and manifest["fields"][1]["size"] == 1
    assert manifest["groups"] == [{"name": "", "offset": 0, "size": 1}] and manifest["genres"] == ["(none)"]
    assert not np.load(tmp_path / "out" / "val_genres.npy").any()


@pytest.mark.fault("data", "a user's click table without a declared column, or with a label that is no click",
                   "the prepare stage stops in one line naming the file, the column and rows; nothing is written")
def test_a_table_that_does_not_match_its_schema_is_refused_in_one_line(tmp_path):
    frame = _table()
    frame.drop(columns=["ads"]).to_csv(tmp_path / "no-ads.csv", index=False)
    with pytest.raises(DataFormatError, match=r"^no-ads\.csv: has no column ads \(its columns: event, device"):
        prepare_table(_schema("no-ads.csv"), tmp_path / "a", tmp_path)
    frame.loc[7, "clicked"] = "maybe"
    frame.to_csv(tmp_path / "bad-label.csv", index=False)
    with pytest.raises(DataFormatError, match=r"label column 'clicked' holds 1 value\(s\).*row 7: 'maybe'"):
        prepare_table(_schema("bad-label.csv"), tmp_path / "b", tmp_path)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_contract_passes_a_good_table_and_names_a_column_with_too_many_missing_values(tmp_path):
    frame = _table()
    frame.to_csv(tmp_path / "t.csv", index=False)
    cfg = _schema("t.csv")
    prepare_table(cfg, tmp_path / "out", tmp_path)
    report = validate_table("mine", read_table(cfg, tmp_path), load_splits(tmp_path / "out"), cfg, RULES)
    assert report["success"], [c for c in report["checks"] if not c["success"]]

    frame.loc[frame.index[:300], "country"] = np.nan   # 15 % missing where none is allowed
    frame.to_csv(tmp_path / "t.csv", index=False)
    prepare_table(cfg, tmp_path / "out2", tmp_path)
    report = validate_table("mine", read_table(cfg, tmp_path), load_splits(tmp_path / "out2"), cfg, RULES,
                            tmp_path / "docs")
    failed = [c for c in report["checks"] if not c["success"]]
    assert not report["success"] and [c["expectation"] for c in failed] == ["expect_column_values_to_not_be_null"]
    assert failed[0]["kwargs"]["column"] == "country" and (tmp_path / "docs" / "index.html").is_file()
    relaxed = RULES.model_copy(update={"max_missing": {"country": 0.2}})
    assert validate_table("mine", read_table(cfg, tmp_path), load_splits(tmp_path / "out2"), cfg, relaxed)["success"]


def test_a_model_of_several_tag_groups_learns_them_apart_and_exports_int8_that_matches(tmp_path):
    from tasks.ctr.config import RecArch
    from tasks.ctr.ctr_onnx import export_ctr_int8, onnx_probabilities
    from tasks.ctr.ctr_training import CtrSplit, load_ctr_data
    from tasks.ctr.models import CtrModel, convert_ctr_int8, prepare_ctr_qat

    _table().to_csv(tmp_path / "t.csv", index=False)
    prepare_table(_schema("t.csv"), tmp_path / "out", tmp_path)
    *_, test, shape = load_ctr_data(tmp_path / "out")
    assert shape["groups"] == [4, 3] and shape["genres"] == 7
    torch.manual_seed(0)
    model = CtrModel(RecArch(dim=4, fm=True, mlp=[8]), **shape).eval()
    logit, vectors = model.forward_features(test.fields, test.genres)
    assert vectors.shape == (len(test), 2 + 2, 4)            # two fields, two groups
    # each group is the mean of its own tags' rows, never of the other group's
    g = test.genres[:1]
    table = model.genre_embedding.weight
    topics = (g[:, :4] @ table[:4]) / g[:, :4].sum().clamp(min=1)
    assert torch.allclose(vectors[0, 2], topics[0]) and model.mlp[0].in_features == 4 * 4
    int8 = convert_ctr_int8(prepare_ctr_qat(model, 7, True).eval())
    path = export_ctr_int8(int8, tmp_path / "m.onnx")
    onnx = onnx_probabilities(path, CtrSplit.load(tmp_path / "out", "test"), threads=1)
    with torch.no_grad():
        reference = torch.sigmoid(int8(test.fields, test.genres)).numpy()
    assert np.abs(onnx - reference).max() < 1e-4
