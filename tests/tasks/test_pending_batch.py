"""The record of a batch joining a snapshot, settled by the next snapshot stage when its ingestion was killed: never
while that ingestion lives, never removing a batch held before, and by what the version dvc.lock records holds."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.pending_batch import joining, pending_path, settle


def _snapshot(root: Path, batches: list[str]) -> tuple[Path, Path]:
    snapshot = root / "data" / "raw"
    for batch in batches:
        (snapshot / batch).mkdir(parents=True)
        (snapshot / batch / "rows.csv").write_text("a\n1\n")
    manifest = snapshot / "snapshot.json"
    manifest.write_text(json.dumps({"batches": [{"id": b} for b in batches]}))
    return snapshot, manifest


def _joined(snapshot: Path, manifest: Path, batch: str) -> None:
    """``batch`` copied in and listed, as ``add_batch`` leaves it."""
    (snapshot / batch).mkdir()
    (snapshot / batch / "rows.csv").write_text("a\n2\n")
    listed = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({"batches": [*listed["batches"], {"id": batch}]}))


@pytest.mark.fault("data", "a `dvc repro` (the snapshot stage) run while an ingestion versions its batch, or an "
                   "ingestion interrupted while it takes its batch out again",
                   "the live ingestion's batch is left to it (its record is locked while it lives); an interrupted "
                   "clean-up keeps its record, settled by the next snapshot stage; a batch held before is never "
                   "removed")
def test_a_record_is_settled_only_once_its_ingestion_is_gone(tmp_path):
    """Before: the record was unlocked, so a snapshot stage beside a live ingestion took its batch out (the ingestion
    then versioned a snapshot without it and said accepted); and it was deleted even when taking the batch out had
    been interrupted."""
    snapshot, manifest = _snapshot(tmp_path, ["0000-bootstrap"])
    before = manifest.read_text()
    with joining(tmp_path, snapshot, manifest, "0001-week") as (recorded, _done):
        assert recorded is None   # no dvc.lock yet
        _joined(snapshot, manifest, "0001-week")
        assert settle(tmp_path, snapshot, manifest) is None   # its ingestion lives: not its to settle
        assert (snapshot / "0001-week").is_dir() and manifest.read_text() != before
    # the ingestion gone without done() (killed, or interrupted in its own clean-up): the record stays, unlocked
    assert pending_path(snapshot).is_file()
    said = settle(tmp_path, snapshot, manifest)
    assert said.startswith("batch 0001-week was left in") and "to be ingested anew" in said
    assert manifest.read_text() == before and not (snapshot / "0001-week").exists()
    assert not pending_path(snapshot).exists() and settle(tmp_path, snapshot, manifest) is None
    # done() ends the record: nothing to settle
    with joining(tmp_path, snapshot, manifest, "0001-week") as (_, done):
        done()
    assert not pending_path(snapshot).exists()
    # a record naming a batch the snapshot held before it joined never removes that batch's folder
    with joining(tmp_path, snapshot, manifest, "0000-bootstrap"):
        pass
    settle(tmp_path, snapshot, manifest)
    assert (snapshot / "0000-bootstrap" / "rows.csv").is_file() and manifest.read_text() == before


def _lock_with(root: Path, snapshot: Path, md5: str) -> None:
    (root / "dvc.lock").write_text(json.dumps({"schema": "2.0", "stages": {"snapshot_x": {
        "cmd": "true", "outs": [{"path": snapshot.relative_to(root).as_posix(), "hash": "md5", "md5": md5}]}}}))


@pytest.mark.fault("data", "dvc.lock changed under a killed ingestion's record for another reason (a teammate's "
                   "dvc.lock pulled, a `dvc commit` by hand)",
                   "the batch stays only when the version dvc.lock records lists it (DVC's cache listing); otherwise "
                   "it leaves the snapshot again (before: any change to dvc.lock's record kept the unchecked batch)")
def test_a_batch_stays_only_when_the_recorded_version_holds_it(tmp_path):
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    snapshot, manifest = _snapshot(tmp_path, ["0000-bootstrap"])
    _lock_with(tmp_path, snapshot, "a" * 32 + ".dir")
    before = manifest.read_text()
    for listed, kept in ((["0000-bootstrap", "9999-other"], False), (["0000-bootstrap", "0001-week"], True)):
        md5 = ("b" if kept else "c") * 32 + ".dir"
        cache = tmp_path / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps([{"md5": "0" * 32, "relpath": f"{b}/rows.csv"} for b in listed]))
        with joining(tmp_path, snapshot, manifest, "0001-week"):
            _joined(snapshot, manifest, "0001-week")
            _lock_with(tmp_path, snapshot, md5)   # dvc.lock records another version than before the batch joined
        said = settle(tmp_path, snapshot, manifest)
        assert ("stays accepted" in said) is kept, said
        assert (snapshot / "0001-week").is_dir() is kept and (manifest.read_text() == before) is not kept
        if kept:   # as it was before, for the next round
            manifest.write_text(before)
        _lock_with(tmp_path, snapshot, "a" * 32 + ".dir")
        assert not pending_path(snapshot).exists()


def test_a_snapshot_another_version_replaced_is_left_as_it_is(tmp_path):
    """Before: a killed ingestion's record restored the manifest it saved over whatever the snapshot held since (a
    teammate's version checked out): their batch dropped out of training, blamed on the kill."""
    snapshot, manifest = _snapshot(tmp_path, ["0000-bootstrap"])
    with joining(tmp_path, snapshot, manifest, "0001-week"):
        _joined(snapshot, manifest, "0001-week")
    theirs = json.dumps({"batches": [{"id": "0000-bootstrap"}, {"id": "0002-theirs"}]})
    manifest.write_text(theirs)   # `git pull` + `dvc checkout`: another version of the folder
    (snapshot / "0002-theirs").mkdir()
    said = settle(tmp_path, snapshot, manifest)
    assert "lists other batches now" in said and "left as it is" in said
    assert manifest.read_text() == theirs and (snapshot / "0002-theirs").is_dir()
    assert not pending_path(snapshot).exists()


