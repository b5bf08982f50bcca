"""Stage ``warm_start_<family>``: where the family's next training starts — from scratch, or from the champion.

Inputs: ``--snapshot`` (its manifest counts the data versions), ``--data`` (the processed folder the next models
read), params ``warm_start.<family>`` and the registry (the champion of ``gate.<family>.registered_model``).
Output: ``--out``, a folder with ``plan.json`` (``teacher``: scratch | fine_tune | reuse, ``student``: scratch |
fine_tune, the champion version it starts from, the data versions the teacher in use was trained on) and, when the
plan starts from the champion, its teacher and FP32 student (``teacher.pt``, ``student.pt``) fitted to this data by
the family's ``adapt`` (the recommender carries its embedding rows over by vocabulary).

The champion's weights are what its registering run kept under ``warm_start/`` (``flows.gating``). The stage
runs when the snapshot, the processed data, these params or its code change (as a rule once per new data version),
so the champion it reads is the one of that moment, and dvc.lock records what it wrote (``flows.restore`` pulls it
back). A re-run on the same snapshot under the same policy (a code change) starts from the champion the first run of
that data version started from, never from a model of this very data; a champion trained on data split by other
``data.<family>`` params, or on a snapshot today's does not extend (its batches, by content, are not the first of
today's), is never started from. With ``policy: scratch`` and ``teacher_every: 1`` it asks the
registry nothing.
"""
from __future__ import annotations

import io
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.family_config import WarmStart
from tasks.io import file_digest, write_atomic, write_json
from tasks.lineage import data_params, same_split
from tasks.snapshot import MANIFEST, read
from tasks.warm_plan import ARTIFACTS, FILES, MODE, PLAN, read_plan

#: ``adapt(model file content, champion's folder, processed data folder)``: the content fitted to this data, or None
#: when it cannot be (the next run then trains that model from scratch).
Adapt = Callable[[dict[str, Any], Path, Path], dict[str, Any] | None]


def plan_training(cfg: WarmStart, versions: int, champion: dict[str, Any] | None) -> dict[str, Any]:
    """What the next run trains how. ``champion``: ``{"version", "trained_at" (the data versions its teacher was
    trained on, None when unknown), "teacher", "student" (whether its file is there)}``, None without one."""
    plan = {"policy": cfg.policy, "teacher_every": cfg.teacher_every, "versions": versions, "champion": None,
            "teacher": "scratch", "student": "scratch", "teacher_versions": versions}
    if champion is None:
        return plan
    plan["champion"] = champion["version"]
    trained_at = champion.get("trained_at")
    if (champion["teacher"] and cfg.teacher_every > 1 and isinstance(trained_at, int)
            and 0 <= versions - trained_at < cfg.teacher_every):
        plan.update(teacher="reuse", teacher_versions=trained_at)
    elif champion["teacher"] and cfg.policy == "fine_tune":
        plan["teacher"] = "fine_tune"
    if champion["student"] and cfg.policy == "fine_tune":
        plan["student"] = "fine_tune"
    return plan


def history(manifest: dict[str, Any]) -> list[str]:
    """A snapshot's batches in order, each by its content's digest (its id where the manifest records none)."""
    return [b.get("digest") or b["id"] for b in manifest["batches"]]


