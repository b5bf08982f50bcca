"""One recipe of a sweep: its params overrides applied to a scratch copy of the project, the family's compression,
export and evaluation stages reproduced there, the result measured and tracked as one MLflow run.

The copy shares the project's upstream outputs (prepared data, validation report, teacher) by hard link, so a
recipe never retrains the teacher. Overrides go into the layer of params.yaml that wins: the active profile's
overlay (``profiles.<profile>``), else the base values.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import task

from flows.dvc_stage import StageFailed, close_killed_runs, reproduce, retry_transient, stage_env
from flows.gating import pair_latencies, paths
from flows.workspace import copy_project
from tasks.config import Config, deep_merge, family_config, keys_overlap, leaf_keys, load_config, param_at, parse_config
from tasks.errors import ConfigError, PipelineError
from tasks.family import load_family
from tasks.gate import Check, gate_checks, gate_tags
from tasks.io import load_yaml
from tasks.lineage import dvc_lock_text, git_state, source_git_env
from tasks.mlflow_store import client_for, ensure_experiment
from tasks.tracking import child_run

THREADED = ("distill", "prune", "qat", "share", "export")   # sections whose `threads` a recipe sets


class RecipeInvalid(PipelineError):
    """A recipe's overrides do not make a valid params.yaml: never retried (PipelineError is not transient)."""


def layered_overrides(raw: dict[str, Any], overrides: dict[str, Any], family: str, threads: int) -> dict[str, Any]:
    """Dotted overrides for ``copy_project``: the recipe's and the thread limit, each where it wins and where the
    copy's dvc.yaml tracks it. Under a profile, a value goes into the profile's overlay where that overlay sets the
    key (merged over the base values, as the overlay is), else into the base values (a mapping merged over the one
    there, as the overlay would merge it: what ``sweep.space`` values are checked as); under ``full``, into the base
    values as it is. (Before 2026-12-07 every value went into the overlay, where dvc.yaml tracks only the keys the
    project's overlay sets: the copy's stages refuse a profile value dvc.yaml does not track.)"""
    profile = raw.get("profile", "full")
    overlay = (raw.get("profiles") or {}).get(profile) if profile != "full" else None
    set_by_overlay = list(leaf_keys("", overlay)) if isinstance(overlay, dict) else []
    sections = family_config(family).SECTIONS   # (the text family has no prune, qat or share)
    limits = {f"{section}.{family}.threads": threads for section in THREADED
              if "threads" in getattr(sections.get(section), "model_fields", {})}
    layered: dict[str, Any] = {}
    for key, value in {**limits, **overrides}.items():
        if any(keys_overlap(key, leaf) for leaf in set_by_overlay):
            layered[f"profiles.{profile}.{key}"] = value
        elif overlay is not None and isinstance(value, dict) and isinstance(current := param_at(raw, key), dict):
            layered[key] = deep_merge(current, value)
        else:
            layered[key] = value
    return layered


def link_outputs(root: Path, dest: Path, outs: list[str]) -> None:
    """Hard-link (else copy) the upstream stage outputs ``outs`` from ``root`` into ``dest``."""
    def place(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another file system (a shared work_dir elsewhere)
            shutil.copy2(src, dst)

    for out in outs:
        src, dst = root / out, dest / out
        if not src.exists():
            raise PipelineError(f"{src}: upstream output missing; run the family's upstream stages first")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, copy_function=place)
        else:
            place(str(src), str(dst))


def lock_upstream(root: Path, dest: Path) -> None:
    """The project's dvc.lock into the copy, before its stages run: it records the upstream outputs the copy links
    (the snapshot, the prepared data, the teacher), which the copy's own stages add to. The dvc.lock a registered
    recipe keeps (``flows.gating.LINEAGE``) then names the data version ``flows.restore`` pulls."""
    text = dvc_lock_text(root)   # whole: another family's DVC process may be rewriting it
    if text is None:
        raise PipelineError(f"{root / 'dvc.lock'}: missing after the upstream stages ran; run them first")
    (dest / "dvc.lock").write_text(text)


def finished_before(client: MlflowClient, experiment_id: str, sweep_run_id: str, name: str) -> dict | None:
    """The result of this recipe if an earlier attempt finished it: Dask recomputes a task whose finished result
    was lost with its worker, and a recipe is not worth running twice."""
    query = (f"tags.mlflow.parentRunId = '{sweep_run_id}' and tags.`sweep.recipe` = '{name}' "
             "and attributes.status = 'FINISHED'")
    done = [r for r in client.search_runs([experiment_id], query) if "sweep.result" in r.data.tags]
    return json.loads(done[0].data.tags["sweep.result"]) if done else None


