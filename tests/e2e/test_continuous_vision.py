"""Continuous training on Fashion-MNIST released in batches (smoke profile, a scratch copy): replayed batches of
images are checked, join the DVC-versioned snapshot and retrain the family through its gate; a broken and a shifted
batch are quarantined with nothing else changed; with nothing new, nothing runs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from flows.ingest import continuous_training
from tasks.images.idx import gzip_bytes, idx_bytes
from tasks.vision.intake import INTAKE
from tests.e2e.scratch import dataset_inputs, dvc, ingest_runs, locked_outs, replayed_repo, repo_env

pytestmark = pytest.mark.e2e
SNAPSHOT = "data/vision/raw"


def _changed_copy(source: Path, target: Path, images=None, labels=None) -> None:
    shutil.copytree(source, target)
    x, y = INTAKE.read_batch(target)["train"]
    if images is not None:
        (target / "train-images-idx3-ubyte.gz").write_bytes(gzip_bytes(idx_bytes(images(x.copy()))))
    if labels is not None:
        (target / "train-labels-idx1-ubyte.gz").write_bytes(gzip_bytes(idx_bytes(labels(y.copy()))))


@pytest.mark.fault("data", "batches of images with label 11, and inverted (white background), arrive beside good "
                   "batches",
                   "both quarantined (invalid, drift) with their Data Docs; the snapshot, dvc.lock and the models "
                   "change only for the good batches")
def test_arriving_images_are_versioned_trained_on_and_gated_and_bad_ones_quarantined(tmp_path, prefect_server,
                                                                                   monkeypatch):
    # a third of the smoke profile's training images (what is checked is versions, windows and gates, not learning)
    repo, batches, landing = replayed_repo(tmp_path, monkeypatch, "vision", **{
        "warm_start.vision.policy": "fine_tune", "profiles.smoke.data.vision.subset.train": 1000})
    shutil.copytree(batches[0], landing / batches[0].name)
    _changed_copy(batches[1], landing / "0001-z-broken", labels=lambda y: np.where(y == 3, np.uint8(11), y))
    _changed_copy(batches[1], landing / "0001-z-inverted", images=lambda x: 255 - x)

    # the initial set arrives with two bad batches: it alone joins, and the family is trained and gated on it
    first = continuous_training(str(repo), "vision", str(landing))
    assert {o["batch"]: (o["status"], o["reason"]) for o in first["ingested"]} == {
        batches[0].name: ("accepted", ""), "0001-z-broken": ("quarantined", "invalid"),
        "0001-z-inverted": ("quarantined", "drift")}
    for name in ("0001-z-broken", "0001-z-inverted"):
        kept = repo / "data/vision/quarantine" / name
        assert (kept / "batch" / "train-images-idx3-ubyte.gz").is_file() and (kept / "data_docs" / "index.html").is_file()
    assert first["pipeline"]["stages"]["prepare_vision"] == "ran" and first["pipeline"]["gates"]["vision"]["version"]
    first_version = locked_outs(repo)[SNAPSHOT]
    champion = first["pipeline"]["gates"]["vision"]["version"]
    if not first["pipeline"]["gates"]["vision"]["champion"]:   # whatever the smoke gate said: the next run starts here
        promoted = subprocess.run([sys.executable, "-m", "flows.promotion", "--family", "vision", "--version",
                                   champion, "--reason", "the first batch's model"], cwd=repo, env=repo_env(repo),
                                  capture_output=True, text=True, check=False)
        assert promoted.returncode == 0, promoted.stderr

    # three more batches: each a version of its own; the family is retrained and gated on all four
    for folder in batches[1:4]:
        shutil.copytree(folder, landing / folder.name)
    second = continuous_training(str(repo), "vision", str(landing))
    accepted = [o["batch"] for o in second["ingested"] if o["status"] == "accepted"]
    assert accepted == [b.name for b in batches[1:4]]
    assert {o["status"] for o in second["ingested"] if o["batch"] not in accepted} == {"skipped"}
    assert second["pipeline"]["stages"]["prepare_vision"] == "ran"
    gates = [first["pipeline"]["gates"]["vision"], second["pipeline"]["gates"]["vision"]]
    assert gates[1]["version"] != gates[0]["version"]   # a gate decision on the new data: a new registered version
    manifest = json.loads((repo / SNAPSHOT / "snapshot.json").read_text())
    assert [b["id"] for b in manifest["batches"]] == [b.name for b in batches[:4]]
    # each new batch held out 750 of its 5,000 images as test rows; the newest one's are the recent window, which
    # neither the champion (first batch) nor the challenger (trained on the rest) saw: both scored on it, and on the
    # golden window (the published test images), side by side; the champion's health is judged on it
    gate = json.loads((repo / "reports/vision/gate.json").read_text())
    before = gate["champion_before"]
    assert before["version"] == champion and before["recent_rows"] == gate["candidate"]["recent_rows"] == 750
    assert before["golden_rows"] == 1000 and {"golden_accuracy", "recent_accuracy"} <= set(before)
    compared = {c["name"]: c["why"] for c in gate["checks"]}
    assert "750 test rows both read" in compared["accuracy_drop_vs_champion_recent"]
    assert "1000 test rows both read" in compared["accuracy_drop_vs_champion_golden"]
    health = gate["champion_health"]   # registered on one batch: no recent window then, its test accuracy instead
    assert health["compared"] and health["baseline"] == "registered test accuracy"
    assert health["recent_accuracy"] == before["recent_accuracy"]
    # warm start: the teacher and the student were fine-tuned from the champion's, on all four batches
    plan = json.loads((repo / "models/vision/warm_start/plan.json").read_text())
    assert (plan["teacher"], plan["student"], plan["champion"], plan["versions"]) == ("fine_tune", "fine_tune",
                                                                                      champion, 4)

    runs = ingest_runs(repo, "vision")
    assert [r.data.tags["ingest.status"] for r in runs] == ["accepted", "quarantined", "quarantined"] + ["accepted"] * 3
    versions = [dataset_inputs(repo, r.info.run_id)["snapshot"].digest for r in runs if r.data.tags["ingest.status"]
                == "accepted"]
    assert versions[0] == first_version and len(set(versions)) == 4 and versions[-1] == locked_outs(repo)[SNAPSHOT]
    assert runs[2].data.metrics["drift.ink_js"] > 0.5
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    prepare = client.search_runs([runs[0].info.experiment_id], "tags.`pipeline.stage` = 'prepare_vision'",
                                 order_by=["attributes.start_time DESC"])[0]
    seen = {d.dataset.name: d.dataset.digest for d in client.get_run(prepare.info.run_id).inputs.dataset_inputs}
    assert seen[SNAPSHOT] == versions[-1]   # the models were trained on all four batches
    prepared = json.loads((repo / "data/vision/processed/manifest.json").read_text())
    assert prepared["source"].startswith(f"snapshot {SNAPSHOT} of 4 batch(es)")

    lock = (repo / "dvc.lock").read_text()
    again = continuous_training(str(repo), "vision", str(landing))   # nothing new arrived
    assert {o["status"] for o in again["ingested"]} == {"skipped"} and again["pipeline"] is None
    assert (repo / "dvc.lock").read_text() == lock and len(ingest_runs(repo, "vision")) == 6
    status = dvc(repo, "status", "--json", "--with-deps", "evaluate_vision")
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, status.stdout
