"""The compression pipeline as a Prefect flow: one task per stage of dvc.yaml, each run through ``dvc repro``.

Running a stage through DVC keeps one source of truth for caching: a stage whose deps, params and outputs are
unchanged is skipped by the flow exactly as by ``dvc repro``. The flow owns the MLflow parent run; each stage
process logs a child run under it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.client.schemas.objects import TaskRun
from prefect.exceptions import MissingContextError
from prefect.states import State

from flows.registry_lock import data_lock
from flows.run_artifacts import flag_degraded_champion, publish_data_docs, publish_gate, publish_run
from flows.stage_graph import stage_graph
from tasks.config import Config, load_config
from tasks.errors import EXIT_USER_ERROR, PipelineError, run_cli
from tasks.expectations import DATA_DOCS
from tasks.mlflow_store import redact, tracking_uri
from tasks.tracking import PARENT_ENV, pipeline_run

_TAIL_LINES = 400


class StageFailed(PipelineError):
    """A stage exited non-zero; ``deterministic`` when it rejected its input (never worth a retry)."""

    def __init__(self, stage: str, detail: str, deterministic: bool) -> None:
        super().__init__(f"stage {stage!r} failed:\n{detail}")
        self.stage, self.deterministic = stage, deterministic


def run_dvc(root: Path, env: dict[str, str], *args: str, log: Callable[[str], None] | None = None,
         marker: str | None = None) -> tuple[int, str, bool]:
    """Run ``dvc`` in ``root``; hand each line it (and the stage it runs) prints to ``log``; return its exit code,
    the tail of its output, and whether any line started with ``marker`` (however long the output grew)."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    seen = False
    for line in proc.stdout:
        tail.append(line)
        seen = seen or (marker is not None and line.startswith(marker))
        if log is not None:
            log(line.rstrip("\n"))
    return proc.wait(), "".join(tail), seen


def stage_logger() -> Callable[[str], None]:
    """Where a stage's output goes: the Prefect run's logger (the UI shows it under the task run), else stderr."""
    try:
        return get_run_logger().info
    except MissingContextError:
        return lambda line: print(line, file=sys.stderr, flush=True)


def _retry_transient(task: Any, task_run: TaskRun, state: State) -> bool:
    """Retry what may pass on a later try (a server down, a killed process), never bad input or config."""
    err = state.data
    if isinstance(err, StageFailed):
        return not err.deterministic
    if isinstance(err, PipelineError):
        return err.transient
    return True


@task(task_run_name="{stage}", retry_condition_fn=_retry_transient)
def run_stage(stage: str, root: Path, env: dict[str, str], data_docs: bool = False) -> str:
    """Reproduce one stage; return ``cached`` when DVC found it up to date (nothing ran), else ``ran``. A stage
    that renders Great Expectations Data Docs gets a Prefect artifact saying where they are, pass or fail."""
    try:
        ran = reproduce(stage, root, env)
    except StageFailed:
        if data_docs:
            _point_at_data_docs(stage, env)
        raise
    if data_docs and ran:
        _point_at_data_docs(stage, env)
    return "ran" if ran else "cached"


def _point_at_data_docs(stage: str, env: dict[str, str]) -> None:
    """``publish_data_docs``, never failing the stage for it (the Data Docs are in the MLflow run regardless)."""
    try:
        publish_data_docs(stage, env["MLFLOW_TRACKING_URI"], env[PARENT_ENV])
    except Exception as err:  # noqa: BLE001 - a missing pointer is not worth a failed stage
        stage_logger()(f"warning: no Prefect artifact for {stage}'s Data Docs ({type(err).__name__}: {err})")


def push_outputs(root: Path, env: dict[str, str], stage: str) -> str:
    """``dvc push`` the stage's outputs when the project has a default remote; "" when done (or no remote), else why
    not (they stay in the local DVC cache)."""
    code, tail, _ = run_dvc(root, env, "remote", "default")
    if code != 0 or not tail.strip():
        return ""
    code, tail, _ = run_dvc(root, env, "push", stage)
    return "" if code == 0 else f"dvc push {stage} failed in {root}: {tail.strip()[-800:]}"


