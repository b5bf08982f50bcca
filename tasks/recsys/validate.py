"""Stage ``validate_recsys``: the Great Expectations gate on processed MovieLens-100K.

Input: ``<data>`` as written by prepare_recsys from the raw snapshot ``<snapshot>``. Output: ``<report>`` (JSON,
every expectation with its observed value). Checked: the schema of every table; ratings within 1-5 and labels
consistent with them; no missing value in a required field; referential integrity (every rating's user and item
exist); no user rating an item twice (whatever the timestamps); sizes derived from the snapshot's own manifest, never from the
published data set's: every rating the snapshot accepted was read, at least ``min_kept_fraction`` of them labelled,
and each split holds its share of the labelled rows (within ``split_tolerance``, above a ``min_rows`` floor); per split the label balance within a tolerance; every
encoded field index inside its field's range and genres multi-hot. A failed expectation stops the pipeline naming
it and the values. The limits on the labelled rows as a whole (``tasks.recsys.limits``) are the ones the intake holds
the snapshot to as each batch arrives.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import great_expectations as gx
import numpy as np
import pandas as pd

from tasks.config import Config, stage_args
from tasks.errors import DataFormatError, run_cli
from tasks.expectations import ephemeral_context, publish_validation, run_suites, suite
from tasks.io import read_csv
from tasks.recsys.config import RecsysValidation
from tasks.recsys.limits import SPLITS, kept_expectation, split_expectations

E = gx.expectations
COLUMNS = {"interactions": ["user_id", "item_id", "rating", "timestamp", "label", "split"],
           "users": ["user_id", "age", "gender", "occupation", "zip_code"],
           "items": ["item_id", "release_year", "genres"]}


def load_tables(data_dir: Path) -> dict[str, Any]:
    try:
        tables: dict[str, Any] = {name: read_csv(data_dir / f"{name}.csv", dtype={"zip_code": str})
                                  for name in COLUMNS}
        tables["features"] = json.loads((data_dir / "features.json").read_text())
        for split in SPLITS:
            tables[split] = {p: np.load(data_dir / f"{split}_{p}.npy", allow_pickle=False)
                             for p in ("fields", "genres", "y")}
    except (OSError, ValueError) as err:
        raise DataFormatError(f"{data_dir}: cannot be read ({err}); re-run prepare_recsys") from err
    return tables


def table_suites(tables: dict[str, Any], positive_min_rating: int) -> list[tuple[gx.ExpectationSuite, pd.DataFrame]]:
    users, items, rows = tables["users"], tables["items"], tables["interactions"]
    schema = {name: [E.ExpectTableColumnsToMatchSet(column_set=cols, exact_match=True),
                     *(E.ExpectColumnValuesToNotBeNull(column=c) for c in cols if c != "genres")]
              for name, cols in COLUMNS.items()}
    interactions = suite("recsys_interactions", schema["interactions"] + [
        E.ExpectColumnValuesToBeBetween(column="rating", min_value=1, max_value=5),
        E.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1]),
        E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        E.ExpectColumnValuesToBeInSet(column="user_id", value_set=users.user_id.dropna().tolist()),
        E.ExpectColumnValuesToBeInSet(column="item_id", value_set=items.item_id.dropna().tolist()),
        # a user rates an item once (the intake's contract): a second rating, at any time, puts the same input in two
        # splits
        E.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "item_id"])])
    consistent = pd.DataFrame({"label_matches_rating": (rows.label == (rows.rating >= positive_min_rating)).astype(int)})
    return [(interactions, rows),
            (suite("recsys_labels", [E.ExpectColumnValuesToBeInSet(column="label_matches_rating", value_set=[1])]),
             consistent),
            (suite("recsys_users", schema["users"] + [
                E.ExpectColumnValuesToBeUnique(column="user_id"),
                E.ExpectColumnValuesToBeBetween(column="age", min_value=1, max_value=100),
                E.ExpectColumnValuesToBeInSet(column="gender", value_set=["M", "F"])]), users),
            (suite("recsys_items", schema["items"] + [
                E.ExpectColumnValuesToBeUnique(column="item_id"),
                E.ExpectColumnValuesToBeBetween(column="release_year", min_value=0, max_value=2100)]), items)]


def size_suite(tables: dict[str, Any], rules: RecsysValidation, ratings: int) -> tuple[gx.ExpectationSuite, pd.DataFrame]:
    """Sizes against the ``ratings`` the raw snapshot holds: all of them read, enough of them labelled."""
    labelled = len(tables["interactions"])
    read = tables["features"].get("read", {}).get("ratings", -1)
    frame = pd.DataFrame({"ratings_read": [read], "ratings_labelled": [labelled]})
    return suite("recsys_sizes", [
        E.ExpectColumnValuesToBeInSet(column="ratings_read", value_set=[ratings]),
        kept_expectation(rules, ratings)]), frame


def split_suites(tables: dict[str, Any], cfg: Config) -> list[tuple[gx.ExpectationSuite, pd.DataFrame]]:
    """Per split: row count, label balance, and the encoded arrays against the field layout."""
    rows, layout, out = tables["interactions"], tables["features"]["fields"], []
    for split in SPLITS:
        part, arrays = rows[rows.split == split], tables[split]
        fields = arrays["fields"]
        frame = pd.DataFrame({f["name"]: fields[:, i] if fields.ndim == 2 and fields.shape[1] > i else -1
                              for i, f in enumerate(layout)})
        frame["genres_binary"] = np.isin(arrays["genres"], (0, 1)).all(axis=1).astype(int)
        frame["label"] = arrays["y"].astype(np.float64)
        out.append((suite(f"recsys_{split}", [
            E.ExpectTableRowCountToEqual(value=len(part)),     # the arrays hold the split's rows ...
            *split_expectations(cfg, split, len(rows)),        # ... the split its share, and its label balance
            E.ExpectColumnValuesToBeInSet(column="genres_binary", value_set=[1]),
            *(E.ExpectColumnValuesToBeBetween(column=f["name"], min_value=f["offset"],
                                              max_value=f["offset"] + f["size"] - 1) for f in layout)]), frame))
    return out


def snapshot_ratings(snapshot: Path) -> int:
    """The ratings the raw snapshot's manifest says its batches hold."""
    from tasks.snapshot import read

    try:
        return sum(int(b["rows"]["ratings"]) for b in read(snapshot)["batches"])
    except (KeyError, TypeError, ValueError) as err:
        raise DataFormatError(f"{snapshot}: a batch of its manifest has no ratings row count ({err})") from err


def validate_recsys(tables: dict[str, Any], cfg: Config, docs: Path | None = None,
                    ratings: int | None = None) -> dict[str, Any]:
    """Run every suite (through GE Checkpoints, rendering Data Docs into ``docs`` when given); return the report.
    ``ratings``: what the raw data holds (the stage passes its snapshot's count; default: what prepare read)."""
    context = ephemeral_context()
    if ratings is None:
        ratings = tables["features"].get("read", {}).get("ratings", 0)
    batches = (table_suites(tables, cfg.data.recsys.positive_min_rating) + [size_suite(tables, cfg.validate_.recsys, ratings)]
               + split_suites(tables, cfg))
    return run_suites(context, "recsys", batches, docs)


def main() -> None:
    args, cfg = stage_args(__doc__, "--data", "--snapshot", "--report", "--docs")
    from tasks.tracking import stage_run

    with stage_run("validate_recsys", cfg, {"validate.recsys": cfg.validate_.recsys}) as run:
        report = publish_validation(run, validate_recsys(load_tables(args.data), cfg, args.docs,
                                                                   snapshot_ratings(args.snapshot)), args.report,
                                    args.docs)
    print(f"validation passed: {len(report['checks'])} expectations")


if __name__ == "__main__":
    run_cli(main)
