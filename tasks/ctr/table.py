"""Stage ``prepare_<family>`` of a table family: a user's click-through table (CSV or Parquet) -> encoded splits,
read only through the schema ``data.<family>`` declares (``tasks.ctr.table_config.TableData``).

Rows: every row of the table (or a seeded ``subset``), labelled by its ``label`` column (0/1, true/false). Split:
a seeded hash of each row's ``split.key`` values (a row keeps its split when the table grows), or the table's own
split column. Encoding, from the training rows only: a categorical field gets one embedding row per value seen at
least ``min_count`` times there, after row 0, which every other value (unseen, rare, missing) shares; a multi-hot
column one column per tag seen that often (other tags are dropped). Without a multi-hot column ``genres`` is one
all-zero column.

Output in ``<out>``: ``{train,val,test}_{fields,genres,y}.npy`` (the kit's format, ``tasks.ctr.ctr_training``),
``features.json`` (field layout with offsets and sizes, multi-hot groups, rows per split, source), and
``vocabulary.json`` (each field's and group's values in embedding-row order: shipped with every registered model,
so a client encodes a raw row as the model was trained).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.config import stage_args
from tasks.ctr.table_config import SPLITS, TableData, TableFile
from tasks.errors import DataFormatError, DataSourceError
from tasks.io import save_npy, write_json

VOCABULARY, FEATURES = "vocabulary.json", "features.json"
OTHER = "<other>"   # a field's row 0: any value the training rows did not hold often enough
TRUE, FALSE = frozenset({"1", "1.0", "true", "True", "TRUE"}), frozenset({"0", "0.0", "false", "False", "FALSE"})


def table_format(spec: TableFile) -> str:
    if spec.format:
        return spec.format
    name = spec.path.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz", ".csv.bz2")):
        return "csv"
    raise DataFormatError(f"{spec.path}: cannot tell its format from the name; set format: csv or parquet")


def read_table(cfg: TableData, root: Path = Path()) -> pd.DataFrame:
    """The declared columns of the table, every value a string (missing: NaN); a seeded ``subset`` of its rows."""
    path = root / cfg.table.path
    if not path.is_file():
        raise DataSourceError(f"{cfg.table.path}: no such table (data.table.path)")
    wanted = cfg.columns()
    try:
        if table_format(cfg.table) == "parquet":
            frame = pd.read_parquet(path)
            frame = frame.astype({c: str for c in frame.columns if c in wanted}).where(frame.notna())
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=True)
    except (OSError, ValueError, ImportError) as err:   # pandas' ParserError is a ValueError; pyarrow's errors too
        raise DataFormatError(f"{cfg.table.path}: cannot be read as {table_format(cfg.table)} "
                              f"({' '.join(str(err).split())[:300]})") from err
    missing = [c for c in wanted + cfg.split.key if c not in frame.columns]
    if missing:
        raise DataFormatError(f"{cfg.table.path}: has no column {', '.join(missing)} (its columns: "
                              f"{', '.join(map(str, frame.columns))[:300]})")
    frame = frame[wanted + [c for c in cfg.split.key if c not in wanted]]
    if cfg.subset is not None and cfg.subset < len(frame):
        frame = frame.iloc[np.sort(np.random.default_rng(cfg.seed).choice(len(frame), cfg.subset, replace=False))]
    return frame.reset_index(drop=True)


def labels(frame: pd.DataFrame, cfg: TableData) -> np.ndarray:
    """The label column as 0.0 / 1.0; a value that is neither stops the stage naming rows."""
    values = frame[cfg.label]
    ones, zeros = values.isin(TRUE), values.isin(FALSE)
    bad = np.flatnonzero(~(ones | zeros).to_numpy())
    if len(bad):
        shown = ", ".join(f"row {i}: {values.iloc[i]!r}" for i in bad[:5])
        raise DataFormatError(f"{cfg.table.path}: label column {cfg.label!r} holds {len(bad)} value(s) that are not "
                              f"0/1 or true/false ({shown})")
    return ones.to_numpy(np.float32)


def assign_splits(frame: pd.DataFrame, cfg: TableData) -> np.ndarray:
    """``train``/``val``/``test`` per row: by a seeded hash of its key values, or as its split column says."""
    if cfg.split.method == "column":
        names = frame[cfg.split.column].to_numpy(dtype=object)
        bad = np.flatnonzero(~np.isin(names, SPLITS))
        if len(bad):
            raise DataFormatError(f"{cfg.table.path}: split column {cfg.split.column!r} holds values other than "
                                  f"{list(SPLITS)} (row {bad[0]}: {names[bad[0]]!r}, {len(bad)} rows)")
        return names
    key = cfg.split.key or cfg.columns()
    joined = frame[key].fillna("").astype(str).agg("\x1f".join, axis=1)
    u = np.array([int.from_bytes(hashlib.sha256(f"{cfg.seed}:{row}".encode()).digest()[:8], "big")
                  for row in joined], dtype=np.float64) / 2.0**64
    return np.where(u < cfg.split.test, "test", np.where(u < cfg.split.test + cfg.split.val, "val", "train"))


def tags(column: pd.Series, separator: str) -> pd.Series:
    """Each row's tags (an empty list for a missing value)."""
    return column.fillna("").map(lambda text: [t.strip() for t in text.split(separator) if t.strip()])


