"""One arriving batch of a family's raw data, checked and admitted to its snapshot or quarantined (``flows.ingest``).

``check`` runs the family's contract suites (Great Expectations, through Checkpoints, with Data Docs) on the batch
alone and against the accepted data, then, for a valid batch, its drift suites against the accepted data's profile
and, when the family has them, its aggregate suites on the accepted data with the batch (the snapshot as it would be).
``ingest_batch`` adds a passing batch to the snapshot and records the new version with ``dvc commit`` (undone if DVC
fails or the ingestion is interrupted), or copies a failing one to ``data/<family>/quarantine/<batch>/`` with its
report and Data Docs (whole, or not at all); either way the batch gets an MLflow run ``ingest_<family>``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.dvc_stage import push_outputs, run_dvc
from flows.stage_graph import stage_paths
from tasks.config import Config
from tasks.errors import DataFormatError, PipelineError
from tasks.expectations import DATA_DOCS, ephemeral_context, failure_message, render_docs, run_suites
from tasks.intake import Intake, load_intake
from tasks.io import UMASK, write_atomic, write_json
from tasks.pending_batch import joining
from tasks.pending_batch import recorded as pending_recorded
from tasks.snapshot import MANIFEST, add_batch, batch_digest, batch_tables, folder_digests, read
from tasks.tracking import pipeline_run

QUARANTINE = "quarantine"


@dataclass
class Outcome:
    batch: str
    status: str            # accepted | quarantined | skipped | deferred
    reason: str = ""       # quarantined: invalid | drift | aggregate | unreadable; skipped: why;
    #                        deferred: changed | order
    detail: str = ""       # the failed checks, one per line
    report: str = ""       # where the report and Data Docs are


def snapshot_stage(root: Path, family: str) -> tuple[str, Path]:
    """The stage that owns the family's snapshot and its folder, as dvc.yaml's command names it."""
    stage = f"snapshot_{family}"
    folder = stage_paths(root, stage).get("snapshot")
    if folder is None:
        raise PipelineError(f"dvc.yaml: stage {stage} names no --snapshot folder")
    return stage, root / folder


def _seen(snapshot: Path, quarantine: Path, folder: Path) -> str | None:
    """Why ``folder`` is not ingested again: accepted (same name or same files) or quarantined before."""
    manifest, files = read(snapshot), folder_digests(folder)
    digest = batch_digest(files)
    for batch in manifest["batches"]:
        if batch["id"] == folder.name or batch.get("digest") == digest:
            return f"already accepted as {batch['id']}"
    if (quarantine / folder.name).is_dir():
        return f"quarantined before ({quarantine / folder.name}); remove it there to try again"
    return None


def check(intake: Intake, cfg: Config, batch: Any, accepted: Any, docs: Path | None) -> tuple[str, dict[str, Any]]:
    """("" when the batch passes, else ``invalid``, ``drift`` or ``aggregate``; the report) — contract first, drift
    only for a valid batch against accepted data, then the family's aggregate checks (if any) on the accepted data
    with the batch: batches each within the drift limits may still, one after another, carry the snapshot out of the
    limits its validation stage holds it to. Data Docs of every check that ran rendered into ``docs`` when given."""
    context = ephemeral_context()
    reason, report = _checks(context, intake, cfg, batch, accepted)
    if docs is not None:
        render_docs(context, docs)
    return reason, report


def _checks(context: Any, intake: Intake, cfg: Config, batch: Any, accepted: Any) -> tuple[str, dict[str, Any]]:
    contract = run_suites(context, "contract", intake.contract(batch, accepted, cfg))
    report: dict[str, Any] = {"contract": contract, "drift": None, "profile": None, "aggregate": None}
    if not contract["success"]:
        return "invalid", report
    if accepted is not None:
        stats, suites = intake.drift(batch, accepted, cfg)
        drift = run_suites(context, "drift", suites)
        report.update(drift={**drift, "distances": stats}, profile=intake.profile(accepted, cfg))
        if not drift["success"]:
            return "drift", report
    if intake.aggregate is None:
        return "", report
    suites = intake.aggregate(intake.combine([batch] if accepted is None else [accepted, batch]), cfg)
    if not suites:   # nothing to hold the whole to yet
        return "", report
    report["aggregate"] = run_suites(context, "aggregate", suites)
    if report["aggregate"]["success"]:
        return "", report
    # outside those limits already without the batch (accepted before this check, or the limits edited): the batch
    # did not carry it there, and refusing it would refuse every batch after it, one bringing the data back too; one
    # that breaks a limit the accepted data meets is refused (checked in a context of its own: same suite names)
    before = intake.aggregate(accepted, cfg) if accepted is not None else []
    if before and _failed(report["aggregate"]) <= _failed(outside := run_suites(ephemeral_context(), "aggregate",
                                                                                before)):
        report["aggregate"]["outside_before"] = sorted(" ".join(c) for c in _failed(outside))
        return "", report
    return "aggregate", report


def _failed(result: dict[str, Any]) -> set[tuple[str, str, str]]:
    """The (suite, expectation, column) of each failed check of a ``run_suites`` result."""
    return {(c["suite"], c["expectation"], str(c["kwargs"].get("column", ""))) for c in result["checks"]
            if not c["success"]}


def skipped(root: Path, family: str, folder: Path) -> Outcome | None:
    """``folder``'s outcome when it is never ingested again (accepted or quarantined before), else None."""
    _, snapshot = snapshot_stage(root, family)
    seen = _seen(snapshot, snapshot.parent / QUARANTINE, folder)
    return Outcome(folder.name, "skipped", seen) if seen else None


