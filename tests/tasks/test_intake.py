"""The recommender's intake on the real MovieLens-100K: its weeks as they arrived pass the contract and the drift
limits, a broken or a shifted batch is named for what it is, and the snapshot stores what was accepted, intact."""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.batch_admission import check
from tasks.errors import DataFormatError, DataSourceError
from tasks.expectations import ephemeral_context, run_suites
from tasks.recsys.intake import INTAKE
from tasks.recsys.prepare import prepare_recsys
from tasks.snapshot import BOOTSTRAP, add_batch, create, ensure, tables, verify


@pytest.fixture(scope="module")
def replayed(tmp_path_factory, raw_params):
    from tasks.config import parse_config

    cfg = parse_config(raw_params)
    landing = tmp_path_factory.mktemp("landing")
    return cfg, INTAKE.replay(cfg, landing)


def _accepted(batches: list[Path]):
    return INTAKE.combine([INTAKE.read_batch(b) for b in batches])


def _failed(report: dict) -> set[tuple[str, str]]:
    return {(c["expectation"], c["kwargs"].get("column", "")) for part in ("contract", "drift", "aggregate")
            if report.get(part) for c in report[part]["checks"] if not c["success"]}


def test_the_replay_cuts_movielens_by_time_into_an_initial_window_and_weekly_batches(replayed):
    cfg, batches = replayed
    ratings = [INTAKE.read_batch(b)["ratings"] for b in batches]
    assert batches[0].name == "0000-initial" and len(batches) >= 5
    assert sum(map(len, ratings)) == 100_000
    assert abs(len(ratings[0]) - 50_000) < 100
    for before, after in itertools.pairwise(ratings):   # time-ordered, no overlap
        assert before.timestamp.max() <= after.timestamp.min()
    assert all(len(r) >= cfg.ingest.recsys.replay.min_rows for r in ratings)
    users = pd.concat([INTAKE.read_batch(b)["users"] for b in batches])
    assert users.user_id.is_unique and len(users) == 943   # each user arrives with its first rating


@pytest.mark.slow   # every real week through its contract and drift checks: ~40 s
def test_every_real_week_passes_its_contract_and_the_drift_limits(replayed):
    cfg, batches = replayed
    for n in range(1, len(batches)):   # the checks only (their Data Docs are rendered in the other tests)
        reason, report = check(INTAKE, cfg, INTAKE.read_batch(batches[n]), _accepted(batches[:n]), None)
        assert reason == "", (batches[n].name, _failed(report))
        assert set(report["drift"]["distances"]) >= {"rating_linf", "click_rate_delta", "unseen_item_share"}


def _week(replayed, tmp_path: Path, edit) -> Path:
    _, batches = replayed
    folder = tmp_path / "batch"
    shutil.copytree(batches[1], folder)
    edit(folder)
    return folder


def _edit_csv(folder: Path, name: str, change) -> None:
    """Rewrite ``folder/name`` as ``change`` returns its frame (read as text, as a producer would write it)."""
    frame = pd.read_csv(folder / name, dtype=str, keep_default_na=False)
    change(frame).to_csv(folder / name, index=False)


@pytest.mark.fault("data", "an arriving batch with a rating of 7 and a rating by a user nobody knows",
                   "quarantined as invalid: the contract names the rating range and the unknown user")
def test_a_broken_batch_is_invalid_and_names_what_is_broken(replayed, tmp_path):
    cfg, batches = replayed

    def edit(frame):
        frame.loc[:4, "rating"] = "7"
        frame.loc[5, "user_id"] = "99999"
        return frame

    folder = _week(replayed, tmp_path, lambda f: _edit_csv(f, "ratings.csv", edit))
    reason, report = check(INTAKE, cfg, INTAKE.read_batch(folder), _accepted(batches[:1]), tmp_path / "docs")
    assert reason == "invalid"
    assert _failed(report) == {("expect_column_values_to_be_between", "rating"),
                               ("expect_column_values_to_be_in_set", "user_id")}
    assert report["drift"] is None   # an invalid batch is not measured for drift
    assert (tmp_path / "docs" / "index.html").is_file()


