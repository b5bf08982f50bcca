"""Stage ``prepare_<family>`` of a table family: a user's click-through table (CSV or Parquet) -> encoded splits,
read only through the schema ``data.<family>`` declares (``tasks.ctr.table_config.TableData``).

Values: every declared column is read as text, the same from either format (a missing value is an empty cell, a
Parquet null or empty text, or, in a feature column, one of ``na_values``; "NA" is a value unless listed there; a
whole-number float column, as Parquet stores integers beside nulls, reads as integers). Rows: every
row of the table (or a seeded ``subset``), labelled by its ``label`` column (0/1, true/false). Split: a seeded hash
of each row's ``split.key`` values (a row keeps its split when the table grows), the table's own split column, or
time: the newest rows by the split column's times are test, the ones before them val (a row's split moves forward as
newer rows arrive; a champion trained on an older table never saw today's test rows if rows arrive in time order).
Encoding, from the training rows only: a categorical field gets one embedding row per value seen at least
``min_count`` times there (a whole number written as a float, "196.0" as pandas writes an integer column beside
nulls, is the integer "196": a CSV, its Parquet twin and a client's typed 196 take one row; the split hash reads the
text as written), after row 0, which every other value (unseen, rare, missing) shares; a numeric field one
row per bin between the edges at its ``buckets`` quantiles there (a value on an edge goes to the bin above it), after
row 0, which a missing value takes (a value that is not a finite number stops the stage naming rows); a multi-hot
column one column per tag seen that often (other tags are dropped; a column left with none keeps one all-zero
column). Without a multi-hot column ``genres`` is one all-zero column.

Output in ``<out>``: ``{train,val,test}_{fields,genres,y}.npy`` (the kit's format, ``tasks.ctr.ctr_training``),
``features.json`` (field layout with offsets and sizes, multi-hot groups, rows per split, source, and by time the
times val and test start from), ``vocabulary.json`` (registered with every model: each field and group in input
order with its offset and values in row order, or a numeric field's bin edges, and ``na_values``: all a client needs
to encode a raw row as the model was trained, ``encode_with``), and ``test_rows.parquet`` (the test rows' declared
columns as read: a champion of an older vocabulary is scored on them in its own encoding).
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.config import stage_args
from tasks.ctr.table_config import SPLITS, TableData, TableFile
from tasks.ctr.table_split import assign_splits
from tasks.errors import CORRUPT_STREAM, DataFormatError, DataSourceError
from tasks.io import save_npy, write_atomic, write_json

VOCABULARY, FEATURES, TEST_ROWS = "vocabulary.json", "features.json", "test_rows.parquet"
OTHER = "<other>"   # a field's row 0: any value the training rows did not hold often enough
_WHOLE_FLOAT = re.compile(r"-?[0-9]+\.0+")
TRUE, FALSE = frozenset({"1", "1.0", "true", "True", "TRUE"}), frozenset({"0", "0.0", "false", "False", "FALSE"})


def table_format(spec: TableFile, where: str) -> str:
    if spec.format:
        return spec.format
    name = spec.path.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz", ".csv.bz2")):
        return "csv"
    raise DataFormatError(f"{spec.path}: cannot tell its format from the name; set {where}.table.format: csv or "
                          "parquet")


def as_text(column: pd.Series, path: str) -> pd.Series:
    """A typed column (Parquet's, a client's rows) as the text a CSV cell of it would hold (None where missing). A
    whole float reads as an integer, value by value: an integer column with nulls comes as floats, and one
    fractional value must not turn every other value's text (and the rows' split hash) from 88 into 88.0."""
    if column.map(lambda v: isinstance(v, list | tuple | np.ndarray)).any():
        raise DataFormatError(f"{path}: column {column.name!r} holds lists; write tags as one text value joined by "
                              "the column's separator")
    return pd.Series([_cell_text(v) for v in column], index=column.index, dtype=object)


def _cell_text(value: Any) -> str | None:
    if value is None or (not isinstance(value, str) and pd.isna(value)) or value == "":
        return None
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def categories(column: pd.Series) -> pd.Series:
    """A categorical column's values as categories: a text of a whole number written as a float ("196.0", "-3.00")
    is the integer's ("196", "-3"), as a Parquet float is read (``_cell_text``); any other value as it is."""
    found = column.dropna().unique()
    return column.map({v: _whole(v) if isinstance(v, str) else v for v in found})