def reproduce(stage: str, root: Path, env: dict[str, str], log: bool = True) -> bool:
    """``dvc repro --single-item stage`` in ``root`` (its output to the run's log when ``log``); return whether the
    stage ran, False when DVC found it up to date; raise ``StageFailed`` naming the stage's own error lines."""
    code, tail, ran = run_dvc(root, env, "repro", "--single-item", stage, log=stage_logger() if log else None,
                           marker=f"Running stage '{stage}'")
    if code != 0:
        errors = [ln for ln in tail.splitlines() if ln.startswith(("error:", "ERROR:", "  "))]
        raise StageFailed(stage, "\n".join(errors[-40:]) or tail[-2000:],
                          deterministic=f"exited with {EXIT_USER_ERROR}" in tail)
    return ran


def stage_env(root: Path, uri: str, parent_run_id: str) -> dict[str, str]:
    """Environment for stage processes: this interpreter's tools first, one tracking store, the parent run."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"MLFLOW_TRACKING_URI": uri, PARENT_ENV: parent_run_id, "PYTHONPATH": str(root)})
    return env


@flow(name="compression-pipeline", log_prints=True)
def compression_pipeline(root: str = ".", families: list[str] | None = None, promote: bool = True) -> dict[str, Any]:
    """Run every stage of ``root/dvc.yaml`` (of ``families`` only, when given) in dependency order under one MLflow
    parent run, then gate and register each family's INT8 student (as ``challenger`` only when not ``promote``)."""
    root_path = Path(root).resolve()
    cfg = load_config(root_path / "params.yaml")
    uri = tracking_uri(cfg, root_path)
    families = chosen(cfg, families)
    stages = [node for node in stage_graph(root_path) if node.family in families]
    statuses: dict[str, str] = {}
    with data_lock(root_path, families, cfg.pipeline.data_lock_timeout_seconds), \
            pipeline_run(cfg, "pipeline", root_path) as parent:
        parent.set_tag("pipeline.stages", ",".join(s.name for s in stages))
        env = stage_env(root_path, uri, parent.run_id)
        retrying = run_stage.with_options(retries=cfg.pipeline.retries,
                                          retry_delay_seconds=cfg.pipeline.retry_delays())
        for node in stages:
            statuses[node.name] = retrying(node.name, root_path, env, DATA_DOCS in {Path(o).name for o in node.outs})
            if node.name.startswith("warm_start_") and (unpushed := push_outputs(root_path, env, node.name)):
                # the weights a warm-started model began from, where flows.restore on another machine finds them
                stage_logger()(f"warning: {node.name}'s output is not on the DVC remote: {unpushed}")
        parent.set_tags({f"stage.{name}": status for name, status in statuses.items()})
        metrics = collect_metrics(root_path)
        parent.log_metrics(metrics)
        gates = {family: retrying_promote(cfg)(family, root_path, uri, parent.run_id, promote) for family in families}
        for family, gate in gates.items():
            parent.set_tags({f"gate.{family}.passed": str(gate["passed"]).lower(),
                             f"registry.{family}.version": gate["version"]})
        publish_run(statuses, root_path, families, uri, parent.experiment_id, parent.run_id)
    return {"stages": statuses, "metrics": metrics, "parent_run_id": parent.run_id, "tracking_uri": redact(uri),
            "gates": gates}


def chosen(cfg: Config, families: list[str] | None) -> list[str]:
    """The families a run covers: those given (each one of params.yaml's ``families``), else all of those."""
    unknown = sorted(set(families or ()) - set(cfg.families))
    if unknown:
        raise PipelineError(f"families: unknown {unknown}; choose from {cfg.families} (params.yaml's families)")
    return list(families or cfg.families)


@flow(name="gate-and-register", log_prints=True)
def gate_only(root: str = ".", families: list[str] | None = None) -> dict[str, Any]:
    """Gate and register the families' current candidates without running any stage (after ``dvc repro``)."""
    root_path = Path(root).resolve()
    cfg = load_config(root_path / "params.yaml")
    uri = tracking_uri(cfg, root_path)
    with pipeline_run(cfg, "gate", root_path) as parent:
        gates = {family: retrying_promote(cfg)(family, root_path, uri, parent.run_id) for family in chosen(cfg, families)}
    return {"stages": {}, "metrics": {}, "parent_run_id": parent.run_id, "tracking_uri": redact(uri), "gates": gates}