@pytest.mark.slow
@pytest.mark.fault("data", "an arriving batch that is valid but shifted (every rating a 1)",
                   "quarantined as drift, not as invalid: the rating histogram's and click rate's distances named")
def test_a_valid_but_shifted_batch_is_drift_not_corruption(replayed, tmp_path):
    cfg, batches = replayed
    folder = _week(replayed, tmp_path, lambda f: _edit_csv(f, "ratings.csv", lambda r: r.assign(rating="1")))
    reason, report = check(INTAKE, cfg, INTAKE.read_batch(folder), _accepted(batches[:1]), tmp_path / "docs")
    assert reason == "drift"
    assert report["contract"]["success"]
    assert {c for _, c in _failed(report)} == {"rating_linf", "click_rate_delta"}
    assert report["drift"]["distances"]["rating_linf"] > 0.9
    assert report["profile"]["ratings"] == len(INTAKE.read_batch(batches[0])["ratings"])


def _flipped(tables: dict, rng: np.random.Generator) -> dict:
    """``tables`` with 70 % of its 5-star ratings sent as 1s: valid, and shifted less than the drift limits."""
    ratings = tables["ratings"].copy()
    five = np.flatnonzero(ratings.rating.to_numpy() == 5)
    ratings.loc[rng.choice(five, size=int(len(five) * 0.7), replace=False), "rating"] = 1
    return {**tables, "ratings": ratings}


@pytest.mark.slow
@pytest.mark.fault("data", "real weeks each within the drift limits that together shift the label balance (70 % of "
                   "each week's 5-star ratings sent as 1s, weeks 1-4)",
                   "the week that would take a split's positive fraction out of validate.recsys's bounds is "
                   "quarantined as aggregate, naming the split's label mean, with Data Docs; the snapshot of the weeks "
                   "before it passes validate_recsys (before: every week was accepted and validate_recsys failed on "
                   "the snapshot for ever)")
def test_weeks_within_the_drift_limits_may_not_together_break_the_label_balance(replayed, tmp_path):
    from tasks.recsys.validate import load_tables, validate_recsys

    cfg, batches = replayed
    rng = np.random.default_rng(0)
    accepted, reasons = [INTAKE.read_batch(batches[0])], []
    for folder in batches[1:5]:
        batch, docs = _flipped(INTAKE.read_batch(folder), rng), tmp_path / "docs" / folder.name
        reason, report = check(INTAKE, cfg, batch, INTAKE.combine(accepted), docs)
        reasons.append(reason)
        if reason:
            break
        accepted.append(batch)
    *passed, refused = reasons
    assert passed and set(passed) == {""} and refused == "aggregate", reasons
    assert report["contract"]["success"] and report["drift"]["success"]   # the week alone is valid and within limits
    assert {(c["suite"], c["expectation"], c["kwargs"].get("column")) for c in report["aggregate"]["checks"]
            if not c["success"]} == {("ingest_aggregate_test", "expect_column_mean_to_be_between", "label")}
    assert (docs / "index.html").is_file()
    prepare_recsys(cfg.data.recsys, tmp_path / "processed", ("replay", INTAKE.combine(accepted)))
    assert validate_recsys(load_tables(tmp_path / "processed"), cfg)["success"]
    # a snapshot outside the limits already (accepted before this check): a week that did not carry it there is not
    # refused for it (every week would be, one bringing it back too, and each later week with the users it brought)
    outside, week = INTAKE.combine([*accepted, batch]), INTAKE.read_batch(batches[5])
    reason, report = check(INTAKE, cfg, {**week, "ratings": week["ratings"].head(500)}, outside, None)
    assert reason == "" and report["aggregate"]["outside_before"] == [
        "ingest_aggregate_test expect_column_mean_to_be_between label"]
    # ... but one that also breaks a limit the accepted data meets is refused (the whole real week takes the
    # training split's balance out too)
    reason, report = check(INTAKE, cfg, week, outside, None)
    assert reason == "aggregate" and "outside_before" not in report["aggregate"]
    # a temporal split's validation and test rows are the newest: their balance is the last weeks', which the next
    # week moves again; it is not held against a batch (validate_recsys judges the snapshot)
    data = cfg.data.recsys.model_copy(update={"split": cfg.data.recsys.split.model_copy(update={"method": "temporal"})})
    temporal = cfg.model_copy(update={"data": cfg.data.model_copy(update={"recsys": data})})
    assert check(INTAKE, temporal, batch, INTAKE.combine(accepted), None)[0] == ""
    assert not INTAKE.aggregate(outside, temporal)