def _whole(text: str) -> str:
    return str(int(text.partition(".")[0])) if _WHOLE_FLOAT.fullmatch(text) else text


def read_table(cfg: TableData, where: str, root: Path = Path()) -> pd.DataFrame:
    """The declared columns (and split key columns) of the table as text (missing: None), a seeded ``subset`` of its
    rows; the index is each row's position in the file."""
    path = root / cfg.table.path
    if not path.is_file():
        raise DataSourceError(f"{cfg.table.path}: no such table ({where}.table.path)")
    wanted = list(dict.fromkeys(cfg.columns() + cfg.split.key))
    fmt = table_format(cfg.table, where)
    try:
        if fmt == "parquet":   # nullable types: an int64 column with nulls stays int64 (as floats, ids > 2**53 merge)
            frame = pd.read_parquet(path, dtype_backend="numpy_nullable")
        else:   # only an empty cell is missing: "NA" or "null" is a value, as it is in Parquet
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (OSError, ValueError, ImportError, *CORRUPT_STREAM) as err:   # pandas' ParserError and pyarrow's: ValueError
        raise DataFormatError(f"{cfg.table.path}: cannot be read as {fmt} ({' '.join(str(err).split())[:300]})"
                              ) from err
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise DataFormatError(f"{cfg.table.path}: has no column {', '.join(missing)} declared in {where} (its "
                              f"columns: {', '.join(map(str, frame.columns))[:300]})")
    if frame.empty:   # nothing to split or encode (a header alone would fail deep inside the hash split)
        raise DataFormatError(f"{cfg.table.path}: no rows")
    frame = pd.DataFrame({c: as_text(frame[c], cfg.table.path) if fmt == "parquet"
                          else frame[c].astype(object).where(frame[c].notna(), None) for c in wanted})
    frame = mark_missing(frame, cfg.na_values, [*cfg.categorical, *(m.column for m in cfg.multi_hot)],
                         cfg.numeric_columns())
    if cfg.subset is not None and cfg.subset < len(frame):
        frame = frame.iloc[np.sort(np.random.default_rng(cfg.seed).choice(len(frame), cfg.subset, replace=False))]
    return frame


def mark_missing(frame: pd.DataFrame, na_values: list[str] | dict[str, list[str]], text: list[str],
                 numeric: list[str]) -> pd.DataFrame:
    """``frame`` with ``na_values`` (a list for every column, or per column) missing (None) in its feature columns: a
    whole cell of ``text`` columns equal to one; in ``numeric`` ones also the same number (-1.0 for "-1")."""
    if not na_values:
        return frame
    frame = frame.copy()
    for column in [*text, *numeric]:
        if not (listed := na_values.get(column, []) if isinstance(na_values, dict) else na_values):
            continue
        cells = frame[column]
        found = cells.isin(listed)
        marks = pd.to_numeric(pd.Series(listed, dtype=object), errors="coerce").dropna().to_numpy(np.float64)
        if column in numeric and len(marks):
            found |= pd.to_numeric(cells, errors="coerce").isin(marks)
        frame[column] = cells.where(~found, None)
    return frame


def labels(frame: pd.DataFrame, cfg: TableData) -> np.ndarray:
    """The label column as 0.0 / 1.0; a value that is neither stops the stage naming rows of the file."""
    values = frame[cfg.label]
    ones, zeros = values.isin(TRUE), values.isin(FALSE)
    bad = np.flatnonzero(~(ones | zeros).to_numpy())
    if len(bad):
        shown = ", ".join(f"row {frame.index[i]}: {values.iloc[i]!r}" for i in bad[:5])
        raise DataFormatError(f"{cfg.table.path}: label column {cfg.label!r} holds {len(bad)} value(s) that are not "
                              f"0/1 or true/false ({shown})")
    return ones.to_numpy(np.float32)