def ingest_batch(root: Path, family: str, cfg: Config, folder: Path, env: dict[str, str]) -> Outcome:
    """Check one batch folder; add it to the snapshot or quarantine it; log it to MLflow."""
    if outcome := skipped(root, family, folder):
        return outcome
    intake = load_intake(family)
    stage, snapshot = snapshot_stage(root, family)
    quarantine = snapshot.parent / QUARANTINE
    reports = root / "reports" / family / "ingest" / folder.name
    if reports.exists():
        shutil.rmtree(reports)
    reports.mkdir(parents=True)
    docs = reports / DATA_DOCS
    files = folder_digests(folder)   # what is checked: the copy the snapshot keeps must be this
    try:
        batch = intake.read_batch(folder)
    except DataFormatError as err:
        reason, report = "unreadable", {"error": str(err)}
    else:
        accepted_batches = batch_tables(snapshot, intake)
        accepted = intake.combine([t for _, t in accepted_batches]) if accepted_batches else None
        reason, report = check(intake, cfg, batch, accepted, docs)
    report.update(batch=folder.name, source=str(folder.resolve()), status="quarantined" if reason else "accepted",
                  reason=reason)
    detail = _detail(report)
    with pipeline_run(cfg, f"ingest_{family}", root, launcher="ingest") as run:
        run.set_tags({"ingest.family": family, "ingest.batch": folder.name, "ingest.status": report["status"],
                      "ingest.reason": reason or "none"})
        _log_batch(run, folder, batch_digest(files))
        distances = (report.get("drift") or {}).get("distances") or {}
        run.log_metrics({f"drift.{k}": v for k, v in distances.items()})
        if outside := (report.get("aggregate") or {}).get("outside_before"):   # accepted, and said
            run.set_tag("ingest.aggregate", "outside before the batch: " + "; ".join(outside))
            print(f"warning: {folder.name}: the accepted data was outside the limits validation holds it to before "
                  f"this batch ({'; '.join(outside)}); the batch breaks no other, so it is accepted", file=sys.stderr)
        if reason:
            target = quarantine / folder.name
            if changed := _quarantine(folder, files, report, reports, target):
                return _deferred(run, folder, changed)
            run.log_artifact(reports / "report.json")
            if docs.is_dir():
                run.log_artifacts(docs, DATA_DOCS)
            return Outcome(folder.name, "quarantined", reason, detail, str(target))
        wait = cfg.pipeline.data_lock_timeout_seconds   # for DVC's lock, held a moment by another family's run
        changed, digest = _admit(root, snapshot, stage, intake, batch, folder, files, env, run, wait)
        if changed:
            return _deferred(run, folder, changed)
        report["digest"] = digest
        if unpushed := push_outputs(root, env, stage, wait):
            print(f"warning: batch {folder.name} is accepted but not on the DVC remote: {unpushed}", file=sys.stderr)
            run.set_tag("ingest.pushed", "false")
        write_json(reports / "report.json", report)
        run.log_artifact(reports / "report.json")
        if docs.is_dir():
            run.log_artifacts(docs, DATA_DOCS)
        run.log_data([str(snapshot.relative_to(root))], root, "snapshot")
    return Outcome(folder.name, "accepted", "", "", str(reports))