def test_a_batch_the_snapshot_refuses_leaves_no_record(tmp_path, monkeypatch):
    """add_batch refusing (a disk full, a name taken) leaves the snapshot as it was. Before: the record stayed, and
    the next snapshot stage warned of an ingestion "killed while DVC recorded it"."""
    import flows.batch_admission as admission

    snapshot, _ = _snapshot(tmp_path, ["0000-bootstrap"])

    def full(*args):
        raise OSError(28, "No space left on device")

    class Intake:   # what _admit asks of the family's intake before the copy
        @staticmethod
        def rows(batch):
            return {}

    monkeypatch.setattr(admission, "add_batch", full)
    with pytest.raises(OSError, match="No space left"):
        admission._admit(tmp_path, snapshot, "snapshot_x", Intake(), None, tmp_path / "week", {}, {}, None, 0.0)
    assert not pending_path(snapshot).exists()


def test_a_batch_whose_listing_fails_leaves_no_folder_behind(tmp_path, monkeypatch):
    """Before: add_batch moved the copied folder into the snapshot, then failed writing the manifest (a disk full):
    the folder stayed, unlisted, and the next snapshot stage versioned it with the data."""
    import tasks.snapshot as snapshots
    from tasks.config import load_config
    from tasks.recsys.intake import INTAKE
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "params.yaml")
    cfg = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={
        "recsys": cfg.ingest.recsys.model_copy(update={"bootstrap": "empty"})})})
    snapshot = tmp_path / "raw"
    snapshots.create(snapshot, "recsys", INTAKE, cfg)
    before = (snapshot / "snapshot.json").read_text()
    (tmp_path / "week").mkdir()
    (tmp_path / "week" / "ratings.csv").write_text("user_id,item_id,rating,timestamp\n1,1,5,0\n")

    def full(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshots, "write_json", full)
    with pytest.raises(OSError, match="No space left"):
        snapshots.add_batch(snapshot, "week", tmp_path / "week", {"rows": {}})
    assert not (snapshot / "week").exists() and (snapshot / "snapshot.json").read_text() == before
