"""The recommender family's intake (``tasks.intake``): MovieLens-style ratings that arrive in batches.

A batch is a folder with ``ratings.csv`` (user_id, item_id, rating, timestamp) and, for users and items it
introduces, ``users.csv`` (user_id, age, gender, occupation, zip_code) and ``items.csv`` (item_id, release_year,
genres joined by ``|``) — the normalised schema of ``tasks.recsys.movielens``, so the published data set is the bootstrap
batch. The contract checks a batch on its own and against the accepted data (every rating's user and item known,
no user rating an item twice, in the batch or after an accepted rating, whatever its timestamp; a user or item
sent again unchanged); the drift checks compare it with the accepted
data's profile: rating histogram, click rate, share of ratings by unseen users and items, the raters' age group,
gender and occupation, the rated items' genres; the aggregate checks label and split the accepted ratings with the
batch's as ``prepare_recsys`` does and hold them to ``validate.recsys``'s limits (``tasks.recsys.limits``). ``replay``
cuts MovieLens-100K by its timestamps into an initial window and the batches that followed it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.errors import DataFormatError
from tasks.expectations import expectation_types, suite
from tasks.intake import Intake, Suites, Tables, jensen_shannon, linf, shares
from tasks.io import write_csv
from tasks.recsys.limits import SPLITS, kept_expectation, split_expectations
from tasks.recsys.movielens import GENRES, acquire, typed
from tasks.recsys.prepare import assign_splits, label

COLUMNS = {"ratings": ["user_id", "item_id", "rating", "timestamp"],
           "users": ["user_id", "age", "gender", "occupation", "zip_code"],
           "items": ["item_id", "release_year", "genres"]}
TYPES = {"ratings": {"user_id": "int64", "item_id": "int64", "rating": "int64", "timestamp": "int64"},
         "users": {"user_id": "int64", "age": "int64"}, "items": {"item_id": "int64", "release_year": "int64"}}
KEYS = {"ratings": ["user_id", "item_id", "timestamp"], "users": ["user_id"], "items": ["item_id"]}
# a user rates an item once: a second rating of the pair, at any time, would put the model's whole input (the user's
# and the item's fields) in two splits (a rating's split is a hash of user, item and timestamp)
RATED = ["user_id", "item_id"]
AGE_EDGES = [18, 25, 35, 45, 50, 56]   # MovieLens-1M's age groups (as tasks.recsys.prepare encodes them)


def settings(cfg: Any) -> Any:
    return cfg.ingest.recsys


def pins(cfg: Any) -> dict[str, str]:
    return dict(cfg.data.recsys.sha256)


def bootstrap(cfg: Any) -> tuple[str, Tables, dict[str, str]]:
    source, found = acquire(cfg.data.recsys)
    return source, found, pins(cfg)


def _sorted(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(KEYS[name], kind="stable").reset_index(drop=True)


def read_batch(folder: Path) -> Tables:
    """The tables of a batch folder: ``ratings.csv`` required, ``users.csv`` / ``items.csv`` when it has them.
    Columns and types are checked here (a file that does not parse names itself); values by the contract."""
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: not a folder (a batch is a folder with ratings.csv)")
    found: Tables = {}
    for name, columns in COLUMNS.items():
        path = folder / f"{name}.csv"
        if not path.is_file():
            if name == "ratings":
                raise DataFormatError(f"{folder}: has no ratings.csv")
            found[name] = pd.DataFrame({c: pd.Series(dtype="int64" if c in TYPES[name] else "str") for c in columns})
            continue
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except ValueError as err:   # ParserError, EmptyDataError, UnicodeDecodeError
            raise DataFormatError(f"{path}: {' '.join(str(err).split())}") from err
        if sorted(frame.columns) != sorted(columns):
            raise DataFormatError(f"{path}: columns {list(frame.columns)}, expected {columns}")
        found[name] = _sorted(name, typed(frame[columns], TYPES[name], str(path)))
    return found


def write_batch(tables: Tables, folder: Path) -> None:
    """``tables`` as a batch folder (users.csv / items.csv only when they hold rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, columns in COLUMNS.items():
        frame = tables.get(name)
        if frame is None or (name != "ratings" and frame.empty):
            continue
        write_csv(folder / f"{name}.csv", _sorted(name, frame[columns]))


def combine(batches: list[Tables]) -> Tables:
    """All ratings; each user and item as first accepted (the contract refuses one sent again with other values)."""
    return {name: _sorted(name, pd.concat([b[name] for b in batches], ignore_index=True)
                          .drop_duplicates(KEYS[name] if name != "ratings" else None, keep="first"))
            for name in COLUMNS}


def rows(tables: Tables) -> dict[str, int]:
    return {name: len(tables[name]) for name in COLUMNS}


def _member(frame: pd.DataFrame, other: pd.DataFrame | None, keys: list[str]) -> np.ndarray:
    """Whether each row of ``frame`` has its ``keys`` on a row of ``other``."""
    if other is None or other.empty or frame.empty:
        return np.zeros(len(frame), dtype=np.int64)
    return frame[keys].merge(other[keys].drop_duplicates(), how="left", on=keys, indicator=True)["_merge"] \
        .eq("both").to_numpy().astype(np.int64)


def _changed(frame: pd.DataFrame, accepted: pd.DataFrame | None, key: str) -> np.ndarray:
    """1 where a row of ``frame`` names an accepted ``key`` with other values."""
    if accepted is None or accepted.empty or frame.empty:
        return np.zeros(len(frame), dtype=np.int64)
    merged = frame.merge(accepted, how="left", on=key, suffixes=("", "_accepted"), indicator=True)
    known = merged["_merge"].eq("both")
    differs = np.zeros(len(frame), dtype=bool)
    for column in (c for c in frame.columns if c != key):
        differs |= known.to_numpy() & (merged[column].astype(str) != merged[f"{column}_accepted"].astype(str)).to_numpy()
    return differs.astype(np.int64)


def contract(batch: Tables, accepted: Tables | None, cfg: Any) -> Suites:
    """The batch against the schema and the accepted data: values in range, labels, references, duplicates."""
    E = expectation_types()
    spec = settings(cfg)
    ratings, users, items = batch["ratings"], batch["users"], batch["items"]
    known_users = set(users.user_id.tolist()) | set(accepted["users"].user_id.tolist() if accepted else [])
    known_items = set(items.item_id.tolist()) | set(accepted["items"].item_id.tolist() if accepted else [])
    now = int(time.time()) + 86_400   # a day of clock skew
    rated = ratings.assign(accepted_before=_member(ratings, accepted["ratings"] if accepted else None, RATED))
    out = [(suite("ingest_ratings", [
        E.ExpectTableRowCountToBeBetween(min_value=spec.min_rows),
        *(E.ExpectColumnValuesToNotBeNull(column=c) for c in COLUMNS["ratings"]),
        E.ExpectColumnValuesToBeBetween(column="rating", min_value=1, max_value=5),
        E.ExpectColumnValuesToBeBetween(column="timestamp", min_value=1, max_value=now),
        E.ExpectColumnValuesToBeInSet(column="user_id", value_set=sorted(known_users)),
        E.ExpectColumnValuesToBeInSet(column="item_id", value_set=sorted(known_items)),
        E.ExpectCompoundColumnsToBeUnique(column_list=RATED),
        E.ExpectColumnValuesToBeInSet(column="accepted_before", value_set=[0])]), rated)]
    if not users.empty:
        out.append((suite("ingest_users", [
            E.ExpectColumnValuesToBeUnique(column="user_id"),
            E.ExpectColumnValuesToBeBetween(column="age", min_value=1, max_value=100),
            E.ExpectColumnValuesToBeInSet(column="gender", value_set=["M", "F"]),
            E.ExpectColumnValueLengthsToBeBetween(column="occupation", min_value=1),
            E.ExpectColumnValueLengthsToBeBetween(column="zip_code", min_value=1),
            E.ExpectColumnValuesToBeInSet(column="changes_accepted", value_set=[0])]),
            users.assign(changes_accepted=_changed(users, accepted["users"] if accepted else None, "user_id"))))
    if not items.empty:
        unknown = items.genres.map(lambda g: int(bool(g) and not set(g.split("|")) <= set(GENRES)))
        out.append((suite("ingest_items", [
            E.ExpectColumnValuesToBeUnique(column="item_id"),
            E.ExpectColumnValuesToBeBetween(column="release_year", min_value=0, max_value=2100),
            E.ExpectColumnValuesToBeInSet(column="unknown_genres", value_set=[0]),
            E.ExpectColumnValuesToBeInSet(column="changes_accepted", value_set=[0])]),
            items.assign(unknown_genres=unknown,
                         changes_accepted=_changed(items, accepted["items"] if accepted else None, "item_id"))))
    return out


def _clicks(ratings: pd.DataFrame, cfg: Any) -> float:
    data = cfg.data.recsys
    labelled = ratings.rating[(ratings.rating >= data.positive_min_rating) | (ratings.rating <= data.negative_max_rating)]
    return float((labelled >= data.positive_min_rating).mean()) if len(labelled) else 0.0


def _raters(ratings: pd.DataFrame, users: pd.DataFrame) -> pd.DataFrame:
    joined = ratings[["user_id"]].merge(users, how="left", on="user_id")
    return joined.assign(age=np.digitize(joined.age.fillna(0), AGE_EDGES))


def _genres(ratings: pd.DataFrame, items: pd.DataFrame) -> pd.Series:
    joined = ratings[["item_id"]].merge(items[["item_id", "genres"]], how="left", on="item_id")
    return joined.genres.fillna("").str.split("|").explode().replace("", "unknown")


def profile(tables: Tables, cfg: Any) -> dict[str, Any]:
    """The reference profile of accepted data: what the drift checks compare a new batch with."""
    ratings, raters = tables["ratings"], _raters(tables["ratings"], tables["users"])
    return {"ratings": len(ratings), "users": int(ratings.user_id.nunique()), "items": int(ratings.item_id.nunique()),
            "click_rate": _clicks(ratings, cfg),
            "rating_shares": shares(ratings.rating, [1, 2, 3, 4, 5]).round(6).to_dict(),
            "first_timestamp": int(ratings.timestamp.min()) if len(ratings) else None,
            "last_timestamp": int(ratings.timestamp.max()) if len(ratings) else None,
            **{f"{c}_shares": shares(raters[c]).round(6).to_dict() for c in ("age", "gender", "occupation")},
            "genre_shares": shares(_genres(ratings, tables["items"])).round(6).to_dict()}


def drift_stats(batch: Tables, accepted: Tables, cfg: Any) -> dict[str, float]:
    b, a = batch["ratings"], accepted["ratings"]
    users = combine([accepted, batch])["users"]
    items = combine([accepted, batch])["items"]
    rb, ra = _raters(b, users), _raters(a, users)
    return {"rating_linf": linf(shares(b.rating, [1, 2, 3, 4, 5]), shares(a.rating, [1, 2, 3, 4, 5])),
            "click_rate_delta": abs(_clicks(b, cfg) - _clicks(a, cfg)),
            "unseen_user_share": float((~b.user_id.isin(a.user_id)).mean()) if len(b) else 0.0,
            "unseen_item_share": float((~b.item_id.isin(a.item_id)).mean()) if len(b) else 0.0,
            **{f"{c}_js": jensen_shannon(shares(rb[c]), shares(ra[c])) for c in ("age", "gender", "occupation")},
            "genre_js": jensen_shannon(shares(_genres(b, items)), shares(_genres(a, items)))}


def drift(batch: Tables, accepted: Tables, cfg: Any) -> tuple[dict[str, float], Suites]:
    """The batch's distances from the accepted data, and the suite that holds each under its threshold."""
    E = expectation_types()
    limits = settings(cfg).drift
    stats = drift_stats(batch, accepted, cfg)
    bound = {name: getattr(limits, name) for name in stats}
    frame = pd.DataFrame({name: [value] for name, value in stats.items()})
    return stats, [(suite("ingest_drift", [E.ExpectColumnMaxToBeBetween(column=name, min_value=0.0,
                                                                         max_value=bound[name]) for name in stats]),
                    frame)]


def aggregate(tables: Tables, cfg: Any) -> Suites:
    """The snapshot ``tables`` would be, labelled and split as prepare_recsys does, against validate_recsys's limits
    on the whole: the labelled share, each split's share and label balance. No suites until every split holds its
    ``min_rows`` (validate_recsys names a snapshot that small, and more batches are the way out), and none for a
    temporal split: its validation and test rows are the newest, their balance the last weeks', which the next batch
    moves again (validate_recsys judges the snapshot)."""
    if cfg.data.recsys.split.method != "hash":
        return []
    rows = label(tables["ratings"], cfg.data.recsys)
    parts = {name: part[["label"]] for name, part in rows.groupby(assign_splits(rows, cfg.data.recsys))}
    rules = cfg.validate_.recsys
    if any(len(parts.get(name, ())) < rules.min_rows.get(name, 1) for name in SPLITS):
        return []
    sizes = pd.DataFrame({"ratings_labelled": [len(rows)]})
    return [(suite("ingest_aggregate_sizes", [kept_expectation(rules, len(tables["ratings"]))]), sizes),
            *((suite(f"ingest_aggregate_{name}", split_expectations(cfg, name, len(rows))), parts[name])
              for name in SPLITS)]


def replay(cfg: Any, landing: Path) -> list[Path]:
    """MovieLens-100K as it arrived: the oldest ``initial_fraction`` of ratings as batch ``0000-initial``, then one
    batch per ``period_days`` (a period with fewer than ``min_rows`` ratings joins the next); each batch carries the
    users and items its ratings introduce."""
    spec = settings(cfg).replay
    _, found = acquire(cfg.data.recsys)
    ratings = found["ratings"].sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    ts = ratings.timestamp.to_numpy()
    cut = int(ts[round(len(ts) * spec.initial_fraction)])
    period = spec.period_days * 86_400
    window = np.where(ts < cut, -1, (ts - cut) // period)
    groups, current, start = [], [], None
    for w in np.unique(window):
        current.append(w)
        size = int(np.isin(window, current).sum())
        if w == -1 or size >= spec.min_rows:
            groups.append(list(current))
            current = []
    if current:   # a short tail joins the last batch
        groups[-1] += current
    seen_users: set[int] = set()
    seen_items: set[int] = set()
    written = []
    for n, group in enumerate(groups):
        part = ratings[np.isin(window, group)]
        start = int(part.timestamp.min())
        name = "0000-initial" if group == [-1] else f"{n:04d}-{time.strftime('%Y-%m-%d', time.gmtime(start))}"
        new_users = sorted(set(part.user_id) - seen_users)
        new_items = sorted(set(part.item_id) - seen_items)
        seen_users |= set(new_users)
        seen_items |= set(new_items)
        tables = {"ratings": part, "users": found["users"][found["users"].user_id.isin(new_users)],
                  "items": found["items"][found["items"].item_id.isin(new_items)]}
        write_batch(tables, landing / name)
        written.append(landing / name)
    return written


INTAKE = Intake(settings=settings, pins_key="data.recsys.sha256", pins=pins, bootstrap=bootstrap,
                read_batch=read_batch, write_batch=write_batch, combine=combine, rows=rows, contract=contract,
                profile=profile, drift=drift, replay=replay, aggregate=aggregate)