@pytest.mark.fault("data", "an arriving batch re-sending accepted ratings, or a known user with another age",
                   "quarantined as invalid: the repeated ratings and the changed user named")
def test_a_batch_may_not_repeat_accepted_ratings_or_change_a_known_user(replayed, tmp_path):
    cfg, batches = replayed
    first = INTAKE.read_batch(batches[0])

    def edit(folder: Path) -> None:
        old = first["ratings"].head(3)
        ratings = pd.read_csv(folder / "ratings.csv")
        pd.concat([ratings, old]).to_csv(folder / "ratings.csv", index=False)
        user = first["users"].head(1).assign(age=99)
        users = pd.read_csv(folder / "users.csv", dtype=str, keep_default_na=False)
        pd.concat([users, user.astype(str)]).to_csv(folder / "users.csv", index=False)

    folder = _week(replayed, tmp_path, edit)
    reason, report = check(INTAKE, cfg, INTAKE.read_batch(folder), _accepted(batches[:1]), tmp_path / "docs")
    assert reason == "invalid"
    assert {c for _, c in _failed(report)} == {"accepted_before", "changes_accepted"}


@pytest.mark.slow
@pytest.mark.fault("data", "an arriving batch re-sending accepted ratings a day later (timestamps shifted), or "
                   "rating a pair twice within itself",
                   "quarantined as invalid: a user rates an item once (before: duplicates were keyed on the "
                   "timestamp too, so the twins were accepted and hashed into other splits than their originals)")
def test_a_batch_may_not_rate_an_accepted_pair_again_at_another_time(replayed, tmp_path):
    cfg, batches = replayed
    first = INTAKE.read_batch(batches[0])

    def resend(folder: Path) -> None:
        ratings = pd.read_csv(folder / "ratings.csv")
        pd.concat([ratings, first["ratings"].head(3).assign(timestamp=lambda r: r.timestamp + 86_400)]) \
            .to_csv(folder / "ratings.csv", index=False)

    folder = _week(replayed, tmp_path, resend)
    reason, report = check(INTAKE, cfg, INTAKE.read_batch(folder), _accepted(batches[:1]), tmp_path / "docs")
    assert reason == "invalid" and {c for _, c in _failed(report)} == {"accepted_before"}

    def twice(folder: Path) -> None:
        ratings = pd.read_csv(folder / "ratings.csv")
        pd.concat([ratings, ratings.head(2).assign(timestamp=lambda r: r.timestamp + 60)]) \
            .to_csv(folder / "ratings.csv", index=False)

    folder = _week(replayed, tmp_path / "twice", twice)
    reason, report = check(INTAKE, cfg, INTAKE.read_batch(folder), _accepted(batches[:1]), tmp_path / "docs2")
    assert reason == "invalid" and _failed(report) == {("expect_compound_columns_to_be_unique", "")}


@pytest.mark.fault("data", "an arriving batch whose ratings.csv has no timestamp column",
                   "refused as unreadable, naming the file and the columns it has")
def test_a_batch_without_a_column_is_unreadable_and_named(replayed, tmp_path):
    folder = _week(replayed, tmp_path, lambda f: _edit_csv(f, "ratings.csv", lambda r: r.drop(columns="timestamp")))
    with pytest.raises(DataFormatError, match=r"ratings\.csv: columns \['user_id', 'item_id', 'rating'\]"):
        INTAKE.read_batch(folder)


