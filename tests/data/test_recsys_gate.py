"""The MovieLens expectation suite on prepared data: it passes clean data and names what breaks."""
from __future__ import annotations

import pandas as pd

from tasks.expectations import failure_message
from tasks.prepare_recsys import prepare_recsys
from tasks.validate_recsys import load_tables, validate_recsys


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


def test_orphan_ratings_duplicates_and_bad_ratings_are_named(synthetic_movielens, tmp_path):
    tables, cfg = _prepared(synthetic_movielens, tmp_path)
    rows = tables["interactions"]
    rows.loc[0, "user_id"] = 999                       # a rating by a user who does not exist
    rows.loc[1, "rating"] = 7                          # out of range
    tables["interactions"] = pd.concat([rows, rows.iloc[[5]]], ignore_index=True)  # a duplicate row
    report = validate_recsys(tables, cfg)
    message = failure_message(report)
    assert not report["success"]
    assert "expect_column_values_to_be_in_set(column=user_id" in message and "[999]" in message
    assert "expect_column_values_to_be_between(column=rating" in message
    assert "expect_compound_columns_to_be_unique(column_list=['user_id', 'item_id', 'timestamp']" in message


def test_label_balance_outside_its_tolerance_fails(synthetic_movielens, tmp_path):
    tables, cfg = _prepared(synthetic_movielens, tmp_path)
    tables["test"]["y"][:] = 1.0
    report = validate_recsys(tables, cfg)
    assert not report["success"]
    assert "[recsys_test] expect_column_mean_to_be_between(column=label" in failure_message(report)
