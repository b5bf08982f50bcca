"""Ingestion: new batches of a family's raw data are checked and join its snapshot, or are quarantined.

    python -m flows.ingest --family recsys BATCH [BATCH ...]    # batch folders, in this order
    python -m flows.ingest --family recsys --landing DIR        # every batch folder of DIR not seen yet, by name
    python -m flows.ingest --family recsys --landing DIR --run  # ... then the family's pipeline, if one was accepted

Each batch (``flows.batch_admission``) is checked with Great Expectations (through Checkpoints, with Data Docs) against

- the **contract** (``tasks/<family>/intake.py``): schema, types, ranges, label set, referential integrity,
  duplicates — on the batch alone and against the data already accepted;
- the **reference profile** of the accepted data (drift): distances TFX's data validation uses, each under its
  ``ingest.<family>.drift`` limit;
- when the family has them, the **aggregate** limits: the accepted data with the batch, against what the family's
  validation stage holds the whole snapshot to.

A batch that passes joins the snapshot (``data/<family>/raw``, the output of stage ``snapshot_<family>``) and
``dvc commit`` records the new version in ``dvc.lock`` (and its cache), so the next ``dvc repro`` trains on it. A
batch that fails is **quarantined**: copied to ``data/<family>/quarantine/<batch>/`` with its report and Data Docs,
named as ``invalid`` (the contract), ``drift`` (valid but shifted), ``aggregate`` (the snapshot with it would fail
its validation) or ``unreadable``; nothing else changes. Each
batch gets an MLflow run (``ingest_<family>``: status, reason, drift distances, the report, the Data Docs, the batch
as a dataset input); the Prefect flow ``ingest`` runs the same code, and ``continuous-training`` (``--run``) follows
it with the compression pipeline when a batch was accepted or the family's stages are out of date (with nothing new
it does nothing, in seconds). Accepted batches, and then what was trained on them, are each committed in
``dvc.lock`` (``flows.lock_commit``; ``pipeline.commit_lock``).
Ingestion holds the family's data lock (``flows.registry_lock.data_lock``), as pipeline runs do: the snapshot never
changes under a stage that reads it.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow

from flows.batch_admission import Outcome, ingest_batch, skipped, snapshot_stage
from flows.dvc_stage import push_versioned, reproduce, stage_env, stage_logger
from flows.lock_commit import commit_lock
from flows.pipeline import compression_pipeline
from flows.registry_lock import data_lock
from tasks.config import Config, load_config
from tasks.errors import EXIT_USER_ERROR, PipelineError, run_cli
from tasks.mlflow_store import tracking_uri
from tasks.snapshot import read, unfit_batch_name


def landed(landing: Path) -> list[Path]:
    """The batch folders of a landing folder, by name (hidden ones are being written)."""
    if not landing.is_dir():
        raise PipelineError(f"{landing}: no such landing folder")
    return sorted(p for p in landing.iterdir() if p.is_dir() and not p.name.startswith("."))


def batch_folders(cfg: Config, family: str, batches: list[str] | None, landing: str | None) -> list[Path]:
    """The batch folders an ingestion takes, in order: ``batches``, then the new ones of ``landing``; refused before
    anything is read, checked or copied: an unknown family, a folder missing or a name no batch may have."""
    if family not in cfg.families:
        raise PipelineError(f"--family: {family!r} is not one of families {cfg.families}")
    # absolute: "." is the folder's own name; a symlink keeps its name
    folders = [Path(b).absolute() for b in batches or []] + (landed(Path(landing)) if landing else [])
    if missing := [str(f) for f in folders if not f.is_dir()]:
        raise PipelineError(f"not a batch folder: {', '.join(missing)}")
    if unfit := [f"{f}: {problem}" for f in folders if (problem := unfit_batch_name(f.name))]:
        raise PipelineError("; ".join(unfit))
    return folders


@flow(name="ingest", log_prints=True)
def ingest(root: str, family: str, batches: list[str] | None = None,
           landing: str | None = None) -> list[dict[str, str]]:
    """Ingest ``batches`` (folders) or every new batch of ``landing`` into ``family``'s snapshot, in order."""
    root_path = Path(root).resolve()
    cfg = load_config(root_path / "params.yaml")
    folders = batch_folders(cfg, family, batches, landing)
    env = stage_env(root_path, tracking_uri(cfg, root_path), "")   # no parent: the snapshot stage's run stands alone
    log = stage_logger()
    stage, snapshot = snapshot_stage(root_path, family)
    outcomes, held = [], None
    try:
        with data_lock(root_path, [family], cfg.pipeline.data_lock_timeout_seconds):   # no pipeline run reads it now
            # the snapshot exists and is intact before anything joins it (DVC's lock: waited for, as ingest_batch
            # does)
            reproduce(stage, root_path, env, lock_wait=cfg.pipeline.data_lock_timeout_seconds)
            push_versioned(root_path, env, stage, cfg.pipeline.data_lock_timeout_seconds)   # a bootstrap it made
            held, deferred = _batch_ids(snapshot), None
            for folder in folders:   # in order: after a deferred batch none is accepted (the snapshot keeps the order)
                outcome = ingest_batch(root_path, family, cfg, folder, env) if deferred is None else skipped(
                    root_path, family, folder) or Outcome(folder.name, "deferred", "order", f"after {deferred}, "
                                                          "deferred: batches join the snapshot in order")
                deferred = deferred or (outcome.batch if outcome.status == "deferred" else None)
                log(f"{outcome.batch}: {outcome.status}" + (f" ({outcome.reason})" if outcome.reason else "")
                    + (f"\n{outcome.detail}" if outcome.detail else ""))
                outcomes.append(asdict(outcome))
    finally:   # what was accepted is committed, also when a later batch failed (before: left for another run's commit)
        accepted = [o["batch"] for o in outcomes if o["status"] == "accepted"]
        if held is not None:   # and a batch DVC versioned before an interruption, whose outcome never came back
            accepted += [b for b in _batch_ids(snapshot) if b not in held and b not in accepted]
        if accepted and cfg.pipeline.commit_lock:
            commit_lock(root_path, f"{family}: batches {', '.join(accepted)} accepted into the snapshot")
    return outcomes