def vocabulary(train: pd.DataFrame, cfg: TableData) -> dict[str, list[str]]:
    """Each field's values after row 0 (``OTHER``), and each multi-hot column's tags, in embedding-row order: those
    the training rows hold at least ``min_count`` times, sorted."""
    def frequent(values: pd.Series) -> list[str]:
        counts = values.value_counts()
        return sorted(str(v) for v in counts[counts >= cfg.min_count].index)

    vocab = {name: frequent(train[name].dropna()) for name in cfg.categorical}
    for group in cfg.multi_hot:
        vocab[group.column] = frequent(tags(train[group.column], group.separator).explode().dropna())
    return vocab


def layout(vocab: dict[str, list[str]], cfg: TableData) -> tuple[list[dict], list[dict]]:
    """(the fields' embedding rows: name, offset, size with row 0 for other values; the multi-hot groups: name,
    offset and size in ``genres``' columns)."""
    fields, offset = [], 0
    for name in cfg.categorical:
        fields.append({"name": name, "offset": offset, "size": 1 + len(vocab[name])})
        offset += 1 + len(vocab[name])
    groups, column = [], 0
    for group in cfg.multi_hot:
        size = max(1, len(vocab[group.column]))   # a column whose every tag is rare still has its (zero) column
        groups.append({"name": group.column, "offset": column, "size": size})
        column += size
    return fields, groups or [{"name": "", "offset": 0, "size": 1}]


def encode(frame: pd.DataFrame, vocab: dict[str, list[str]], cfg: TableData) -> tuple[np.ndarray, np.ndarray]:
    """(fields (N, F) int64 global embedding rows, genres (N, G) float32 multi-hot) of ``frame``'s rows."""
    fields_layout, groups = layout(vocab, cfg)
    codes = []
    for field in fields_layout:
        index = {v: i + 1 for i, v in enumerate(vocab[field["name"]])}
        codes.append(frame[field["name"]].map(index).fillna(0).to_numpy(np.int64) + field["offset"])
    genres = np.zeros((len(frame), sum(g["size"] for g in groups)), dtype=np.float32)
    for group, spec in zip(groups, cfg.multi_hot, strict=False):
        index = {t: group["offset"] + i for i, t in enumerate(vocab[spec.column])}
        for row, found in enumerate(tags(frame[spec.column], spec.separator)):
            genres[row, [index[t] for t in found if t in index]] = 1.0
    fields = np.stack(codes, axis=1) if codes else np.zeros((len(frame), 0), np.int64)
    return np.ascontiguousarray(fields), genres


def prepare_table(cfg: TableData, out: Path, root: Path = Path()) -> dict[str, Any]:
    """Read, label, split and encode the table into ``out``; return the manifest (``features.json``)."""
    frame = read_table(cfg, root)
    y, split = labels(frame, cfg), assign_splits(frame, cfg)
    vocab = vocabulary(frame[split == "train"], cfg)
    fields_layout, groups = layout(vocab, cfg)
    manifest: dict[str, Any] = {
        "source": f"{cfg.table.path} ({table_format(cfg.table)})", "fields": fields_layout, "groups": groups,
        "genres": [name for spec in cfg.multi_hot
                   for name in ([f"{spec.column}={t}" for t in vocab[spec.column]] or [f"{spec.column}=(no tag)"])]
        or ["(none)"],
        "vocabulary": sum(f["size"] for f in fields_layout), "read": {"rows": len(frame)}, "splits": {}}
    for name in SPLITS:
        rows = split == name
        fields, genres = encode(frame[rows], vocab, cfg)
        for suffix, arr in (("fields", fields), ("genres", genres), ("y", y[rows])):
            save_npy(out / f"{name}_{suffix}.npy", arr)
        manifest["splits"][name] = {"rows": int(rows.sum()),
                                    "positive_fraction": float(y[rows].mean()) if rows.any() else 0.0}
    write_json(out / VOCABULARY, {"other": OTHER, "fields": {f: vocab[f] for f in cfg.categorical},
                                  "multi_hot": {g.column: vocab[g.column] for g in cfg.multi_hot}})
    write_json(out / FEATURES, manifest)
    return manifest


def main(family: str) -> None:
    args, cfg = stage_args(__doc__, "--out")
    data = cfg.block("data", family)
    from tasks.tracking import stage_run

    with stage_run(f"prepare_{family}", cfg, params={f"data.{family}": data}) as run:
        manifest = prepare_table(data, args.out)
        run.log_metrics({f"{s}_rows": v["rows"] for s, v in manifest["splits"].items()}
                        | {"vocabulary": manifest["vocabulary"]})
        run.set_tag("data.source", manifest["source"])
        run.log_artifact(args.out / FEATURES)
    print(json.dumps({s: v["rows"] for s, v in manifest["splits"].items()}), f"from {manifest['source']}")