@pytest.mark.slow
def test_the_published_snapshot_prepares_exactly_what_the_published_files_did(config, tmp_path):
    """The snapshot is the published data set, stored: training on it changes no number."""
    snapshot = tmp_path / "raw"
    manifest = ensure(snapshot, "recsys", INTAKE, config)
    assert [b["id"] for b in manifest["batches"]] == [BOOTSTRAP]
    assert manifest["batches"][0]["rows"] == {"ratings": 100_000, "users": 943, "items": 1682}
    _ids, found = tables(snapshot, INTAKE)
    prepare_recsys(config.data.recsys, tmp_path / "from_snapshot", ("snapshot", found))
    prepare_recsys(config.data.recsys, tmp_path / "from_source")
    for path in sorted((tmp_path / "from_source").glob("*")):
        if path.suffix == ".npy":
            assert np.array_equal(np.load(path), np.load(tmp_path / "from_snapshot" / path.name)), path.name
        elif path.suffix == ".csv":
            assert path.read_bytes() == (tmp_path / "from_snapshot" / path.name).read_bytes(), path.name


@pytest.mark.fault("data", "a file of an accepted batch edited in place in the snapshot",
                   "the snapshot stage stops naming the batch folder and the file")
def test_an_accepted_batch_edited_in_place_is_named(replayed, tmp_path):
    cfg, batches = replayed
    snapshot = tmp_path / "raw"
    create(snapshot, "recsys", INTAKE, cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={
        "recsys": cfg.ingest.recsys.model_copy(update={"bootstrap": "empty"})})}))
    with pytest.raises(DataFormatError, match="holds no batch yet"):
        tables(snapshot, INTAKE)
    add_batch(snapshot, batches[0].name, batches[0], {"rows": {}})
    add_batch(snapshot, batches[1].name, batches[1], {"rows": {}})
    assert [b["id"] for b in verify(snapshot)["batches"]] == [batches[0].name, batches[1].name]
    with pytest.raises(DataFormatError, match="already holds a batch"):
        add_batch(snapshot, batches[1].name, batches[1], {"rows": {}})
    with (snapshot / batches[1].name / "ratings.csv").open("a") as fh:
        fh.write("1,1,5,1\n")
    with pytest.raises(DataFormatError, match=rf"{batches[1].name}: ratings\.csv differ from what was accepted"):
        verify(snapshot)


@pytest.mark.fault("data", "a batch folder named like the bootstrap, hidden, '.' or the manifest",
                   "refused before anything is copied, naming the folder (before: the snapshot stage later deleted "
                   "it, or the snapshot folder itself was deleted)")
def test_a_batch_named_like_what_the_snapshot_keeps_for_itself_is_refused(replayed, tmp_path):
    cfg, batches = replayed
    snapshot = tmp_path / "raw"
    empty = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={
        "recsys": cfg.ingest.recsys.model_copy(update={"bootstrap": "empty"})})})
    create(snapshot, "recsys", INTAKE, empty)
    for name in (BOOTSTRAP, ".week-12", "", ".", "snapshot.json"):
        with pytest.raises(DataFormatError, match="cannot name a batch"):
            add_batch(snapshot, name, batches[0], {"rows": {}})
    assert verify(snapshot)["batches"] == [] and sorted(p.name for p in snapshot.iterdir()) == ["snapshot.json"]
    add_batch(snapshot, batches[0].name, batches[0], {"rows": {}})
    assert [b["id"] for b in ensure(snapshot, "recsys", INTAKE, empty)["batches"]] == [batches[0].name]


