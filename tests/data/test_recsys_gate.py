"""The MovieLens expectation suite on prepared data: it passes clean data and names what breaks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.expectations import failure_message
from tasks.recsys.prepare import prepare_recsys
from tasks.recsys.validate import load_tables, validate_recsys


def _prepared(synthetic_movielens, tmp_path):
    _, _, cfg = synthetic_movielens
    prepare_recsys(cfg.data.recsys, tmp_path / "out")
    return load_tables(tmp_path / "out"), cfg


def test_clean_data_passes(synthetic_movielens, tmp_path):
    tables, cfg = _prepared(synthetic_movielens, tmp_path)
    report = validate_recsys(tables, cfg)
    assert report["success"], failure_message(report)
    kinds = {c["expectation"] for c in report["checks"]}
    assert {"expect_compound_columns_to_be_unique", "expect_column_values_to_be_in_set",
            "expect_column_mean_to_be_between", "expect_column_values_to_not_be_null"} <= kinds


def _set(column: str, row: int, value):
    def corrupt(tables):
        tables["interactions"].loc[row, column] = value
    return corrupt


def _duplicate_row(tables):
    rows = tables["interactions"]
    tables["interactions"] = pd.concat([rows, rows.iloc[[5]]], ignore_index=True)


def _rated_again(tables):
    rows = tables["interactions"]
    tables["interactions"] = pd.concat([rows, rows.iloc[[5]].assign(timestamp=rows.timestamp.iloc[5] + 86_400)],
                                       ignore_index=True)


def _fault(scenario: str, expected: str):
    return pytest.mark.fault("data", scenario, f"validation fails naming {expected} and the bad values")


@pytest.mark.parametrize("corrupt,expected", [
    pytest.param(_set("rating", 0, np.nan), "expect_column_values_to_not_be_null(column=rating",
                 marks=_fault("a rating that is NaN", "the null check on `rating`"), id="nan-rating"),
    pytest.param(_set("rating", 1, 7), "expect_column_values_to_be_between(column=rating",
                 marks=_fault("rating 7 (out of 1-5)", "the range check on `rating`"), id="rating-7"),
    pytest.param(_set("user_id", 0, 999), "expect_column_values_to_be_in_set(column=user_id",
                 marks=_fault("a rating by an unknown user id", "the `user_id` set check"), id="unknown-user"),
    pytest.param(_set("item_id", 2, 4242), "expect_column_values_to_be_in_set(column=item_id",
                 marks=_fault("a rating of an unknown item id", "the `item_id` set check"), id="unknown-item"),
    pytest.param(_duplicate_row, "expect_compound_columns_to_be_unique(column_list=['user_id', 'item_id']",
                 marks=_fault("a duplicated rating row", "the uniqueness check"), id="duplicate-row"),
    pytest.param(_rated_again, "expect_compound_columns_to_be_unique(column_list=['user_id', 'item_id']",
                 marks=_fault("a user rating an item twice, a day apart (before: unique on the timestamp too, so "
                              "accepted, each in its own split)", "the uniqueness check"), id="rated-again"),
])
def test_bad_ratings_are_named(synthetic_movielens, tmp_path, corrupt, expected):
    tables, cfg = _prepared(synthetic_movielens, tmp_path)
    corrupt(tables)
    report = validate_recsys(tables, cfg)
    message = failure_message(report)
    assert not report["success"] and expected in message


def test_label_balance_outside_its_tolerance_fails(synthetic_movielens, tmp_path):
    tables, cfg = _prepared(synthetic_movielens, tmp_path)
    tables["test"]["y"][:] = 1.0
    report = validate_recsys(tables, cfg)
    assert not report["success"]
    assert "[recsys_test] expect_column_mean_to_be_between(column=label" in failure_message(report)


@pytest.mark.slow
@pytest.mark.fault("data", "processed ratings that do not account for the raw snapshot's (a batch lost on the way, "
                   "or a labelling that drops most ratings)",
                   "validation fails naming the size check against the snapshot's manifest")
def test_sizes_come_from_the_snapshot_not_from_the_published_data_set(synthetic_movielens, tmp_path):
    tables, cfg = _prepared(synthetic_movielens, tmp_path)
    read = tables["features"]["read"]["ratings"]
    assert validate_recsys(tables, cfg, ratings=read)["success"]   # any size: no published row count is assumed
    lost = validate_recsys(tables, cfg, ratings=read + 10)
    assert "[recsys_sizes] expect_column_values_to_be_in_set(column=ratings_read" in failure_message(lost)
    rules = cfg.validate_.recsys.model_copy(update={"min_kept_fraction": 1.0})
    few = cfg.model_copy(update={"validate_": cfg.validate_.model_copy(update={"recsys": rules})})
    assert "expect_column_values_to_be_between(column=ratings_labelled" in failure_message(
        validate_recsys(tables, few, ratings=read))


def test_each_split_holds_its_share_of_the_labelled_rows(synthetic_movielens, tmp_path):
    tables, cfg = _prepared(synthetic_movielens, tmp_path)
    rows = tables["interactions"]
    half = int((rows.split == "test").sum()) * 9 // 10   # most of the test rows, moved to train
    rows.loc[rows.index[rows.split == "test"][:half], "split"] = "train"
    tables["train"] = {k: np.concatenate([v, tables["test"][k][:half]]) for k, v in tables["train"].items()}
    tables["test"] = {k: v[half:] for k, v in tables["test"].items()}
    assert "[recsys_test] expect_table_row_count_to_be_between" in failure_message(validate_recsys(tables, cfg))


@pytest.mark.fault("data", "an accepted batch of users whose occupation is \"None\", \"N/A\", \"null\" or \"nan\" and "
                   "whose zip code is \"NA\"",
                   "validation passes: the prepared tables are read as the intake read them, text as written (before: "
                   "read as missing, the null checks failed on every later run)")
def test_text_that_pandas_would_read_as_missing_passes_as_written(synthetic_movielens, tmp_path):
    from tasks.recsys.movielens import acquire

    _, _, cfg = synthetic_movielens
    source, tables = acquire(cfg.data.recsys)
    users = tables["users"].copy()
    users.loc[:3, "occupation"] = ["None", "N/A", "null", "nan"]
    users.loc[4, "zip_code"] = "NA"
    prepare_recsys(cfg.data.recsys, tmp_path / "out", (source, {**tables, "users": users}))
    loaded = load_tables(tmp_path / "out")
    assert loaded["users"].occupation.tolist()[:4] == ["None", "N/A", "null", "nan"]
    report = validate_recsys(loaded, cfg)
    assert report["success"], failure_message(report)
