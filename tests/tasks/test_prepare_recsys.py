"""MovieLens sources, checksums, the CTR protocol and the splits, on a small synthetic copy in both formats."""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.errors import ChecksumError, DataFormatError, DataSourceError
from tasks.expectations import failure_message
from tasks.recsys.movielens import acquire
from tasks.recsys.prepare import FIELDS, prepare_recsys
from tasks.recsys.validate import load_tables, validate_recsys


def test_recbole_files_and_the_grouplens_zip_give_the_same_tables(synthetic_movielens):
    recbole, grouplens, cfg = synthetic_movielens
    source, from_recbole = acquire(cfg.data.recsys)
    assert str(recbole) in source
    _, from_zip = acquire(cfg.data.recsys.model_copy(update={"source_dir": str(grouplens)}))
    for name in ("ratings", "users", "items"):
        pd.testing.assert_frame_equal(from_recbole[name], from_zip[name])
    assert list(from_recbole["ratings"].columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert from_recbole["items"].genres.str.contains("|", regex=False).any()


def test_a_file_that_does_not_match_its_pin_is_refused(synthetic_movielens):
    recbole, _, cfg = synthetic_movielens
    with open(recbole / "ml-100k.inter", "a") as fh:
        fh.write("1\t1\t5\t1\n")
    with pytest.raises(ChecksumError, match=r"ml-100k\.inter has SHA-256 .*\(data\.recsys\.sha256"):
        acquire(cfg.data.recsys)


def test_no_source_names_every_place_it_tried(synthetic_movielens, tmp_path):
    _, _, cfg = synthetic_movielens
    with pytest.raises(DataSourceError, match=r"(?s)source_dir .*PyPI wheel recbole==0\.0\.0.*GroupLens"):
        acquire(cfg.data.recsys.model_copy(update={"source_dir": str(tmp_path / "empty")}))


def test_protocol_drops_rating_three_and_labels_the_rest(synthetic_movielens, tmp_path):
    _, _, cfg = synthetic_movielens
    manifest = prepare_recsys(cfg.data.recsys, tmp_path / "out")
    rows = pd.read_csv(tmp_path / "out" / "interactions.csv")
    assert 3 not in set(rows.rating) and set(rows.rating) == {1, 2, 4, 5}
    assert (rows.label == (rows.rating >= 4)).all()
    sizes = {s: v["rows"] for s, v in manifest["splits"].items()}
    assert sum(sizes.values()) == len(rows) and abs(sizes["test"] - round(0.1 * len(rows))) <= 1
    fields = np.load(tmp_path / "out" / "train_fields.npy")
    assert fields.shape == (sizes["train"], len(FIELDS)) and fields.dtype == np.int64
    for i, field in enumerate(manifest["fields"]):  # every column inside its own field's rows
        assert field["offset"] <= fields[:, i].min() and fields[:, i].max() < field["offset"] + field["size"]
    assert np.load(tmp_path / "out" / "train_genres.npy").shape[1] == 19
    assert json.loads((tmp_path / "out" / "features.json").read_text())["vocabulary"] == sum(
        f["size"] for f in manifest["fields"])


def test_splits_are_seeded_and_the_temporal_split_puts_the_newest_last(synthetic_movielens, tmp_path):
    _, _, cfg = synthetic_movielens
    prepare_recsys(cfg.data.recsys, tmp_path / "a")
    prepare_recsys(cfg.data.recsys, tmp_path / "b")
    assert (tmp_path / "a" / "interactions.csv").read_bytes() == (tmp_path / "b" / "interactions.csv").read_bytes()
    temporal = cfg.data.recsys.model_copy(update={"split": cfg.data.recsys.split.model_copy(update={"method": "temporal"})})
    prepare_recsys(temporal, tmp_path / "t")
    rows = pd.read_csv(tmp_path / "t" / "interactions.csv")
    newest = rows.groupby("split").timestamp.agg(["min", "max"])
    assert newest.loc["train", "max"] <= newest.loc["val", "min"] and newest.loc["val", "max"] <= newest.loc["test", "min"]


def test_a_rating_keeps_its_split_when_the_snapshot_grows(synthetic_movielens, tmp_path):
    """Before: a seeded permutation of all rows, re-drawn whenever a batch arrived — about 80 % of the new test split
    had been the champion's training rows, and the gate scored the champion on them."""
    from tasks.recsys.movielens import acquire

    _, _, cfg = synthetic_movielens
    source, tables = acquire(cfg.data.recsys)
    ratings = tables["ratings"].sort_values("timestamp", kind="stable")
    older = {**tables, "ratings": ratings.iloc[: len(ratings) * 2 // 3]}
    prepare_recsys(cfg.data.recsys, tmp_path / "old", (source, older))
    prepare_recsys(cfg.data.recsys, tmp_path / "new", (source, tables))
    key = ["user_id", "item_id", "timestamp"]
    old, new = (pd.read_csv(tmp_path / d / "interactions.csv") for d in ("old", "new"))
    both = old.merge(new, on=key, suffixes=("_old", "_new"))
    assert len(both) == len(old) and (both.split_old == both.split_new).all()
    shares = new.split.value_counts(normalize=True)
    assert abs(shares["test"] - cfg.data.recsys.split.test) < 0.05 and abs(shares["val"] - cfg.data.recsys.split.val) < 0.05


def _edit_line(number: int, change: Callable[[list[str]], list[str]]) -> Callable[[str], str]:
    """An edit of line ``number`` (1-based, as an editor counts them, header included) of a file's text."""
    def edit(text: str) -> str:
        lines = text.splitlines()
        sep = "\t" if "\t" in lines[0] else "|"
        lines[number - 1] = sep.join(change(lines[number - 1].split(sep)))
        return "\n".join(lines) + "\n"
    return edit


def _edited_source(synthetic_movielens, file: str, edit: Callable[[str], str]):
    """``data.recsys`` reading ``file`` edited: a RecBole file, or a member of the GroupLens zip; re-pinned, as a
    user editing params.yaml would."""
    recbole, grouplens, cfg = synthetic_movielens
    if file.startswith("ml-100k."):
        folder, path = recbole, recbole / file
        path.write_text(edit(path.read_text()))
    else:
        folder, path = grouplens, grouplens / "ml-100k.zip"
        with zipfile.ZipFile(path) as zf:
            members = {name: zf.read(name).decode("latin-1") for name in zf.namelist()}
        members[f"ml-100k/{file}"] = edit(members[f"ml-100k/{file}"])
        with zipfile.ZipFile(path, "w") as zf:
            for name, text in members.items():
                zf.writestr(name, text.encode("latin-1"))
    pins = {**cfg.data.recsys.sha256, path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return folder, cfg.data.recsys.model_copy(update={"source_dir": str(folder), "sha256": pins})


REPEATED_ID = pytest.mark.fault("data", "a users or items file with an id on two rows (pinned as it is)",
                                "DataFormatError naming the file, the column and the id; no output")


@pytest.mark.parametrize("file,edit,pattern", [
    pytest.param("ml-100k.user", _edit_line(5, lambda f: ["1", *f[1:]]),
                 r"ml-100k\.user: user_id 1 on more than one row", id="repeated-user", marks=REPEATED_ID),
    pytest.param("u.item", _edit_line(4, lambda f: ["1", *f[1:]]),
                 r"u\.item: item_id 1 on more than one row", id="repeated-item", marks=REPEATED_ID),
    pytest.param("ml-100k.inter", _edit_line(6, lambda f: ["1" + "0" * 30, *f[1:]]),
                 r"ml-100k\.inter: column user_id does not hold int64 values \(.*too large", id="id-too-large",
                 marks=pytest.mark.fault("data", "a ratings row whose user id does not fit 64 bits (pinned as it is)",
                                         "DataFormatError naming the file and the column; no output")),
    pytest.param("u.data", _edit_line(6, lambda f: [*f, "9"]),
                 r"u\.data: Error tokenizing data\. C error: Expected 4 fields in line 6, saw 5$", id="extra-field",
                 marks=pytest.mark.fault("data", "a ratings row with a field too many (pinned as it is)",
                                         "one-line DataFormatError naming the file, the line and the field counts; "
                                         "no output")),
])
def test_inconsistent_movielens_files_are_named_before_anything_is_written(synthetic_movielens, tmp_path, file, edit,
                                                                          pattern):
    folder, data = _edited_source(synthetic_movielens, file, edit)
    with pytest.raises(DataFormatError, match=rf"source_dir \({re.escape(str(folder))}\): {pattern}") as err:
        prepare_recsys(data, tmp_path / "out")
    assert "\n" not in str(err.value)  # printed as one line by the stage CLI
    assert not (tmp_path / "out").exists()


def _impossible_ages(text: str) -> str:
    """Users 2 and 3 (lines 3 and 4, after the header) aged -5 and 500."""
    text = _edit_line(3, lambda f: [f[0], "-5", *f[2:]])(text)
    return _edit_line(4, lambda f: [f[0], "500", *f[2:]])(text)


@pytest.mark.fault("data", "users aged -5 and 500 (pinned as they are)",
                   "prepare encodes them in the end age groups; validation fails naming the age range check")
def test_ages_outside_the_age_groups_reach_validation(synthetic_movielens, tmp_path):
    _, _, cfg = synthetic_movielens
    _, data = _edited_source(synthetic_movielens, "ml-100k.user", _impossible_ages)
    prepare_recsys(data, tmp_path / "out")
    assert {-5, 500} <= set(pd.read_csv(tmp_path / "out" / "users.csv").age)
    report = validate_recsys(load_tables(tmp_path / "out"), cfg)
    assert not report["success"] and "expect_column_values_to_be_between(column=age" in failure_message(report)


def _ranked(synthetic_movielens, tmp_path: Path, k: int) -> tuple[tuple, list[Path]]:
    """(the arguments of ``ranking`` after the model's path, at ``k``; two small seeded models' ONNX files) on the
    synthetic MovieLens data prepared."""
    import torch

    from tasks.ctr.config import RecArch
    from tasks.ctr.ctr_onnx import export_ctr_fp32
    from tasks.ctr.ctr_training import load_ctr_data
    from tasks.ctr.models import CtrModel
    from tasks.recsys.evaluate import Catalog

    _, _, cfg = synthetic_movielens
    data = tmp_path / "out"
    prepare_recsys(cfg.data.recsys, data)
    tables = {name: pd.read_csv(data / f"{name}.csv", dtype={"zip_code": str})
              for name in ("interactions", "users", "items")}
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(export_ctr_fp32(CtrModel(RecArch(dim=4, fm=True, mlp=[8]), **load_ctr_data(data)[3]),
                                     tmp_path / f"model{seed}.onnx"))
    return (Catalog(data), tables["interactions"], tables["users"], tables["items"], k, 1), paths


def test_ranking_a_seeded_sample_of_users_is_reproducible_and_all_of_them_when_as_large(synthetic_movielens,
                                                                                     tmp_path):
    """``evaluate.recsys.ranking_users`` (the smoke profile's): NDCG and Recall over a seeded sample of the test users
    with positives, drawn from the test rows alone (so the same users for each model, which the means cannot show);
    the same sample on every call; a sample as large as all of them is all of them."""
    from tasks.recsys.evaluate import ranking

    args, paths = _ranked(synthetic_movielens, tmp_path, 5)
    every = ranking(paths[0], *args)
    assert every["ranked_users"] > 6
    assert ranking(paths[0], *args, sample=every["ranked_users"]) == every
    sampled = [ranking(path, *args, sample=6) for path in paths]
    assert [r["ranked_users"] for r in sampled] == [6, 6] and ranking(paths[0], *args, sample=6) == sampled[0]
    assert sampled[0] != every   # another mean: fewer users


def test_ranking_at_more_items_than_a_user_has_left_to_rank_ranks_them_all(synthetic_movielens, tmp_path):
    """A small catalogue (a shop's first weeks): k above the items a user has not rated. Before: the top list's hits
    were weighed by all k discounts — a broadcast error for most users, and for a user with one candidate its hit
    counted k times (NDCG@10 4.5)."""
    from tasks.recsys.evaluate import ranking

    args, (path, _) = _ranked(synthetic_movielens, tmp_path, 10)
    items = len(args[3])
    found = ranking(path, *args[:4], items + 5, 1)   # every unrated item is in each user's top list
    assert found[f"test_recall_at_{items + 5}"] == 1.0 and 0.0 < found[f"test_ndcg_at_{items + 5}"] <= 1.0


def test_a_user_field_holding_a_carriage_return_reads_back_as_it_was_written(synthetic_movielens, tmp_path):
    """A batch's users.csv may quote an occupation or zip code with a bare carriage return in it (the contract asks
    only for a non-empty string). Before: the snapshot's and the prepared tables were written unquoted, and read back
    the row split in two."""
    from tasks.recsys.intake import INTAKE

    _, _, cfg = synthetic_movielens
    source, tables = acquire(cfg.data.recsys)
    users = tables["users"].copy()
    users.loc[0, "occupation"], users.loc[1, "zip_code"] = "writer\rpoet", "12\r345"
    tables = {**tables, "users": users}
    INTAKE.write_batch(tables, tmp_path / "batch")
    pd.testing.assert_frame_equal(INTAKE.read_batch(tmp_path / "batch")["users"], users.reset_index(drop=True))
    prepare_recsys(cfg.data.recsys, tmp_path / "out", (source, tables))
    found = pd.read_csv(tmp_path / "out" / "users.csv", dtype={"zip_code": str})
    assert len(found) == len(users) and {"writer\rpoet", "12\r345"} <= set(found.occupation) | set(found.zip_code)