def close_abandoned(client: MlflowClient, experiment_id: str, sweep_run_id: str, name: str) -> None:
    """Mark KILLED the runs of an earlier attempt at this recipe whose worker died (and its stage runs)."""
    query = (f"tags.mlflow.parentRunId = '{sweep_run_id}' and tags.`sweep.recipe` = '{name}' "
             "and attributes.status = 'RUNNING'")
    for run in client.search_runs([experiment_id], query):
        stages = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' "
                                                     "and attributes.status = 'RUNNING'")
        for stale in [*stages, run]:
            client.set_tag(stale.info.run_id, "sweep.abandoned", "worker lost; the recipe ran again")
            client.set_terminated(stale.info.run_id, "KILLED")


def worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):  # not on a Dask worker
        return "local"


@task(task_run_name="recipe-{index}", retry_condition_fn=retry_transient)
def run_recipe(index: int, overrides: dict[str, Any], family: str, root: Path, work: Path, uri: str,
               sweep_run_id: str, upstream_outs: list[str], stages: list[str], threads: int) -> dict[str, Any]:
    """Run one recipe in ``work/recipe-<index>``; return its measurements and gate verdict (floors, teacher)."""
    name, dest = f"recipe-{index:03d}", work / f"recipe-{index:03d}"
    raw = load_yaml((root / "params.yaml").read_text())
    client = client_for(uri)
    experiment = ensure_experiment(client, parse_config(raw, str(root / "params.yaml")), root)
    if (done := finished_before(client, experiment, sweep_run_id, name)) is not None:
        return done
    close_abandoned(client, experiment, sweep_run_id, name)
    if dest.exists():  # an earlier attempt (a retry, or a worker that died): start clean
        shutil.rmtree(dest)
    # the copy is a git repository of its own: its commit is in no history, so the lineage names the project's
    # commit and dirty state, read as the sources are copied
    source = git_state(root)
    copy_project(dest, layered_overrides(raw, overrides, family, threads), source=root)
    try:
        cfg = load_config(dest / "params.yaml")
    except ConfigError as err:
        raise RecipeInvalid(f"{name} {json.dumps(overrides)}: {err}") from None
    link_outputs(root, dest, upstream_outs)
    lock_upstream(root, dest)
    with child_run(name, cfg, {"sweep": overrides}, sweep_run_id, dest, client) as run:
        run.set_tags({"sweep.recipe": name, "sweep.worker": worker_name(), "sweep.dir": str(dest), **source,
                      "git.scratch_commit": git_state(dest)["git.commit"]})
        env = {**stage_env(dest, uri, run.run_id), **source_git_env(dest, source)}   # its stage runs' lineage
        for stage in stages:
            try:
                reproduce(stage, dest, env, log=False)
            except StageFailed:   # its process killed (a signal, out of memory) could not end its run: as a pipeline
                close_killed_runs(stage, env)   # run's stage does (the recipe run ends FAILED: no retry looks here)
                raise
        verdict, measured, checks = judge_recipe(dest, cfg, family)
        result = {"index": index, "name": name, "overrides": overrides, "run_id": run.run_id, "dir": str(dest),
                  "source": source, "worker": worker_name(), **verdict, **measured}
        run.log_metrics(measured)
        run.set_tags({**gate_tags(checks), "sweep.result": json.dumps(result)})
    return result


def judge_recipe(dest: Path, cfg: Config, family: str) -> tuple[dict[str, Any], dict[str, float], list[Check]]:
    """A recipe's verdict (``passed``: the gate's thresholds on its validation scores, ``failed_checks``,
    ``test_gate_passed``), its measurements, and the test gate's checks, from its evaluation with the candidate's and
    the teacher's latencies measured again in pairs (as the gate does: the evaluate stage timed them apart, beside
    other recipes' training)."""
    where = paths(dest, family)
    evaluation = json.loads((dest / where["evaluation"]).read_text())
    pair_latencies(dest, cfg, family, evaluation, where)
    gate, spec = cfg.block("gate", family), load_family(family).gate
    # Which recipes may be chosen is a choice too: the gate's thresholds on the validation scores decide it
    # ("passed"); the test gate is reported beside it and decides only at registration, for the chosen one.
    eligible = gate_checks(evaluation, None, gate, spec, split="val")
    checks = gate_checks(evaluation, None, gate, spec)
    cand = evaluation["models"]["student_int8"]
    # val_<metric> is what the sweep ranks recipes by; test_<metric> is reported (and gated) only
    measured = {**{f"{split}_{gate.metric}": cand[f"{split}_{gate.metric}"] for split in ("val", "test")},
                "bytes": cand["bytes"], "latency_p50_ms": cand[f"{spec.latency}_p50_ms"],
                "size_ratio_vs_teacher": evaluation["models"]["teacher_fp32"]["bytes"] / cand["bytes"]}
    verdict = {"passed": all(c.passed for c in eligible), "failed_checks": [c.name for c in eligible if not c.passed],
               "test_gate_passed": all(c.passed for c in checks)}
    return verdict, measured, checks