def numbers(frame: pd.DataFrame, column: str, path: str = "") -> np.ndarray:
    """A numeric column's values as float64 (NaN where missing); with ``path``, a value that is not a finite number
    stops the stage naming rows of the file (without, it reads as missing: a client's row)."""
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64)
    if path:
        bad = np.flatnonzero(frame[column].notna().to_numpy() & ~np.isfinite(values))
        if len(bad):
            shown = ", ".join(f"row {frame.index[i]}: {frame[column].iloc[i]!r}" for i in bad[:5])
            raise DataFormatError(f"{path}: numeric column {column!r} holds {len(bad)} value(s) that are not finite "
                                  f"numbers ({shown}); text that means missing belongs in na_values")
    return np.where(np.isfinite(values), values, np.nan)


def tags(column: pd.Series, separator: str) -> pd.Series:
    """Each row's tags (an empty list for a missing value)."""
    return column.fillna("").map(lambda text: [t.strip() for t in text.split(separator) if t.strip()])


def vocabulary(train: pd.DataFrame, cfg: TableData) -> dict[str, Any]:
    """What ``vocabulary.json`` holds: each field (input order) with its embedding rows' offset and, categorical, its
    values (row offset + 1 + i holds values[i]; row offset the other values) or, numeric, its bin edges (row offset
    + 1 + i holds the values with i edges at or below them; row offset the missing ones), each multi-hot group with
    its columns' offset in ``genres``, its separator and tags (a group left without tags keeps one all-zero
    column)."""
    def frequent(values: pd.Series) -> list[str]:
        counts = values.value_counts()
        return sorted(str(v) for v in counts[counts >= cfg.min_count].index)

    fields, offset = [], 0
    for name in cfg.categorical:
        values = frequent(categories(train[name]).dropna())
        fields.append({"name": name, "kind": "categorical", "offset": offset, "size": 1 + len(values),
                       "values": values})
        offset += 1 + len(values)
    for spec in cfg.numeric:
        seen = numbers(train, spec.column)
        seen = seen[~np.isnan(seen)]
        if not len(seen):
            raise DataFormatError(f"{cfg.table.path}: numeric column {spec.column!r} holds no value in the training "
                                  "rows: nothing to cut into bins")
        edges = np.unique(np.quantile(seen, np.arange(1, spec.buckets) / spec.buckets)).tolist()
        fields.append({"name": spec.column, "kind": "numeric", "offset": offset, "size": 2 + len(edges),
                       "edges": edges})
        offset += 2 + len(edges)
    groups, column = [], 0
    for spec in cfg.multi_hot:
        found = frequent(tags(train[spec.column], spec.separator).explode().dropna())
        groups.append({"name": spec.column, "separator": spec.separator, "offset": column, "size": max(1, len(found)),
                       "tags": found})
        column += max(1, len(found))
    return {"other": OTHER, "na_values": cfg.na_values, "fields": fields,
            "groups": groups or [{"name": "", "separator": "", "offset": 0, "size": 1, "tags": []}]}


