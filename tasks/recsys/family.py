"""The recommender family's contract (``tasks.family``): MovieLens-100K clicks, AUC, one-request latency."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.errors import PipelineError
from tasks.family import Family
from tasks.gate import GateSpec
from tasks.io import WINDOWS, read_csv, read_windows, save_npy, write_json
from tasks.recsys.evaluate import STANDS_FOR, Catalog, request_latency, score_onnx
from tasks.recsys.prepare import VOCABULARY, assemble_fields, encode_with


def score(path: Path, data: Path, cfg: Any) -> dict[str, float]:
    return score_onnx(path, data, cfg.evaluate.recsys)


def timing(path: Path, data: Path, cfg: Any) -> dict[str, float]:
    return request_latency(path, Catalog(data), cfg.evaluate.recsys)


def input_example(data: Path) -> dict[str, np.ndarray]:
    return Catalog(data).request(0, np.arange(1))


def cold_start_rows(codes: np.ndarray, layout: list[dict], samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows a model of the vocabulary ``layout`` can score, and the row of ``codes`` each stands for: a row whose
    every field it holds (no -1) as it is; any other ``samples`` times, each unknown field drawn uniformly from the
    field's known values (seeded) — its mean probability is how the model serves a user (item) it never saw: as an
    average known one with the same other fields."""
    repeats = np.where((codes < 0).any(axis=1), samples, 1)
    stands_for = np.repeat(np.arange(len(codes)), repeats)
    rows, rng = codes[stands_for], np.random.default_rng(seed)
    for column, field in enumerate(layout):
        unknown = rows[:, column] < 0
        rows[unknown, column] = field["offset"] + rng.integers(0, field["size"], int(unknown.sum()))
    return rows, stands_for


def paired_data(champion: Path, data: Path, scratch: Path, cfg: Any) -> tuple[Path, Path] | None:
    """The test rows of ``data`` encoded in the champion's vocabulary and in the candidate's: a champion of an older
    snapshot scored on new data (new users and items shift every index). A row with a user or item (or another
    field's value) the champion never saw is scored as the mean over ``evaluate.recsys.cold_start_samples`` known
    ones (``cold_start_rows``); with 0 samples, such rows are left out for both. The recent window's rows it does
    read as they are are also window ``recent_known`` (its health is judged on them, like the rows it was registered
    with)."""
    theirs_file = champion / VOCABULARY
    if not theirs_file.is_file():   # registered before models carried their vocabulary: it reads the data as is
        return None
    theirs, ours = json.loads(theirs_file.read_text()), json.loads((data / VOCABULARY).read_text())
    if theirs == ours:
        return None
    tables = {name: read_csv(data / f"{name}.csv", dtype={"zip_code": str}) for name in ("users", "items")}
    rows = pd.read_csv(data / "interactions.csv", usecols=["user_id", "item_id", "split"])
    users, items, layout = encode_with(tables["users"], tables["items"], cfg.data.recsys, theirs)
    known_users, known_items = (users >= 0).all(axis=1), (items >= 0).all(axis=1)
    test = rows[rows.split == "test"]
    u = pd.Index(tables["users"].user_id).get_indexer(test.user_id)
    i = pd.Index(tables["items"].item_id).get_indexer(test.item_id)
    codes, samples = assemble_fields(users[u], items[i]), cfg.evaluate.recsys.cold_start_samples
    known = (codes >= 0).all(axis=1)
    keep = known if samples == 0 else np.ones(len(codes), dtype=bool)
    if not keep.any():
        raise PipelineError(f"the champion's vocabulary ({theirs_file.name}) holds none of the users and items of the "
                            f"{len(test)} test rows in {data}: nothing to compare it on (evaluate.recsys."
                            "cold_start_samples: 0)")
    genres = np.load(data / "items_genres.npy")
    mine, paired = scratch / "candidate", scratch / "champion"
    for folder in (mine, paired):
        folder.mkdir(parents=True)
    for part in ("fields", "genres", "y"):
        save_npy(mine / f"test_{part}.npy", np.load(data / f"test_{part}.npy")[keep])
    for name in ("users", "items", "items_genres"):
        save_npy(mine / f"{name}.npy", np.load(data / f"{name}.npy"))
    fields, stands_for = cold_start_rows(codes[keep], layout, samples, cfg.data.recsys.seed)
    save_npy(paired / "test_fields.npy", fields)
    save_npy(paired / "test_genres.npy", genres[i[keep]][stands_for])
    save_npy(paired / "test_y.npy", np.load(data / "test_y.npy")[keep][stands_for])
    if len(stands_for) > len(codes[keep]):
        save_npy(paired / STANDS_FOR, stands_for)
    save_npy(paired / "users.npy", users[known_users])
    save_npy(paired / "items.npy", items[known_items])
    save_npy(paired / "items_genres.npy", genres[known_items])
    if (windows := read_windows(data)):   # each window's rows among the kept ones, at their new positions
        position = np.cumsum(keep) - 1
        kept = {name: [int(position[i]) for i in rows if keep[i]] for name, rows in windows.items()}
        if "recent" in windows and not known[keep].all():   # and the recent rows it reads as they are: its health
            kept["recent_known"] = [int(position[i]) for i in windows["recent"] if known[i]]
        for folder in (mine, paired):
            write_json(folder / WINDOWS, kept)
    cold = int((keep & ~known).sum())
    print(f"champion scored in its own vocabulary (of {sum(f['size'] for f in layout)} rows) on {int(keep.sum())} of "
          f"{len(test)} test rows" + (f", {cold} of them with a user or item it never saw as the mean over {samples} "
                                      "known ones" if cold else " (those whose users and items it knows)"))
    return paired, mine


FAMILY = Family("recsys", "Recsys compression report", GateSpec("latency", "one-request"), score, timing,
                input_example, model_files=(VOCABULARY,), paired_data=paired_data)