def _admit(root: Path, snapshot: Path, stage: str, intake: Intake, batch: Any, folder: Path, files: dict[str, str],
           env: dict[str, str], run: Any, wait: float) -> tuple[str, str]:
    """Add the checked ``folder`` to the snapshot and version it (``wait``: for DVC's lock); ``_changed``'s line
    when the copy is not what the checks read (the batch left again), else "", and the batch's digest."""
    manifest = snapshot / MANIFEST
    before = manifest.read_bytes()

    def leave() -> None:   # the batch leaves the snapshot again, to be ingested anew
        write_atomic(manifest, before)
        shutil.rmtree(snapshot / folder.name, ignore_errors=True)

    with joining(root, snapshot, manifest, folder.name) as (recorded, done):   # on record until versioned or left
        try:
            entry = add_batch(snapshot, folder.name, folder, {"rows": intake.rows(batch),
                                                              "source": str(folder.resolve())})
        except Exception:   # refused: the snapshot as it was, nothing to settle
            done()
            raise
        try:
            if changed := _changed(folder, files, entry["files"]):   # the copy kept holds rows no check saw
                leave()
                done()
                return changed, ""
            # dvc.lock and the cache hold the new version: the next `dvc repro` trains on it
            _dvc(root, env, "commit", "--force", stage, lock_wait=wait)
        except BaseException as err:
            # DVC failed, or the ingestion was interrupted (Ctrl-C, a cancelled flow run; DVC is stopped first, so
            # nothing writes after this): unless dvc.lock records the new version already, the batch leaves the
            # snapshot. Before, an interruption (DVC may wait half an hour for its lock) left the batch listed but
            # unversioned: skipped as accepted by every later ingestion, then versioned by the next `dvc repro` with
            # no report and no commit (a kill no clean-up survives: ``tasks.pending_batch``)
            if pending_recorded(root, snapshot) != recorded:   # versioned: accepted, though its report was not written
                done()
                raise
            leave()
            done()   # (after leave: interrupted in it, the record stays for the next snapshot stage to settle)
            run.set_tags({"ingest.status": "failed",
                          "ingest.reason": "interrupted" if not isinstance(err, Exception) else "versioning"})
            if not isinstance(err, PipelineError):
                raise
            raise PipelineError(f"batch {folder.name} was not accepted, the snapshot is as it was: {err}") from err
        done()
    return "", entry["digest"]


def _quarantine(folder: Path, checked: dict[str, str], report: dict[str, Any], reports: Path, target: Path) -> str:
    """Copy ``folder`` (as ``batch/``) and its ``reports`` (``report`` as report.json, Data Docs) to ``target`` whole:
    built in a hidden folder beside it, then renamed, so an interruption leaves no quarantine entry without its report
    (one every later ingestion skipped as quarantined, no report saying why); return ``_changed``'s line when the copy
    is not what the checks read (nothing is quarantined then)."""
    for left in target.parent.glob(f".{target.name}.*"):   # an interrupted quarantine's
        shutil.rmtree(left, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        shutil.copytree(folder, scratch / "batch")
        if changed := _changed(folder, checked, folder_digests(scratch / "batch")):   # the copy kept, as checked
            shutil.rmtree(scratch)
            return changed
        write_json(reports / "report.json", report)
        shutil.copytree(reports, scratch, dirs_exist_ok=True)
        scratch.chmod(0o777 & ~UMASK)   # mkdtemp makes it private; as mkdir would make it
        if target.exists():
            shutil.rmtree(target)
        os.replace(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return ""


def _changed(folder: Path, checked: dict[str, str], now: dict[str, str]) -> str:
    """The files of ``folder`` whose digests ``now`` differ from those its checks read (``checked``), as one line;
    "" when none."""
    names = sorted(n for n in {*checked, *now} if checked.get(n) != now.get(n))
    return f"{folder}: {', '.join(names)} changed while the batch was checked" if names else ""


def _deferred(run: Any, folder: Path, changed: str) -> Outcome:
    """A batch written to while it was checked (its producer not done): neither accepted nor quarantined (what is
    kept would hold rows no check saw); left where it is, it is checked again when it is ingested next."""
    run.set_tags({"ingest.status": "deferred", "ingest.reason": "changed"})
    return Outcome(folder.name, "deferred", "changed", f"{changed}; it is checked again when it is ingested next")


def _log_batch(run: Any, folder: Path, digest: str) -> None:
    """The batch as an MLflow dataset input (context ``batch``; digest: its files' SHA-256, shortened to MLflow's
    digest length)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = Dataset(name=folder.name, digest=digest[:32], source_type="local",
                      source=json.dumps({"uri": str(folder.resolve())}))
    run._call("log the batch as a dataset input", lambda: run.client.log_inputs(
        run.run_id, datasets=[DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "batch")])]))


def _dvc(root: Path, env: dict[str, str], *args: str, lock_wait: float = 0.0) -> None:
    code, tail, _ = run_dvc(root, env, *args, lock_wait=lock_wait)
    if code != 0:
        raise PipelineError(f"dvc {' '.join(args)} failed in {root}: {tail.strip()[-800:]}")


def _detail(report: dict[str, Any]) -> str:
    if "error" in report:
        return report["error"]
    failed = next((report[part] for part in ("contract", "drift", "aggregate")
                   if report.get(part) and not report[part]["success"]), None)
    return failure_message(failed).split("\n", 1)[1] if failed else ""
