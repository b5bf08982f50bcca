"""Continuous training on MovieLens-100K as it arrived (smoke profile, a scratch copy): replayed weeks are checked,
join the DVC-versioned snapshot and retrain the family through its gate; a broken and a shifted batch are
quarantined with nothing else changed; with nothing new, nothing runs."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from flows.ingest import continuous_training
from tests.e2e.scratch import dataset_inputs, dvc, ingest_runs, locked_outs, make_repo, replayed_repo, repo_env

pytestmark = pytest.mark.e2e
SNAPSHOT, WARM_START = "data/recsys/raw", "models/recsys/warm_start/plan.json"


def _copy_week(source: Path, target: Path, change) -> None:
    shutil.copytree(source, target)
    ratings = pd.read_csv(target / "ratings.csv")
    change(ratings).to_csv(target / "ratings.csv", index=False)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def _lock_log(repo: Path) -> list[str]:
    return _git(repo, "log", "--format=%s", "--", "dvc.lock").splitlines()


def _ingest_runs(repo: Path) -> list:
    return ingest_runs(repo, "recsys")


@pytest.mark.fault("data", "a replayed week with ratings of 7 and one shifted to all 1s arrive beside good weeks",
                   "both quarantined (invalid, drift) with their Data Docs; the snapshot, dvc.lock and the models "
                   "change only for the good weeks")
def test_arriving_weeks_are_versioned_trained_on_and_gated_and_bad_ones_quarantined(tmp_path, prefect_server,
                                                                                   monkeypatch):
    # the snapshot holds only what arrives; a few weeks' share of likes differs more from the whole data set's
    # training policy: fine-tune from the champion, the teacher trained on every second data version only
    repo, weeks, landing = replayed_repo(tmp_path, monkeypatch, "recsys", **{
        "validate.recsys.positive_tolerance": 0.06, "warm_start.recsys.policy": "fine_tune",
        "warm_start.recsys.teacher_every": 2})
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
    plan = json.loads((repo / WARM_START).read_text())   # no champion yet: everything trained from scratch
    assert (plan["teacher"], plan["student"], plan["champion"], plan["versions"]) == ("scratch", "scratch", None, 3)

    runs = _ingest_runs(repo)
    assert [r.data.tags["ingest.status"] for r in runs] == ["accepted"] * 3 + ["quarantined"] * 2
    versions = []
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    for run in runs[:3]:   # each accepted week is a new version of the snapshot, the run's dataset input
        contexts = dataset_inputs(repo, run.info.run_id)
        assert set(contexts) == {"batch", "snapshot"}
        versions.append(contexts["snapshot"].digest)
    assert len(set(versions)) == 3 and versions[-1] == locked_outs(repo)[SNAPSHOT]
    assert "drift.rating_linf" in runs[4].data.metrics and runs[4].data.metrics["drift.rating_linf"] > 0.9
    prepare = client.search_runs([runs[0].info.experiment_id], "tags.`pipeline.stage` = 'prepare_recsys'")[0]
    (seen,) = client.get_run(prepare.info.run_id).inputs.dataset_inputs   # the model's data is that version
    assert seen.dataset.name == SNAPSHOT and seen.dataset.digest == versions[-1]

    # dvc.lock in git: the new data version, then what was trained on it, each a commit of the lock alone
    name, three = pipeline["gates"]["recsys"]["name"], ", ".join(w.name for w in weeks[:3])
    gated = f"{name} version {pipeline['gates']['recsys']['version']}"
    assert _lock_log(repo)[:2] == [f"recsys: trained on batches {three}, gated as {gated}",
                                   f"recsys: batches {three} accepted into the snapshot"]
    assert first["lock_commit"] and not _git(repo, "status", "--porcelain", "--", "dvc.lock")
    assert client.get_model_version(name, pipeline["gates"]["recsys"]["version"]).tags["git.dirty"] == "false"

    lock = (repo / "dvc.lock").read_text()
    again = continuous_training(str(repo), "recsys", str(landing))   # nothing new arrived
    assert {o["status"] for o in again["ingested"]} == {"skipped"} and again["pipeline"] is None
    assert (repo / "dvc.lock").read_text() == lock and len(_ingest_runs(repo)) == 5
    assert again["lock_commit"] is None and len(_lock_log(repo)) == 2
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
    # warm start: the champion's teacher (trained on version 3 of 4) serves as it is, its student is fine-tuned
    plan = json.loads((repo / WARM_START).read_text())
    assert (plan["teacher"], plan["student"], plan["champion"], plan["teacher_versions"]) == (
        "reuse", "fine_tune", first_version, 3)
    teacher = client.search_runs([runs[0].info.experiment_id], "tags.`pipeline.stage` = 'train_teacher_recsys'")
    assert len(teacher) == 2 and not client.get_metric_history(teacher[0].info.run_id, "val_auc")   # not trained
    assert third["pipeline"]["stages"]["warm_start_recsys"] == "ran"
    # with the lock in git, DVC compares the two trained data versions across commits
    diff = dvc(repo, "metrics", "diff", "--all", "--json", first["lock_commit"], third["lock_commit"])
    assert diff.returncode == 0 and "metrics/recsys/teacher.json" in json.loads(diff.stdout), diff.stdout[-2000:]
    # the week's new users and items moved every embedding index: the champion of the earlier snapshot was scored in
    # its own vocabulary, beside the candidate on the same rows (before: onnxruntime's Gather out of bounds)
    gate = json.loads((repo / "reports/recsys/gate.json").read_text())
    before = gate["champion_before"]
    assert before and before["version"] == first_version and "test_auc" in before["candidate"]
    # both are scored on the golden window (the first week's test rows) and on the recent one (the new week's, which
    # neither trained on), and the champion's health on the recent window is reported against its registered AUC
    assert {"golden_auc", "recent_auc"} <= set(before) and {"golden_auc", "recent_auc"} <= set(before["candidate"])
    assert {c["name"] for c in gate["checks"]} >= {"auc_drop_vs_champion_golden", "auc_drop_vs_champion_recent"}
    health = gate["champion_health"]   # against the recent AUC it was registered with (three weeks: the third's),
    # on the new week's test rows it reads as they are (rows of users it never saw: scored as an average known user)
    assert health["version"] == first_version and health["window"] == "recent_known"
    assert health["recent_auc"] == before["recent_known_auc"] and before["recent_rows"] > before["recent_known_rows"]
    assert health["registered_auc"] == pytest.approx(pipeline["gates"]["recsys"]["candidate"]["recent_auc"])

    # From the registered version alone, the code, params, the four-week snapshot it was trained on and the champion's
    # weights it started from come back and re-run; the re-run builds the very same INT8 file, so the registry
    # already holds it
    warm_version = third["pipeline"]["gates"]["recsys"]["version"]
    four_weeks = locked_outs(repo)[SNAPSHOT]
    promoted = subprocess.run([sys.executable, "-m", "flows.promotion", "--family", "recsys", "--version",
                               warm_version, "--reason", "the warm-started week"], cwd=repo, env=repo_env(repo),
                              capture_output=True, text=True, check=False)
    assert promoted.returncode == 0, promoted.stderr
    # (the champion is now the warm-started version: a re-run that asked the registry would start elsewhere)
    restored = tmp_path / "restored"
    again = subprocess.run([sys.executable, "-m", "flows.restore", "--family", "recsys", "--version", warm_version,
                            str(restored)], cwd=repo, env=repo_env(repo), capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    version = client.get_model_version(pipeline["gates"]["recsys"]["name"], warm_version)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=restored, capture_output=True, text=True, check=True)
    assert head.stdout.strip() == version.tags["git.commit"]
    assert locked_outs(restored)[SNAPSHOT] == four_weeks
    kept = json.loads((restored / SNAPSHOT / "snapshot.json").read_text())
    assert [b["id"] for b in kept["batches"]] == [w.name for w in weeks[:4]]
    assert json.loads((restored / WARM_START).read_text())["champion"] == first_version
    assert f"already {version.name} version {warm_version}" in again.stdout, again.stdout[-3000:]


@pytest.mark.fault("data", "an ingestion interrupted (Ctrl-C, a cancelled flow run) while DVC records an accepted "
                   "batch",
                   "the batch leaves the snapshot again and is ingested anew later (before: listed but unversioned, "
                   "skipped as accepted by every later ingestion, versioned by the next `dvc repro` with no report)")
@pytest.mark.fault("data", "an ingestion killed (SIGKILL: no clean-up runs) while DVC records an accepted batch",
                   "the next snapshot stage (the first of every pipeline run, `dvc repro` and ingestion) takes the "
                   "batch out again, saying so, and it is ingested anew (before: listed but unversioned, skipped as "
                   "accepted by every later ingestion, versioned by the next `dvc repro` with no report)")
@pytest.mark.fault("data", "an ingestion interrupted while it quarantines a bad batch (the batch copied, its report "
                   "not)",
                   "no quarantine entry is left: the next ingestion quarantines it whole, with its report (before: "
                   "the batch alone, skipped for good as quarantined, no report saying why)")
@pytest.mark.fault("data", "a batch's file written to while its checks ran (a producer not done)",
                   "deferred: neither accepted nor quarantined, the snapshot as it was, the files named in one line, "
                   "the batches after it deferred too (they join in order; one accepted before is skipped); ingested again later, it is checked "
                   "again (before: the copy kept held rows no check saw)")
@pytest.mark.fault("data", "the snapshot folder missing while dvc.lock records a version with accepted batches (a "
                   "clone not yet pulled, the folder deleted)",
                   "the snapshot stage stops naming `dvc pull`; dvc.lock keeps the version (before: a new snapshot "
                   "without the accepted batches silently became the data version trained on)")
@pytest.mark.fault("data", "DVC cannot record an accepted batch (its repository lock held by another DVC process "
                   "beyond pipeline.data_lock_timeout_seconds)",
                   "the batch leaves the snapshot again, named in one line; ingested again later, it is accepted; a "
                   "lock held a moment (another family's stage saving its outputs) is waited for")
def test_a_batch_dvc_cannot_version_leaves_the_snapshot_as_it_was(tmp_path, monkeypatch, prefect_server):
    """Before: the batch stayed in snapshot.json unversioned, and every later run skipped it as already accepted.
    And a lock held for a second made the batch fail at once, where a pipeline run waits for it."""
    import threading

    import zc.lockfile

    import flows.batch_admission as admission
    from flows.batch_admission import ingest_batch
    from flows.ingest import ingest
    from tasks.config import load_config
    from tasks.errors import PipelineError
    from tasks.recsys.intake import INTAKE

    repo = make_repo(tmp_path / "repo", **{"ingest.recsys.bootstrap": "empty", "pipeline.data_lock_timeout_seconds": 15})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    monkeypatch.delenv("PIPELINE_PARENT_RUN_ID", raising=False)
    cfg = load_config(repo / "params.yaml")
    first, second, third = INTAKE.replay(cfg, tmp_path / "all")[:3]
    assert dvc(repo, "repro", "snapshot_recsys").returncode == 0
    lock = zc.lockfile.LockFile(str(repo / ".dvc" / "tmp" / "lock"))
    try:
        with pytest.raises(PipelineError, match=f"batch {first.name} was not accepted, the snapshot is as it was"):
            ingest_batch(repo, "recsys", cfg, first, repo_env(repo))
    finally:
        lock.close()
    assert json.loads((repo / SNAPSHOT / "snapshot.json").read_text())["batches"] == []
    assert not (repo / SNAPSHOT / first.name).exists()
    # interrupted while DVC records it (Ctrl-C; a cancelled flow run's SIGTERM is raised the same way); before, the
    # batch stayed listed, unversioned, and every later ingestion skipped it as already accepted
    dvc_run = admission._dvc

    def interrupted(root, env, *args, **kwargs):
        if args[0] == "commit":
            raise KeyboardInterrupt
        return dvc_run(root, env, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(admission, "_dvc", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ingest_batch(repo, "recsys", cfg, first, repo_env(repo))
    assert json.loads((repo / SNAPSHOT / "snapshot.json").read_text())["batches"] == []
    assert not (repo / SNAPSHOT / first.name).exists() and admission.skipped(repo, "recsys", first) is None
    # killed while DVC records it (SIGKILL, the out-of-memory killer: no clean-up runs): the next snapshot stage (the
    # first of every run and ingestion) takes the batch out again; before, it stayed listed but unversioned
    killed = ("import os, sys\nfrom pathlib import Path\nimport flows.batch_admission as admission\n"
              "from tasks.config import load_config\n"
              "admission._dvc = lambda root, env, *args, **kw: os.kill(os.getpid(), 9) if args[0] == 'commit' "
              "else None\n"
              "repo = Path(sys.argv[1])\nadmission.ingest_batch(repo, 'recsys', load_config(repo / 'params.yaml'), "
              "Path(sys.argv[2]), dict(os.environ))\n")
    proc = subprocess.run([sys.executable, "-c", killed, str(repo), str(first)], cwd=repo, env=repo_env(repo),
                          capture_output=True, text=True, check=False)
    listed = json.loads((repo / SNAPSHOT / "snapshot.json").read_text())["batches"]
    assert proc.returncode == -9 and [b["id"] for b in listed] == [first.name], proc.stderr[-3000:]
    proc = dvc(repo, "repro", "snapshot_recsys")
    assert proc.returncode == 0 and f"batch {first.name} was left in" in proc.stderr, proc.stderr[-3000:]
    assert json.loads((repo / SNAPSHOT / "snapshot.json").read_text())["batches"] == []
    assert not (repo / SNAPSHOT / first.name).exists() and admission.skipped(repo, "recsys", first) is None
    assert not list((repo / SNAPSHOT).parent.glob(".*.pending.json"))
    # a bad batch interrupted while it is quarantined (its copy landed, its report not yet): no entry without its
    # report (before: the batch alone, skipped by every later ingestion as quarantined, no report saying why)
    broken = tmp_path / "0002-z-broken"
    _copy_week(third, broken, lambda r: r.assign(rating=7))
    with monkeypatch.context() as patched:
        patched.setattr(admission, "write_json", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            ingest_batch(repo, "recsys", cfg, broken, repo_env(repo))
    quarantine = repo / "data/recsys/quarantine"
    assert not [p.name for p in quarantine.iterdir()] and admission.skipped(repo, "recsys", broken) is None
    outcome = ingest_batch(repo, "recsys", cfg, broken, repo_env(repo))
    assert outcome.status == "quarantined" and (quarantine / broken.name / "report.json").is_file()

    # the producer writes the file once more after the checks read it
    checked, ratings = admission.check, first / "ratings.csv"
    written = ratings.read_text()

    def written_to(verdict: str):   # the rows read pass their checks (""), or fail them (a partial file, say)
        def check(*args):   # (the checks have the rows read before: not this one)
            ratings.write_text(written + written.splitlines()[1] + "\n")   # a duplicated row the contract refuses
            return verdict, checked(*args)[1]
        return check

    for verdict in ("", "invalid"):
        monkeypatch.setattr(admission, "check", written_to(verdict))
        outcome = ingest_batch(repo, "recsys", cfg, first, repo_env(repo))
        assert (outcome.status, outcome.reason) == ("deferred", "changed"), outcome
        assert f"{first}: ratings.csv changed while the batch was checked" in outcome.detail
        assert json.loads((repo / SNAPSHOT / "snapshot.json").read_text())["batches"] == []
        assert not (repo / SNAPSHOT / first.name).exists()
        assert not (repo / "data/recsys/quarantine" / first.name).exists()
        ratings.write_text(written)   # as the producer meant it
    monkeypatch.setattr(admission, "check", written_to(""))   # the batch after a deferred one waits for it
    outcomes = ingest.fn(str(repo), "recsys", batches=[str(first), str(second)])
    assert [(o["batch"], o["status"], o["reason"]) for o in outcomes] == [
        (first.name, "deferred", "changed"), (second.name, "deferred", "order")]
    ratings.write_text(written)
    monkeypatch.setattr(admission, "check", checked)
    lock = zc.lockfile.LockFile(str(repo / ".dvc" / "tmp" / "lock"))
    threading.Timer(6.0, lock.close).start()   # held beyond DVC's own few seconds, within the 15 s waited for
    assert ingest_batch(repo, "recsys", cfg, first, repo_env(repo)).status == "accepted"
    assert locked_outs(repo)[SNAPSHOT] and (repo / ".dvc-storage").is_dir()   # versioned, and pushed to the remote

    # a clone not yet pulled (the folder missing): the snapshot stage refuses a new one without the accepted batch
    version = locked_outs(repo)[SNAPSHOT]
    shutil.rmtree(repo / SNAPSHOT)
    proc = dvc(repo, "repro", "snapshot_recsys")
    said = proc.stdout + proc.stderr
    refused = rf"{SNAPSHOT}: missing, and dvc.lock records a version of it of [2-9] files \(a new one would hold 1:"
    assert proc.returncode != 0 and re.search(rf"{refused}.*`dvc pull {SNAPSHOT}`", said), said[-3000:]
    assert not (repo / SNAPSHOT).exists() and locked_outs(repo)[SNAPSHOT] == version
    assert dvc(repo, "pull", SNAPSHOT).returncode == 0
    assert dvc(repo, "repro", "snapshot_recsys").returncode == 0 and locked_outs(repo)[SNAPSHOT] == version
    assert [b["id"] for b in json.loads((repo / SNAPSHOT / "snapshot.json").read_text())["batches"]] == [first.name]

    # a batch accepted before, ingested again after a deferred one, is skipped as accepted (before: "deferred, order")
    ratings, written = third / "ratings.csv", (third / "ratings.csv").read_text()
    monkeypatch.setattr(admission, "check", written_to(""))
    outcomes = ingest.fn(str(repo), "recsys", batches=[str(third), str(first)])
    assert [(o["batch"], o["status"], o["reason"]) for o in outcomes] == [
        (third.name, "deferred", "changed"), (first.name, "skipped", f"already accepted as {first.name}")]

    # a batch accepted before a later one of the same ingestion failed: the version with it is committed all the same
    # (before: dvc.lock was left uncommitted, for a later run's commit to carry under another message)
    import flows.ingest as ingesting

    ratings.write_text(written)
    monkeypatch.setattr(admission, "check", lambda *args: ("", checked(*args)[1]))   # the week passes its checks
    accept = ingesting.ingest_batch

    def fails_on_third(root, family, cfg, folder, env):
        if folder.name == third.name:
            raise PipelineError(f"batch {folder.name} was not accepted (a failure injected)")
        return accept(root, family, cfg, folder, env)

    monkeypatch.setattr(ingesting, "ingest_batch", fails_on_third)
    with pytest.raises(PipelineError, match="a failure injected"):
        ingest.fn(str(repo), "recsys", batches=[str(second), str(third)])
    assert _lock_log(repo)[0] == f"recsys: batches {second.name} accepted into the snapshot"
    assert not _git(repo, "status", "--porcelain", "--", "dvc.lock")

    # interrupted once DVC has recorded the version: the batch stays, accepted (its version is in dvc.lock), and the
    # ingestion commits the lock with it though its outcome never came back
    monkeypatch.setattr(ingesting, "ingest_batch", accept)

    def versioned_then_interrupted(root, env, *args, **kwargs):
        dvc_run(root, env, *args, **kwargs)
        if args[0] == "commit":
            raise KeyboardInterrupt

    monkeypatch.setattr(admission, "_dvc", versioned_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest.fn(str(repo), "recsys", batches=[str(third)])
    assert third.name in [b["id"] for b in json.loads((repo / SNAPSHOT / "snapshot.json").read_text())["batches"]]
    assert _lock_log(repo)[0] == f"recsys: batches {third.name} accepted into the snapshot"
    assert admission.skipped(repo, "recsys", third).reason == f"already accepted as {third.name}"
    status = dvc(repo, "status", "--json", "snapshot_recsys")
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, status.stdout