def encode_with(frame: pd.DataFrame, vocab: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(fields (N, F) int64 global embedding rows, genres (N, G) float32 multi-hot) of ``frame``'s raw rows in the
    encoding of ``vocab`` (a ``vocabulary.json``; one written before numeric fields and ``na_values`` has neither)."""
    numeric = [f["name"] for f in vocab["fields"] if f.get("kind") == "numeric"]
    text = [f["name"] for f in vocab["fields"] if f["name"] not in numeric]
    text += [g["name"] for g in vocab["groups"] if g["name"]]
    # the cells as training read them (a client's 196 or 196.0 is the training rows' "196"); columns of text already,
    # as the prepare stage's own rows are, as they are
    frame = frame.assign(**{name: as_text(frame[name], "the rows to encode") for name in text
                            if pd.api.types.infer_dtype(frame[name], skipna=True) not in ("string", "empty")})
    frame = mark_missing(frame, vocab.get("na_values", []), text, numeric)
    codes = []
    for field in vocab["fields"]:
        if field.get("kind") == "numeric":   # (a vocabulary written before numeric fields names no kind)
            values = numbers(frame, field["name"])
            bins = np.searchsorted(np.asarray(field["edges"], np.float64), values, side="right") + 1
            codes.append(np.where(np.isnan(values), 0, bins).astype(np.int64) + field["offset"])
            continue
        # (a vocabulary written before whole floats were integers holds "196.0": its values are read alike)
        index = {_whole(v): i + 1 for i, v in enumerate(field["values"])}
        codes.append(categories(frame[field["name"]]).map(index).fillna(0).to_numpy(np.int64) + field["offset"])
    genres = np.zeros((len(frame), sum(g["size"] for g in vocab["groups"])), dtype=np.float32)
    for group in vocab["groups"]:
        if not group["name"]:
            continue
        index = {t: group["offset"] + i for i, t in enumerate(group["tags"])}
        for row, found in enumerate(tags(frame[group["name"]], group["separator"])):
            genres[row, [index[t] for t in found if t in index]] = 1.0
    fields = np.stack(codes, axis=1) if codes else np.zeros((len(frame), 0), np.int64)
    return np.ascontiguousarray(fields), genres


def prepare_table(cfg: TableData, out: Path, where: str, root: Path = Path()) -> dict[str, Any]:
    """Read, label, split and encode the table into ``out``; return the manifest (``features.json``)."""
    frame = read_table(cfg, where, root)
    y, (split, starts) = labels(frame, cfg), assign_splits(frame, cfg)
    for column in cfg.numeric_columns():
        numbers(frame, column, cfg.table.path)
    vocab = vocabulary(frame[split == "train"], cfg)
    manifest: dict[str, Any] = {
        "source": f"{cfg.table.path} ({table_format(cfg.table, where)})",
        "fields": [{k: f[k] for k in ("name", "offset", "size")} for f in vocab["fields"]],
        "groups": [{k: g[k] for k in ("name", "offset", "size")} for g in vocab["groups"]],
        "genres": [f"{g['name']}={t}" if g["name"] else "(none)" for g in vocab["groups"]
                   for t in (g["tags"] or ["(no tag)"])],
        "vocabulary": sum(f["size"] for f in vocab["fields"]), "read": {"rows": len(frame)}, "splits": {},
        **({"split_times": starts} if starts else {})}
    for name in SPLITS:
        rows = split == name
        fields, genres = encode_with(frame[rows], vocab)
        for suffix, arr in (("fields", fields), ("genres", genres), ("y", y[rows])):
            save_npy(out / f"{name}_{suffix}.npy", arr)
        manifest["splits"][name] = {"rows": int(rows.sum()),
                                    "positive_fraction": float(y[rows].mean()) if rows.any() else 0.0}
    buffer = io.BytesIO()
    frame[split == "test"].reset_index(drop=True).to_parquet(buffer, index=False)
    write_atomic(out / TEST_ROWS, buffer.getvalue())
    write_json(out / VOCABULARY, vocab)
    write_json(out / FEATURES, manifest)
    return manifest


def main(family: str) -> None:
    args, cfg = stage_args(__doc__, "--out")
    data = cfg.block("data", family)
    from tasks.tracking import stage_run

    with stage_run(f"prepare_{family}", cfg, params={f"data.{family}": data}) as run:
        manifest = prepare_table(data, args.out, f"data.{family}")
        run.log_metrics({f"{s}_rows": v["rows"] for s, v in manifest["splits"].items()}
                        | {"vocabulary": manifest["vocabulary"]})
        run.set_tag("data.source", manifest["source"])
        run.log_artifact(args.out / FEATURES)
    print(json.dumps({s: v["rows"] for s, v in manifest["splits"].items()}), f"from {manifest['source']}")
