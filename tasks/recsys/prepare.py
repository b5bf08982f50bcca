"""Stage ``prepare_recsys``: the raw snapshot (MovieLens-100K and accepted batches) -> click-through splits with
encoded field features.

Protocol (RecBole's CTR convention): ratings >= ``positive_min_rating`` are label 1, ratings <=
``negative_max_rating`` label 0, the ones between are dropped. Fields: user id, item id, age bucket, gender,
occupation, zip prefix, release-year bucket (one embedding row each, in one table with per-field offsets) and the
19 genres as a multi-hot vector. Split: ``train/val/test`` by a seeded hash of each rating (a rating keeps its
split as the snapshot grows), or temporal (newest last).

Input: ``<raw>``, the family's snapshot (``tasks.snapshot``: the published data set and every batch
``flows.ingest`` accepted). Outputs in ``<out>``: ``{train,val,test}_{fields,genres,y}.npy``; ``users.npy`` / ``items.npy`` /
``items_genres.npy`` (every user's and item's encoded fields, for ranking and candidate scoring);
``interactions.csv`` (the labelled rows with their split), ``users.csv``, ``items.csv`` (the normalised tables, for
validation); ``features.json`` (field offsets and sizes, source, row counts); ``vocabulary.json`` (each field's
values in embedding-row order: shipped with every registered model, so a champion trained on an older snapshot is
scored on new data in its own encoding); ``windows.json``: the test rows of each evaluation window, by position in
``test_*.npy`` — ``golden``, the test rows of the snapshot's first batch (the same ratings in every later snapshot,
for comparability across runs), and ``recent``, those of its newest batch (data no model trained on before this
run: a true temporal evaluation of the champion beside the challenger).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config import stage_args
from tasks.errors import run_cli
from tasks.io import WINDOWS, save_npy, write_csv, write_json
from tasks.recsys.config import RecsysData
from tasks.recsys.movielens import GENRES, acquire

Source = tuple[str, dict[str, pd.DataFrame]]   # (where the tables came from, the normalised tables)
KEY = ["user_id", "item_id", "timestamp"]   # a rating (the intake's contract keeps it unique)

SPLITS = ("train", "val", "test")
USER_FIELDS, ITEM_FIELDS = ("user", "age", "gender", "occupation", "zip"), ("item", "year")
VOCABULARY = "vocabulary.json"   # each field's values in embedding-row order: how a model reads raw ids
FIELDS = ("user", "item", "age", "gender", "occupation", "zip", "year")   # column order of *_fields.npy
AGE_EDGES = [18, 25, 35, 45, 50, 56]  # the MovieLens-1M age groups: under 18, 18-24, ..., 56 and over


def label(ratings: pd.DataFrame, cfg: RecsysData) -> pd.DataFrame:
    """Keep clear likes and dislikes; ``label`` 1 for >= positive_min_rating, 0 for <= negative_max_rating."""
    kept = ratings[(ratings.rating >= cfg.positive_min_rating) | (ratings.rating <= cfg.negative_max_rating)]
    return kept.assign(label=(kept.rating >= cfg.positive_min_rating).astype(np.int64)).reset_index(drop=True)


def assign_splits(rows: pd.DataFrame, cfg: RecsysData) -> pd.Series:
    """``train``/``val``/``test`` per row: by a seeded hash of the rating (stable as the data grows: a rating keeps
    its split in every later snapshot), or by timestamp (ties broken by user, item)."""
    n = len(rows)
    names = np.empty(n, dtype=object)
    if cfg.split.method == "hash":
        keys = zip(rows.user_id.to_numpy(), rows.item_id.to_numpy(), rows.timestamp.to_numpy(), strict=True)
        u = np.array([int.from_bytes(hashlib.sha256(f"{cfg.seed}:{a}:{b}:{c}".encode()).digest()[:8], "big")
                      for a, b, c in keys], dtype=np.float64) / 2.0**64
        names[:] = np.where(u < cfg.split.test, "test", np.where(u < cfg.split.test + cfg.split.val, "val", "train"))
        return pd.Series(names, index=rows.index, name="split")
    n_train, n_val, n_test = cfg.split.sizes(n)
    order = np.lexsort((rows.item_id.to_numpy(), rows.user_id.to_numpy(), rows.timestamp.to_numpy()))
    names[order[:n_train]] = "train"
    names[order[n_train: n - n_test]] = "val"
    names[order[n - n_test:]] = "test"
    return pd.Series(names, index=rows.index, name="split")


ENCODING = "encoding"   # vocabulary.json's record of how raw values become categories (params of prepare_recsys)


def encoding(cfg: RecsysData) -> dict[str, int]:
    return {"year_bucket": cfg.year_bucket, "zip_prefix_length": cfg.zip_prefix_length}


def field_values(users: pd.DataFrame, items: pd.DataFrame, cfg: RecsysData,
                 recorded: dict[str, int] | None = None) -> dict[str, pd.Series]:
    """The raw category of every field, per user (user fields) or per item (item fields); ``recorded``: the encoding
    a vocabulary was made with (default: params')."""
    spec = {**encoding(cfg), **(recorded or {})}
    year = items.release_year.where(items.release_year == 0,
                                    items.release_year // spec["year_bucket"] * spec["year_bucket"])
    # any age has a group (the end groups are open), so an impossible age reaches validate_recsys, which names it
    age = np.digitize(users.age, AGE_EDGES).astype(np.int64)
    return {"user": users.user_id, "age": pd.Series(age, index=users.index),
            "gender": users.gender, "occupation": users.occupation,
            "zip": users.zip_code.str[: spec["zip_prefix_length"]].str.upper(),
            "item": items.item_id, "year": year}


def vocabulary(users: pd.DataFrame, items: pd.DataFrame, cfg: RecsysData) -> dict[str, list]:
    """Every field's values in the order of their embedding rows, and the encoding that made them (what
    ``vocabulary.json`` holds)."""
    values = field_values(users, items, cfg)
    return {**{name: sorted(values[name].unique().tolist()) for name in FIELDS}, ENCODING: encoding(cfg)}


def encode_with(users: pd.DataFrame, items: pd.DataFrame, cfg: RecsysData,
                vocab: dict[str, list]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Global embedding-row indices of every user's and every item's fields in ``vocab`` (-1 for a value it does not
    hold), read with the encoding ``vocab`` records (a vocabulary made before it recorded one: params'), and the
    field layout."""
    values, offset, layout, codes = field_values(users, items, cfg, vocab.get(ENCODING)), 0, [], {}
    for name in FIELDS:
        index = {str(v): i for i, v in enumerate(vocab[name])}
        found = values[name].astype(str).map(index)
        codes[name] = np.where(found.isna(), -1, found.fillna(0).to_numpy(np.int64) + offset)
        layout.append({"name": name, "offset": offset, "size": len(vocab[name])})
        offset += len(vocab[name])
    return (np.stack([codes[f] for f in USER_FIELDS], 1), np.stack([codes[f] for f in ITEM_FIELDS], 1), layout)


def encode(users: pd.DataFrame, items: pd.DataFrame, cfg: RecsysData) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Global embedding-row indices of every user's and every item's fields, and the field layout."""
    return encode_with(users, items, cfg, vocabulary(users, items, cfg))


def genre_matrix(items: pd.DataFrame) -> np.ndarray:
    return np.array([[g in row.split("|") for g in GENRES] for row in items.genres], dtype=np.float32)


def assemble_fields(user_codes: np.ndarray, item_codes: np.ndarray) -> np.ndarray:
    """Rows of ``*_fields.npy`` (FIELDS order) from per-row user codes (N, 5) and item codes (N, 2)."""
    columns = [user_codes[:, :1], item_codes[:, :1], user_codes[:, 1:], item_codes[:, 1:]]
    return np.ascontiguousarray(np.concatenate(columns, axis=1), dtype=np.int64)


def row_features(rows: pd.DataFrame, user_codes: np.ndarray, item_codes: np.ndarray, item_genres: np.ndarray,
                 users: pd.DataFrame, items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(fields (N, 7) in FIELDS order, genres (N, 19)) of labelled rows."""
    u = pd.Index(users.user_id).get_indexer(rows.user_id)
    i = pd.Index(items.item_id).get_indexer(rows.item_id)
    return assemble_fields(user_codes[u], item_codes[i]), item_genres[i]


def test_windows(test: pd.DataFrame, windows: dict[str, pd.DataFrame]) -> dict[str, list[int]]:
    """{window: positions in ``test`` of the ratings ``windows[window]`` holds}."""
    return {name: np.flatnonzero(test[KEY].merge(ratings[KEY].drop_duplicates(), how="left", on=KEY,
                                                 indicator=True)["_merge"].eq("both").to_numpy()).tolist()
            for name, ratings in windows.items()}


def prepare_recsys(cfg: RecsysData, out: Path, found: Source | None = None,
                   windows: dict[str, pd.DataFrame] | None = None) -> dict:
    """Label, encode and split the tables of ``found`` (default: the published data set, acquired now) into
    ``out``; return the manifest. ``windows``: the ratings of each evaluation window (default: all of them are the
    golden window)."""
    source, tables = found if found is not None else acquire(cfg)
    users, items = tables["users"], tables["items"]
    rows = label(tables["ratings"], cfg)
    rows["split"] = assign_splits(rows, cfg)
    user_codes, item_codes, layout = encode(users, items, cfg)
    item_genres = genre_matrix(items)
    manifest = {"source": source, "fields": layout, "genres": list(GENRES),
                "vocabulary": layout[-1]["offset"] + layout[-1]["size"],
                "read": {name: len(frame) for name, frame in tables.items()}, "labelled": len(rows), "splits": {}}
    for name in SPLITS:
        part = rows[rows.split == name]
        fields, genres = row_features(part, user_codes, item_codes, item_genres, users, items)
        for suffix, arr in (("fields", fields), ("genres", genres), ("y", part.label.to_numpy(np.float32))):
            save_npy(out / f"{name}_{suffix}.npy", arr)
        manifest["splits"][name] = {"rows": len(part), "positive_fraction": float(part.label.mean())}
    positions = test_windows(rows[rows.split == "test"], windows or {"golden": tables["ratings"]})
    write_json(out / WINDOWS, positions)
    manifest["windows"] = {name: len(found_rows) for name, found_rows in positions.items()}
    save_npy(out / "users.npy", user_codes)
    save_npy(out / "items.npy", item_codes)
    save_npy(out / "items_genres.npy", item_genres)
    for name, frame in (("interactions", rows), ("users", users), ("items", items)):
        write_csv(out / f"{name}.csv", frame)
    write_json(out / VOCABULARY, vocabulary(users, items, cfg))   # shipped with every registered model
    write_json(out / "features.json", manifest)
    return manifest


def main() -> None:
    args, cfg = stage_args(__doc__, "--raw", "--out")
    from tasks.recsys.intake import INTAKE
    from tasks.snapshot import stage_batches
    from tasks.tracking import stage_run

    with stage_run("prepare_recsys", cfg, params={"data.recsys": cfg.data.recsys}) as run:
        source, batches = stage_batches(args.raw, INTAKE)
        found = INTAKE.combine([t for _, t in batches])
        # golden: the first batch's ratings, always; recent: the newest batch's, once one arrived after it
        windows = {"golden": batches[0][1]["ratings"], **({"recent": batches[-1][1]["ratings"]}
                                                          if len(batches) > 1 else {})}
        manifest = prepare_recsys(cfg.data.recsys, args.out, (source, found), windows)
        run.log_metrics({f"{s}_rows": v["rows"] for s, v in manifest["splits"].items()}
                        | {f"{w}_test_rows": n for w, n in manifest["windows"].items()}
                        | {"vocabulary": manifest["vocabulary"]})
        run.set_tag("data.source", manifest["source"])
        run.log_artifact(args.out / "features.json")
    print(json.dumps({s: v["rows"] for s, v in manifest["splits"].items()}), f"from {manifest['source']}")


if __name__ == "__main__":
    run_cli(main)