def _batch_ids(snapshot: Path) -> list[str]:
    """The batches the snapshot's manifest lists (none when it cannot be read)."""
    try:
        return [batch["id"] for batch in read(snapshot)["batches"]]
    except (OSError, ValueError, KeyError, PipelineError):
        return []


@flow(name="continuous-training", log_prints=True)
def continuous_training(root: str, family: str, landing: str) -> dict[str, Any]:
    """Ingest what arrived in ``landing``; when a batch was accepted, or DVC finds the family's stages out of date,
    run the family's pipeline (its stages re-run on the new snapshot, then the gate); else nothing else runs."""
    root_path = Path(root).resolve()
    outcomes = ingest(str(root_path), family, landing=str(root_path / landing))
    accepted = [o["batch"] for o in outcomes if o["status"] == "accepted"]
    train = bool(accepted) or stale(root_path, family)   # also a version an earlier, failed run left untrained
    result = compression_pipeline(str(root_path), [family]) if train else None
    commit = None
    if train and load_config(root_path / "params.yaml").pipeline.commit_lock:
        commit = commit_lock(root_path, _lock_message(family, accepted, result))
    return {"ingested": outcomes, "pipeline": result, "lock_commit": commit}


def _lock_message(family: str, accepted: list[str], result: dict[str, Any] | None) -> str:
    gate = (result or {}).get("gates", {}).get(family) or {}
    data = f"batches {', '.join(accepted)}" if accepted else "its data version"
    gated = f", gated as {gate['name']} version {gate['version']}" if gate.get("version") else ""
    return f"{family}: trained on {data}{gated}"


def stale(root: Path, family: str) -> bool:
    """Whether DVC finds the family's last stage, or a stage it depends on, out of date."""
    import subprocess

    from flows.stage_graph import family_stages, stage_graph

    last = family_stages(stage_graph(root), family)[-1].name
    done = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "--with-deps", last], cwd=root,
                          capture_output=True, text=True, check=False)
    try:
        return done.returncode != 0 or json.loads(done.stdout or "{}") != {}
    except ValueError:   # not DVC's JSON: nothing shows the family is up to date
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("batches", nargs="*", type=Path, help="batch folders, ingested in this order")
    parser.add_argument("--family", required=True)
    parser.add_argument("--landing", type=Path, help="ingest every batch folder of this folder not seen yet")
    parser.add_argument("--run", action="store_true", help="then run the family's pipeline if a batch was accepted")
    parser.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args()
    if not args.batches and args.landing is None:
        parser.error("name batch folders or --landing")
    if args.run and args.batches:
        parser.error("--run takes --landing only")
    # refused here, before the flow starts Prefect (a temporary server, ~15 s, then a traceback in its log)
    batch_folders(load_config(args.root / "params.yaml"), args.family, [str(b) for b in args.batches],
                  str(args.landing) if args.landing else None)
    if args.run:
        result = continuous_training(str(args.root), args.family, str(args.landing.resolve()))
        outcomes = result["ingested"]
    else:
        outcomes = ingest(str(args.root), args.family, [str(b) for b in args.batches],
                          str(args.landing) if args.landing else None)
    for o in outcomes:
        print(f"{o['batch']}: {o['status']}" + (f" ({o['reason']})" if o["reason"] else "")
              + (f" -> {o['report']}" if o["report"] else ""))
    quarantined = [o for o in outcomes if o["status"] == "quarantined"]
    if quarantined:
        for o in quarantined:
            print(f"error: batch {o['batch']} quarantined ({o['reason']}):\n{o['detail']}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    run_cli(main)
