"""Stage ``validate_<family>`` of a table family: the Great Expectations gate on the table and its encoded splits.

Inputs: the table ``data.<family>.table`` and ``<data>`` as the prepare stage wrote it from it. Output:
``<report>`` (JSON, every expectation with its observed value) and ``<docs>`` (Data Docs). (A declared column the
table lacks, a label that is no click and a numeric value that is no number stop the prepare stage before this
one.) Checked: each categorical and numeric column's missing values within ``validate.<family>.max_missing`` (none
by default), each numeric column's values within its ``ranges`` entry, if any; every row read into a split, each
split above its ``min_rows`` floor and, hashed or by time, within ``split_tolerance`` of its share; per split the
label balance within ``positive_tolerance`` of ``positive_fraction``, labels 0/1 and both of them, every encoded
field index inside its field's rows and the multi-hot columns 0/1. A failed expectation stops the pipeline naming
it and the values.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.config import stage_args
from tasks.ctr.table import FEATURES, numbers, read_table
from tasks.ctr.table_config import LABEL_COLUMN, SPLITS, TAGS_COLUMN, TableData, TableValidation
from tasks.errors import DataFormatError
from tasks.expectations import ephemeral_context, expectation_types, publish_validation, run_suites, suite


def load_splits(data_dir: Path) -> dict[str, Any]:
    try:
        found: dict[str, Any] = {"features": json.loads((data_dir / FEATURES).read_text())}
        for split in SPLITS:
            found[split] = {p: np.load(data_dir / f"{split}_{p}.npy", allow_pickle=False)
                            for p in ("fields", "genres", "y")}
    except (OSError, ValueError) as err:
        raise DataFormatError(f"{data_dir}: cannot be read ({err}); re-run the prepare stage") from err
    return found


def table_suite(family: str, table: pd.DataFrame, data: TableData, rules: TableValidation) -> tuple[Any, Any]:
    E = expectation_types()
    # an empty multi-hot value is a row without tags; numeric columns are checked as the numbers they hold
    checked = table.assign(**{c: numbers(table, c) for c in data.numeric_columns()})
    return suite(f"{family}_table", [
        *(E.ExpectColumnValuesToNotBeNull(column=column, mostly=1.0 - rules.max_missing.get(column, 0.0))
          for column in [*data.categorical, *data.numeric_columns()]),
        *(E.ExpectColumnValuesToBeBetween(column=column, min_value=low, max_value=high)
          for column, (low, high) in rules.ranges.items())]), checked


def split_suites(family: str, found: dict[str, Any], data: TableData, rules: TableValidation,
                 read: int) -> list[tuple[Any, Any]]:
    """Per split: its rows (a floor; hashed or by time, its share of what was read), label balance and values, and
    the encoded arrays against the field layout."""
    E, layout, out = expectation_types(), found["features"]["fields"], []
    share = {"train": 1.0 - data.split.val - data.split.test, "val": data.split.val, "test": data.split.test}
    for split in SPLITS:
        arrays = found[split]
        fields = arrays["fields"]
        frame = pd.DataFrame({f["name"]: fields[:, i] if fields.ndim == 2 and fields.shape[1] > i else -1
                              for i, f in enumerate(layout)})
        frame[TAGS_COLUMN] = np.isin(arrays["genres"], (0, 1)).all(axis=1).astype(int)
        frame[LABEL_COLUMN] = arrays["y"].astype(np.float64)
        low, high = rules.min_rows.get(split, 1), read
        if data.split.method != "column":   # hashed or by time: each split near its share
            low = max(low, math.floor((share[split] - rules.split_tolerance) * read))
            high = math.ceil((share[split] + rules.split_tolerance) * read)
        out.append((suite(f"{family}_{split}", [
            E.ExpectTableRowCountToBeBetween(min_value=low, max_value=high),
            E.ExpectColumnValuesToBeInSet(column=LABEL_COLUMN, value_set=[0.0, 1.0]),
            # both classes: a split of one class has no AUC (validation: no best epoch to choose; test: no gate)
            E.ExpectColumnDistinctValuesToEqualSet(column=LABEL_COLUMN, value_set=[0.0, 1.0]),
            E.ExpectColumnMeanToBeBetween(column=LABEL_COLUMN,
                                          min_value=rules.positive_fraction - rules.positive_tolerance,
                                          max_value=rules.positive_fraction + rules.positive_tolerance),
            E.ExpectColumnValuesToBeInSet(column=TAGS_COLUMN, value_set=[1]),
            *(E.ExpectColumnValuesToBeBetween(column=f["name"], min_value=f["offset"],
                                              max_value=f["offset"] + f["size"] - 1) for f in layout)]), frame))
    counts = pd.DataFrame({"rows_read": [read], "rows_in_splits": [sum(len(found[s]["y"]) for s in SPLITS)]})
    out.append((suite(f"{family}_rows", [E.ExpectColumnPairValuesToBeEqual(column_A="rows_read",
                                                                          column_B="rows_in_splits")]), counts))
    return out


def validate_table(family: str, table: pd.DataFrame, found: dict[str, Any], data: TableData,
                   rules: TableValidation, docs: Path | None = None) -> dict[str, Any]:
    """Run every suite (through GE Checkpoints, rendering Data Docs into ``docs`` when given); return the report."""
    context = ephemeral_context()
    batches = [table_suite(family, table, data, rules), *split_suites(family, found, data, rules, len(table))]
    return run_suites(context, family, batches, docs)


def main(family: str) -> None:
    args, cfg = stage_args(__doc__, "--data", "--report", "--docs")
    data, rules = cfg.block("data", family), cfg.block("validate", family)
    from tasks.tracking import stage_run

    with stage_run(f"validate_{family}", cfg, {f"validate.{family}": rules}) as run:
        table = read_table(data, f"data.{family}")
        report = publish_validation(run, validate_table(family, table, load_splits(args.data), data, rules, args.docs),
                                    args.report, args.docs)
    print(f"validation passed: {len(report['checks'])} expectations")