def test_a_missing_snapshot_that_dvc_lock_records_with_more_files_is_not_made_anew(config, tmp_path):
    """The stage's own refusal (the e2e test runs it under DVC): an empty bootstrap is refused before anything is
    made; a published one once it is built, if it holds fewer files than the version dvc.lock records."""
    snapshot = tmp_path / "raw"
    empty = config.model_copy(update={"ingest": config.ingest.model_copy(update={
        "recsys": config.ingest.recsys.model_copy(update={"bootstrap": "empty"})})})
    with pytest.raises(DataFormatError, match=r"raw: missing, and dvc\.lock records a version of it of 3 files \(a "
                                              r"new one would hold 1: .*`dvc pull .*raw`"):
        create(snapshot, "recsys", INTAKE, empty, {"nfiles": 3})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataFormatError, match=r"of 9 files \(a new one would hold 4: "):
        create(snapshot, "recsys", INTAKE, config, {"nfiles": 9})
    assert list(tmp_path.iterdir()) == []   # its scratch copy gone too
    assert [b["id"] for b in create(snapshot, "recsys", INTAKE, config, {"nfiles": 4})["batches"]] == [BOOTSTRAP]

    class Offline:   # the published files cannot be fetched (no network, no cache): the version may be pulled
        settings = INTAKE.settings

        @staticmethod
        def bootstrap(cfg):
            raise DataSourceError("ml-100k: no source reachable")

    with pytest.raises(DataSourceError, match=r"no source reachable; dvc\.lock records a version of .*other: "
                                              r"`dvc pull .*other` restores it"):
        create(tmp_path / "other", "recsys", Offline, config, {"nfiles": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def _dvc_records(project: Path, folder: str) -> None:
    """``folder`` committed to ``project``'s DVC cache and recorded in its dvc.lock, as the snapshot stage's output
    (``dvc add`` caches it as ``dvc repro`` does; its entry is the one dvc.lock holds)."""
    import subprocess
    import sys

    import yaml

    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", folder], cwd=project, check=True, capture_output=True)
    out = yaml.safe_load((project / f"{folder}.dvc").read_text())["outs"][0]   # its path relative to the .dvc file
    (project / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"snapshot_vision": {
        "cmd": "python -m tasks.vision.snapshot", "outs": [{**out, "path": folder}]}}}))


@pytest.mark.slow
@pytest.mark.fault("data", "an unpinned image folder's snapshot deleted to be made anew after a split folder (val/) "
                   "left the folder: the new one holds fewer files than the version dvc.lock records",
                   "made anew (DVC's cache lists that version: the bootstrap alone); one with accepted batches is "
                   "refused naming them; where the cache lacks the listing (a clone not yet pulled) the refusal "
                   "names both causes and the fix of each")