@task(task_run_name="promote_{family}")
def promote(family: str, root: Path, uri: str, parent_run_id: str, may_promote: bool = True) -> dict[str, Any]:
    """Gate a family's INT8 student and register it (``flows.gating``); registry state is not DVC's to cache."""
    from flows.gating import gate_and_register
    from tasks.mlflow_store import client_for
    from tasks.tracking import child_run

    cfg = load_config(root / "params.yaml")
    client = client_for(uri)
    params = {f"gate.{family}": getattr(cfg.gate, family), f"evaluate.{family}": getattr(cfg.evaluate, family)}
    with child_run(f"promote_{family}", cfg, params, parent_run_id, root, client) as run:
        run.log_data_inputs(f"evaluate_{family}", root, "evaluation")   # the gate scores on evaluate's data
        report = gate_and_register(root, cfg, client, uri, run.run_id, parent_run_id, family, may_promote)
        run.log_metrics({f"gate.{c['name']}": c["value"] for c in report["checks"]})
        run.set_tag("registry.unchanged", str(report["unchanged"]).lower())
        run.set_tags({"gate.passed": str(report["passed"]).lower(), "registry.version": report["version"]})
        if (health := report.get("champion_health")) is not None:
            run.set_tag("champion.health", "degraded" if health["degraded"] else "healthy")
            run.log_metrics({"champion.recent_drop": health["drop"]})
    publish_gate(family, report)
    flag_degraded_champion(family, report)
    return report


def retrying_promote(cfg: Any) -> Any:
    """The promote task with the pipeline's retries for transient failures (a registry that did not answer);
    a retry after a partial registration finds its version by the candidate's hash and changes nothing."""
    return promote.with_options(retries=cfg.pipeline.retries, retry_delay_seconds=cfg.pipeline.retry_delays(),
                                retry_condition_fn=_retry_transient)


def collect_metrics(root: Path) -> dict[str, float]:
    """Every numeric metric of the graph's metrics files, keyed ``<family>.<file>.<name>``."""
    from tasks.tracking import flatten

    found = {}
    for path in sorted((root / "metrics").glob("*/*.json")):
        for key, value in flatten(f"{path.parent.name}.{path.stem}", json.loads(path.read_text())).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                found[key] = value
    return found


def summary(result: dict[str, Any], root: Path) -> str:
    bin_dir = Path(sys.executable).parent
    lines = ["", "=== compression pipeline: done ==="]
    lines += [f"  {stage:<24} {status}" for stage, status in result["stages"].items()]
    suffixes = ("accuracy", "accuracy_fake_quant", "_auc", "_ratio", "ratio_vs_teacher")
    key = [k for k in result["metrics"] if k.endswith(suffixes)
           or ".ratios." in k]
    lines += ["key metrics (all of them are in the MLflow parent run):"]
    lines += [f"  {k:<56} {result['metrics'][k]:.4f}" for k in key]
    for family, gate in result["gates"].items():
        if gate["unchanged"]:
            lines += [f"gate {family}: candidate unchanged, already {gate['name']} version {gate['version']}; "
                      "registry untouched"]
        else:
            lines += [f"gate {family}: {'PASS' if gate['passed'] else 'FAIL'} (reports/{family}/gate.md); registered "
                      f"{gate['name']} version {gate['version']} as challenger"
                      + ("; champion moved to it" if gate["champion"] else "; champion unchanged")]
    lines += [f"results: models/ metrics/ plots/ reports/ under {root}",
              f"MLflow parent run {result['parent_run_id']} in {result['tracking_uri']}",
              "open the MLflow UI:",
              f"  {bin_dir}/mlflow ui --backend-store-uri {result['tracking_uri']} --port 5000",
              "open the Prefect UI (the ephemeral runs are kept in Prefect's local database):",
              f"  {bin_dir}/prefect server start   # then http://127.0.0.1:4200"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the compression pipeline (every stage of dvc.yaml).")
    parser.add_argument("--root", default=".", help="project root holding dvc.yaml and params.yaml")
    parser.add_argument("--family", action="append", dest="families",
                        help="run only this family's stages and gate (repeatable; default: every family)")
    parser.add_argument("--gate-only", action="store_true", help="no stage: gate and register the current outputs")
    parser.add_argument("--no-promote", action="store_true",
                        help="register the candidate as challenger only, even when it passes the gate")
    args = parser.parse_args()
    if args.gate_only and args.no_promote:
        parser.error("--no-promote runs the stages; --gate-only does not")
    result = gate_only(args.root, args.families) if args.gate_only else \
        compression_pipeline(args.root, args.families, not args.no_promote)
    print(summary(result, Path(args.root).resolve()))


if __name__ == "__main__":
    run_cli(main)