def champion_files(cfg: Any, family: str, scratch: Path, pinned: str | None = None,
                   batches: list[str] | None = None) -> tuple[dict[str, Any], Path] | None:
    """The champion (version ``pinned``, else the one the alias names now), as ``plan_training`` takes it, and the
    folder its ``warm_start/`` artifacts were downloaded to; None when there is none, or when it was trained on rows
    split by other ``data.<family>`` params or on a snapshot whose batches are not the first of today's ``batches``
    (``history``: another bootstrap, another order; today's test rows may have been its training rows)."""
    import torch
    from mlflow.exceptions import MlflowException

    from tasks.mlflow_store import client_for, is_server_call_error, registered_version, server_error, tracking_uri

    client, name = client_for(tracking_uri(cfg)), cfg.block("gate", family).registered_model
    version = registered_version(client, name, pinned)
    if version is None:
        if pinned:
            print(f"note: {name} version {pinned}, which this data version's first run started from, is gone; "
                  "training from scratch", file=sys.stderr)
        return None
    try:   # listed first: a store that fails is not a champion without weights (every store lists none as [])
        kept = client.list_artifacts(version.run_id, ARTIFACTS)
        local = Path(client.download_artifacts(version.run_id, ARTIFACTS, str(scratch))) if kept else None
    except Exception as err:
        if isinstance(err, MlflowException) and err.error_code == "RESOURCE_DOES_NOT_EXIST":   # its run deleted
            local = None
        elif is_server_call_error(err):   # transient: the stage is retried, not planned from scratch
            raise server_error(err, f"the artifact store of {name} version {version.version}",
                               "no warm start planned") from None
        else:
            raise
    if local is None:
        print(f"note: {name} version {version.version}: no {ARTIFACTS}/ weights to read (its run kept none); "
              "training from scratch", file=sys.stderr)
        return None
    earlier = read_plan(local) if (local / PLAN).is_file() else {}
    if not same_split(earlier.get("data_params"), cfg, family):
        why = ("recorded no data params (registered before they were)" if "data_params" not in earlier else
               f"was trained on data split by other data.{family} params (its training rows may be today's test rows)")
        print(f"note: {name} version {version.version} {why}; training from scratch", file=sys.stderr)
        return None
    trained_on = earlier.get("history")
    if batches is not None and (trained_on is None or batches[:len(trained_on)] != trained_on):
        why = ("recorded no snapshot history (registered before it was)" if trained_on is None else
               "was trained on a snapshot whose batches are not the first of today's (another bootstrap or order: "
               "its training rows may be today's test rows)")
        print(f"note: {name} version {version.version} {why}; training from scratch", file=sys.stderr)
        return None
    teacher = local / FILES["teacher"]
    # what its teacher stage did (a reused teacher was trained on an earlier version), not only what was planned
    done = torch.load(teacher, map_location="cpu", weights_only=True).get(MODE) if teacher.is_file() else None
    trained_at = earlier.get("teacher_versions") if done in (None, "reuse") else earlier.get("versions")
    return ({"version": str(version.version), "trained_at": trained_at,
             **{role: (local / file).is_file() for role, file in FILES.items()}}, local)


def warm_start(cfg: Any, family: str, snapshot: Path, data: Path, out: Path, adapt: Adapt | None,
               previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the plan and the champion's adapted weights into ``out``; return the plan. ``previous``: the plan this
    stage wrote last; on the same snapshot under the same policy it keeps that plan's champion (a re-run for a code
    or params change starts where the first run of this data version did, not from a model of this very data)."""
    spec: WarmStart = cfg.block("warm_start", family)
    batches, digest = history(read(snapshot)), file_digest(snapshot / MANIFEST)
    versions = len(batches)
    out.mkdir(parents=True, exist_ok=True)
    for file in FILES.values():   # what an earlier plan started from is not this one's
        (out / file).unlink(missing_ok=True)
    model = cfg.block("gate", family).registered_model
    same = previous is not None and all(previous.get(k) == v for k, v in (
        ("snapshot", digest), ("policy", spec.policy), ("teacher_every", spec.teacher_every), ("model", model)))
    found = None
    with tempfile.TemporaryDirectory() as tmp:
        if not (spec.policy == "scratch" and spec.teacher_every == 1) and not (same and previous["champion"] is None):
            found = champion_files(cfg, family, Path(tmp), previous["champion"] if same else None, batches)
        plan = plan_training(spec, versions, found[0] if found else None)
        for role, file in FILES.items():
            if plan[role] == "scratch" or found is None:
                continue
            import torch  # here: a stage that starts from scratch (the default policy) never needs it

            blob = torch.load(found[1] / file, map_location="cpu", weights_only=True)
            fitted = adapt(blob, found[1], data) if adapt else blob
            if fitted is None:
                print(f"note: the champion's {role} cannot read this data; the {role} trains from scratch",
                      file=sys.stderr)
                plan.update({role: "scratch"}, **({"teacher_versions": versions} if role == "teacher" else {}))
                continue
            buffer = io.BytesIO()
            torch.save(fitted, buffer)
            write_atomic(out / file, buffer.getvalue())
    plan.update(snapshot=digest, history=batches, data_params=data_params(cfg, family), model=model)
    write_json(out / PLAN, plan)
    return plan


def stage_main(family: str, adapt: Adapt | None = None) -> None:
    from tasks.config import stage_args
    from tasks.staging import STAGING
    from tasks.tracking import stage_run

    args, cfg = stage_args(__doc__, "--snapshot", "--data", "--out")
    final = args.out.parent.parent / args.out.name if args.out.parent.name == STAGING else args.out
    previous = read_plan(final) if (final / PLAN).is_file() else None
    spec = cfg.block("warm_start", family)
    with stage_run(f"warm_start_{family}", cfg, {f"warm_start.{family}": spec}) as run:
        plan = warm_start(cfg, family, args.snapshot, args.data, args.out, adapt, previous)
        run.set_tags({f"warm_start.{role}": plan[role] for role in FILES} | {
            "warm_start.champion": str(plan["champion"] or "none")})
        run.log_artifact(args.out / PLAN)
    print(f"{family}: teacher {plan['teacher']}, student {plan['student']}"
          + (f" (from champion version {plan['champion']})" if plan["champion"] else ""))