def test_a_deleted_snapshot_of_the_bootstrap_alone_is_made_anew_even_with_fewer_files(raw_params, tmp_path):
    """Before: docs/byom.md's `rm -r data/vision/raw` after a change to an unpinned folder was refused when the folder
    lost a split folder, blaming accepted batches that did not exist ("a version of it of 8 files (a new one would
    hold 6: the batches accepted since would drop out …"): dvc.lock's file count was all the check knew."""
    import subprocess
    import sys

    from tasks.images.batches import write_batch
    from tasks.snapshot import recorded_version
    from tasks.vision.intake import INTAKE as IMAGES
    from tests.tasks.test_image_folder import folder_config, image_folder

    root, project = tmp_path / "photos", tmp_path / "project"
    for split, n, seed in (("train", 12, 0), ("val", 3, 1), ("test", 3, 2)):
        image_folder(root / split, per_class=n, mode="L", seed=seed)
    cfg = folder_config(raw_params, root)
    project.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=project, check=True)
    snapshot = project / "data/vision/raw"
    ensure(snapshot, "vision", IMAGES, cfg)
    _dvc_records(project, "data/vision/raw")
    bootstrap_only, lock = recorded_version(project, snapshot), (project / "dvc.lock").read_text()
    assert (bootstrap_only["nfiles"], bootstrap_only["batches"]) == (8, [BOOTSTRAP])
    x, y = IMAGES.read_batch(snapshot / BOOTSTRAP)["train"]
    write_batch({"train": (x[:6], y[:6])}, tmp_path / "0001-more")
    add_batch(snapshot, "0001-more", tmp_path / "0001-more", {"rows": {"train": 6}})
    _dvc_records(project, "data/vision/raw")
    with_batch = recorded_version(project, snapshot)
    assert with_batch["batches"] == [BOOTSTRAP, "0001-more"]

    shutil.rmtree(snapshot)
    shutil.rmtree(root / "val")   # the folder now gives train/ and test/: 6 files where dvc.lock records 8
    with pytest.raises(DataFormatError, match=r"raw: missing, and dvc\.lock records a version of it of 10 files \(a "
                                              r"new one would hold 6: the batches accepted since \(0001-more\) would "
                                              r"drop out of the data\); restore it with `dvc pull .*raw`"):
        create(snapshot, "vision", IMAGES, cfg, with_batch)
    assert not snapshot.exists()
    made = create(snapshot, "vision", IMAGES, cfg, bootstrap_only)
    assert [b["id"] for b in made["batches"]] == [BOOTSTRAP] and made["batches"][0]["rows"] == {"train": 36, "test": 9}

    # a clone not yet pulled: DVC's cache does not list the version dvc.lock records, its file count is all there is
    shutil.rmtree(snapshot)
    shutil.rmtree(project / ".dvc" / "cache")
    (project / "dvc.lock").write_text(lock)
    unlisted = recorded_version(project, snapshot)
    assert unlisted == {**bootstrap_only, "batches": None}
    with pytest.raises(DataFormatError, match=r"of 8 files \(a new one would hold 6: the batches accepted since would "
                                              r"drop out of the data; or, if it held the bootstrap alone, its source "
                                              r"now gives fewer files\); restore it with `dvc pull .*raw` .*, or, if "
                                              r"it held the bootstrap alone, delete its stage's entry from dvc\.lock"):
        create(snapshot, "vision", IMAGES, cfg, unlisted)
    assert not snapshot.exists()


