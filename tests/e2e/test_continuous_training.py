"""Continuous training on MovieLens-100K as it arrived (smoke profile, a scratch copy): replayed weeks are checked,
join the DVC-versioned snapshot and retrain the family through its gate; a broken and a shifted batch are
quarantined with nothing else changed; with nothing new, nothing runs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from flows.ingest import continuous_training
from tests.e2e.scratch import dvc, locked_outs, make_repo, repo_env

pytestmark = pytest.mark.e2e
SNAPSHOT = "data/recsys/raw"


def _copy_week(source: Path, target: Path, change) -> None:
    shutil.copytree(source, target)
    ratings = pd.read_csv(target / "ratings.csv")
    change(ratings).to_csv(target / "ratings.csv", index=False)


def _ingest_runs(repo: Path) -> list:
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("model-compression")
    return client.search_runs([experiment.experiment_id], "tags.`ingest.family` = 'recsys'",
                              order_by=["attributes.start_time ASC"])


@pytest.mark.fault("data", "a replayed week with ratings of 7 and one shifted to all 1s arrive beside good weeks",
                   "both quarantined (invalid, drift) with their Data Docs; the snapshot, dvc.lock and the models "
                   "change only for the good weeks")
def test_arriving_weeks_are_versioned_trained_on_and_gated_and_bad_ones_quarantined(tmp_path, prefect_server,
                                                                                   monkeypatch):
    # the snapshot holds only what arrives; a few weeks' share of likes differs more from the whole data set's
    repo = make_repo(tmp_path / "repo", **{"ingest.recsys.bootstrap": "empty",
                                           "validate.recsys.positive_tolerance": 0.06})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    monkeypatch.delenv("PIPELINE_PARENT_RUN_ID", raising=False)
    replay = subprocess.run([sys.executable, "-m", "flows.replay", "--family", "recsys", str(tmp_path / "all")],
                            cwd=repo, env=repo_env(repo), capture_output=True, text=True, check=False)
    assert replay.returncode == 0, replay.stderr
    weeks = sorted((tmp_path / "all").iterdir())
    landing = repo / "landing"
    landing.mkdir()
    for week in weeks[:3]:
        shutil.copytree(week, landing / week.name)
    _copy_week(weeks[3], landing / "0002-z-broken", lambda r: r.assign(rating=r.rating.where(r.index > 4, 7)))
    _copy_week(weeks[3], landing / "0002-z-shifted", lambda r: r.assign(rating=1))

    first = continuous_training(str(repo), "recsys", str(landing))
    statuses = {o["batch"]: (o["status"], o["reason"]) for o in first["ingested"]}
    assert statuses == {weeks[0].name: ("accepted", ""), weeks[1].name: ("accepted", ""),
                        weeks[2].name: ("accepted", ""), "0002-z-broken": ("quarantined", "invalid"),
                        "0002-z-shifted": ("quarantined", "drift")}
    manifest = json.loads((repo / SNAPSHOT / "snapshot.json").read_text())
    assert [b["id"] for b in manifest["batches"]] == [w.name for w in weeks[:3]]
    for name in ("0002-z-broken", "0002-z-shifted"):
        kept = repo / "data/recsys/quarantine" / name
        assert (kept / "batch" / "ratings.csv").is_file() and (kept / "data_docs" / "index.html").is_file()
        assert json.loads((kept / "report.json").read_text())["status"] == "quarantined"
    pipeline = first["pipeline"]
    assert pipeline["stages"]["prepare_recsys"] == "ran" and "recsys" in pipeline["gates"]   # trained and gated
    assert pipeline["gates"]["recsys"]["version"]

    runs = _ingest_runs(repo)
    assert [r.data.tags["ingest.status"] for r in runs] == ["accepted"] * 3 + ["quarantined"] * 2
    versions = []
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    for run in runs[:3]:   # each accepted week is a new version of the snapshot, the run's dataset input
        contexts = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
                    for d in client.get_run(run.info.run_id).inputs.dataset_inputs}
        assert set(contexts) == {"batch", "snapshot"}
        versions.append(contexts["snapshot"].digest)
    assert len(set(versions)) == 3 and versions[-1] == locked_outs(repo)[SNAPSHOT]
    assert "drift.rating_linf" in runs[4].data.metrics and runs[4].data.metrics["drift.rating_linf"] > 0.9
    prepare = client.search_runs([runs[0].info.experiment_id], "tags.`pipeline.stage` = 'prepare_recsys'")[0]
    (seen,) = client.get_run(prepare.info.run_id).inputs.dataset_inputs   # the model's data is that version
    assert seen.dataset.name == SNAPSHOT and seen.dataset.digest == versions[-1]

    lock = (repo / "dvc.lock").read_text()
    again = continuous_training(str(repo), "recsys", str(landing))   # nothing new arrived
    assert {o["status"] for o in again["ingested"]} == {"skipped"} and again["pipeline"] is None
    assert (repo / "dvc.lock").read_text() == lock and len(_ingest_runs(repo)) == 5
    status = dvc(repo, "status", "--json", "--with-deps", "evaluate_recsys")
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, status.stdout

    first_version = pipeline["gates"]["recsys"]["version"]   # champion, whatever the smoke gate said of it
    promoted = subprocess.run([sys.executable, "-m", "flows.promotion", "--family", "recsys", "--version", first_version,
                               "--reason", "champion of the first three weeks"], cwd=repo, env=repo_env(repo),
                              capture_output=True, text=True, check=False)
    assert promoted.returncode == 0, promoted.stderr
    shutil.copytree(weeks[3], landing / weeks[3].name)    # a new week: a new version, retrained and gated again
    third = continuous_training(str(repo), "recsys", str(landing))
    assert [o["batch"] for o in third["ingested"] if o["status"] == "accepted"] == [weeks[3].name]
    assert third["pipeline"]["stages"]["prepare_recsys"] == "ran" and third["pipeline"]["gates"]["recsys"]["version"]
    assert locked_outs(repo)[SNAPSHOT] != versions[-1]
    # the week's new users and items moved every embedding index: the champion of the earlier snapshot was scored in
    # its own vocabulary, beside the candidate on the same rows (before: onnxruntime's Gather out of bounds)
    before = json.loads((repo / "reports/recsys/gate.json").read_text())["champion_before"]
    assert before and before["version"] == first_version and "test_auc" in before["candidate"]
