"""How a table family's rows are split (``data.<family>.split``): by a seeded hash of key columns (a row keeps its
split when the table grows), by time (the newest rows are test, the ones before them val), or as the table's own
split column says."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from tasks.ctr.table_config import SPLITS, TableData
from tasks.errors import DataFormatError


def times(frame: pd.DataFrame, column: str, path: str) -> np.ndarray:
    """The time column as numbers to order by: its values as numbers (epoch seconds, a day count) or as dates and times
    (ISO 8601, as seconds since 1970 UTC), whichever reads more of them; a value that reading leaves missing or
    unread stops the stage naming rows."""
    values = frame[column]
    found = pd.to_numeric(values, errors="coerce").to_numpy(np.float64)
    if not np.isfinite(found).all():
        stamps = pd.to_datetime(values, errors="coerce", utc=True, format="ISO8601")
        epoch = pd.Timestamp(0, tz="UTC").as_unit(stamps.dt.unit)   # (the years 1677-2262 fit nanoseconds only)
        dates = ((stamps - epoch) / pd.Timedelta(seconds=1)).to_numpy(np.float64, na_value=np.nan)
        found = dates if np.isfinite(dates).sum() > np.isfinite(found).sum() else found
    bad = np.flatnonzero(~np.isfinite(found))
    if len(bad):
        shown = ", ".join(f"row {frame.index[i]}: " + ("missing" if values.iloc[i] is None else repr(values.iloc[i]))
                          for i in bad[:5])
        raise DataFormatError(f"{path}: time column {column!r} holds {len(bad)} value(s) that are neither finite "
                              f"numbers nor dates ({shown})")
    return found


def time_splits(when: np.ndarray, val: float, test: float) -> tuple[np.ndarray, dict[str, float]]:
    """``train``/``val``/``test`` per row by time: test from the time of the row at the newest ``test`` share on,
    val from the one at the ``val`` share before it (rows of one time stay in one split); and those two times."""
    ordered, n = np.sort(when), len(when)
    tested, validated = (max(1, int(n * share + 0.5)) for share in (test, val))   # at least a row each
    if n <= tested + validated:
        raise ValueError(f"{n} rows are too few to split by time: test takes {tested}, val {validated}")
    cut = {"val_from": float(ordered[n - tested - validated]), "test_from": float(ordered[n - tested])}
    return np.where(when >= cut["test_from"], "test", np.where(when >= cut["val_from"], "val", "train")), cut


def assign_splits(frame: pd.DataFrame, cfg: TableData) -> tuple[np.ndarray, dict[str, float]]:
    """``train``/``val``/``test`` per row: by a seeded hash of its key values, by time, or as its split column says;
    and, by time, the times val and test start from (in the column's numbers). A split that time leaves empty (one
    time shared by the rows around a cut) stops the stage naming it."""
    if cfg.split.method != "time":
        return _hash_or_column(frame, cfg), {}
    when = times(frame, cfg.split.column, cfg.table.path)
    try:
        names, cut = time_splits(when, cfg.split.val, cfg.split.test)
    except ValueError as err:
        raise DataFormatError(f"{cfg.table.path}: {err}") from None
    for name in SPLITS:
        if not (names == name).any():
            at = np.flatnonzero(when == (cut["test_from"] if name == "test" else cut["val_from"]))
            raise DataFormatError(f"{cfg.table.path}: the split by time column {cfg.split.column!r} leaves no {name} "
                                  f"rows: {len(at)} rows share the time {frame[cfg.split.column].iloc[at[0]]!r} at its "
                                  "cut (rows of one time stay in one split)")
    return names, cut


def _hash_or_column(frame: pd.DataFrame, cfg: TableData) -> np.ndarray:
    if cfg.split.method == "column":
        names = frame[cfg.split.column].to_numpy(dtype=object)
        bad = np.flatnonzero(~np.isin(names, SPLITS))
        if len(bad):
            raise DataFormatError(f"{cfg.table.path}: split column {cfg.split.column!r} holds values other than "
                                  f"{list(SPLITS)} (row {frame.index[bad[0]]}: {names[bad[0]]!r}, {len(bad)} rows)")
        return names
    joined = frame[cfg.split_key()].fillna("").astype(str).agg("\x1f".join, axis=1)
    u = np.array([int.from_bytes(hashlib.sha256(f"{cfg.seed}:{row}".encode()).digest()[:8], "big")
                  for row in joined], dtype=np.float64) / 2.0**64
    return np.where(u < cfg.split.test, "test", np.where(u < cfg.split.test + cfg.split.val, "val", "train"))