def test_the_ingest_flow_refuses_an_unfit_batch_name_before_reading_anything(tmp_path):
    """``python -m flows.ingest --batch …/0000-bootstrap`` stops at once, naming the folder: no snapshot stage, no
    check, no MLflow run, nothing copied (before: refused only when the checked batch was added, which aborted the
    rest of a landing folder mid-way)."""
    from flows.ingest import ingest
    from tasks.errors import PipelineError
    from tests.conftest import ROOT

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    folder = tmp_path / "landing" / BOOTSTRAP
    folder.mkdir(parents=True)
    with pytest.raises(PipelineError, match=rf"{folder}: '{BOOTSTRAP}' cannot name a batch"):
        ingest.fn(str(tmp_path), "recsys", [str(folder)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["landing", "params.yaml"]


@pytest.mark.fault("data", "params pin other published files than the ones the snapshot was bootstrapped from",
                   "a snapshot of the bootstrap alone is remade from the files pinned now; one holding accepted "
                   "batches stops the snapshot stage: move it away to bootstrap it anew")
def test_a_snapshot_bootstrapped_from_other_files_is_remade_or_refused(replayed, config, tmp_path):
    snapshot = tmp_path / "raw"
    ensure(snapshot, "recsys", INTAKE, config)
    manifest = json.loads((snapshot / "snapshot.json").read_text())
    manifest["batches"][0]["pins"]["ml-100k.inter"] = "0" * 64
    (snapshot / "snapshot.json").write_text(json.dumps(manifest))
    remade = ensure(snapshot, "recsys", INTAKE, config)
    assert remade["batches"][0]["pins"] == dict(config.data.recsys.sha256) and verify(snapshot) == remade
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]   # nothing of the old one left beside it
    _, batches = replayed
    extra = batches[1].parent / "extra"
    shutil.copytree(batches[1], extra)
    add_batch(snapshot, "0001-extra", extra, {"rows": {}})
    manifest = json.loads((snapshot / "snapshot.json").read_text())
    manifest["batches"][0]["pins"]["ml-100k.inter"] = "0" * 64
    (snapshot / "snapshot.json").write_text(json.dumps(manifest))
    with pytest.raises(DataFormatError, match=r"from other published files.*data\.recsys\.sha256.*holds accepted"):
        ensure(snapshot, "recsys", INTAKE, config)


@pytest.mark.fault("data", "a snapshot bootstrapped from the published data set while params now say `bootstrap: "
                   "empty` (a user about to replay MovieLens into it)",
                   "the snapshot stage stops naming both settings (before: every replayed week was quarantined as "
                   "a repeat of the bootstrap)")
def test_a_snapshot_made_with_another_bootstrap_setting_is_named(config, tmp_path):
    snapshot = tmp_path / "raw"
    ensure(snapshot, "recsys", INTAKE, config)
    (snapshot / ".0001-week.abc").mkdir()   # a batch's scratch copy, left by a kill
    ensure(snapshot, "recsys", INTAKE, config)
    assert not (snapshot / ".0001-week.abc").exists()
    empty = config.model_copy(update={"ingest": config.ingest.model_copy(update={
        "recsys": config.ingest.recsys.model_copy(update={"bootstrap": "empty"})})})
    with pytest.raises(DataFormatError, match="created with ingest.recsys.bootstrap published, params.yaml says empty"):
        ensure(snapshot, "recsys", INTAKE, empty)


def test_failure_messages_shorten_long_value_sets():
    import great_expectations as gx

    from tasks.expectations import failure_message, suite

    context = ephemeral_context()
    frame = pd.DataFrame({"user_id": [1, 2, 999]})
    report = run_suites(context, "t", [(suite("s", [gx.expectations.ExpectColumnValuesToBeInSet(
        column="user_id", value_set=list(range(100)))]), frame)])
    message = failure_message(report)
    assert "(100 values)" in message and "99," not in message and "[999]" in message


def test_the_test_split_has_a_golden_window_that_never_changes_and_a_recent_one_of_the_newest_batch(replayed,
                                                                                                     tmp_path):
    import json as json_

    from tasks.io import WINDOWS
    from tasks.recsys.evaluate import window_quality

    cfg, batches = replayed
    found = [INTAKE.read_batch(b) for b in batches[:3]]
    keys = ["user_id", "item_id", "timestamp"]
    golden = []
    for n in (2, 3):
        out = tmp_path / str(n)
        manifest = prepare_recsys(cfg.data.recsys, out, ("replay", INTAKE.combine(found[:n])),
                                  {"golden": found[0]["ratings"], "recent": found[n - 1]["ratings"]})
        windows = json_.loads((out / WINDOWS).read_text())
        rows = pd.read_csv(out / "interactions.csv")
        test = rows[rows.split == "test"].reset_index(drop=True)
        for name, batch in (("golden", found[0]), ("recent", found[n - 1])):
            chosen = test.iloc[windows[name]][keys]
            inside = chosen.merge(batch["ratings"][keys], on=keys, how="left", indicator=True)["_merge"]
            assert len(chosen) and (inside == "both").all()   # each window's rows come from its batch ...
            others = test.drop(index=windows[name])[keys].merge(batch["ratings"][keys], on=keys, how="inner")
            assert others.empty                                # ... and every test row of that batch is in it
        assert manifest["windows"] == {"golden": len(windows["golden"]), "recent": len(windows["recent"])}
        golden.append(set(map(tuple, test.iloc[windows["golden"]][keys].to_numpy().tolist())))
    assert golden[0] == golden[1]   # the same ratings as the snapshot grows
    y = np.load(tmp_path / "3" / "test_y.npy")
    quality = window_quality(y, np.where(y > 0, 0.9, 0.1), tmp_path / "3")
    assert quality["golden_auc"] == 1.0 and quality["recent_auc"] == 1.0
    assert quality["recent_rows"] == len(json_.loads((tmp_path / "3" / WINDOWS).read_text())["recent"])
