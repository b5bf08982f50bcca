"""The compression pipeline as a Prefect flow: one task per stage of dvc.yaml, each run through ``dvc repro``
unless DVC found it up to date when the run started.

Running a stage through DVC keeps one source of truth for caching: a stage whose deps, params and outputs are
unchanged is skipped by the flow as by ``dvc repro``. DVC is asked once, at the start, which stages are out of date;
those and every stage downstream of them go through ``dvc repro --single-item``, the others are ``cached`` without a
DVC process of their own. DVC is asked again before the gates: a param, code or data edited while the run went on
gates and registers nothing.
The flow owns the MLflow parent run; each stage process logs a child run under it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.futures import PrefectFuture, as_completed

from flows.dvc_stage import (
    out_of_date,
    push_versioned,
    retry_transient,
    run_node,
    stage_env,
    stale_stages,
    stop_running,
)
from flows.registry_lock import data_lock
from flows.run_artifacts import flag_degraded_champion, mlflow_ui_command, publish_gate, publish_run
from flows.stage_graph import StageNode, below, stage_graph, stage_paths, upstream_of
from tasks.config import Config, check_profile_tracked, load_config
from tasks.errors import PipelineError, run_cli
from tasks.lineage import dvc_lock_text, remade_since
from tasks.mlflow_store import redact, tracking_uri
from tasks.tracking import pipeline_run


@flow(name="compression-pipeline", log_prints=True)
def compression_pipeline(root: str = ".", families: list[str] | None = None, promote: bool = True) -> dict[str, Any]:
    """Run every stage of ``root/dvc.yaml`` (of ``families`` only, when given) in dependency order under one MLflow
    parent run, then gate and register each family's INT8 student (as ``challenger`` only when not ``promote``) —
    unless DVC finds a stage out of date by then (an edit while the run went on): then nothing is gated."""
    root_path = Path(root).resolve()
    cfg = load_config(root_path / "params.yaml")
    check_profile_tracked(cfg, root_path / "params.yaml")   # (the CLI's preflight too; a deployment calls this)
    uri = tracking_uri(cfg, root_path)
    families = chosen(cfg, families)
    stages = [node for node in stage_graph(root_path) if node.family in families]
    with data_lock(root_path, families, cfg.pipeline.data_lock_timeout_seconds), \
            pipeline_run(cfg, "pipeline", root_path) as parent:
        parent.set_tag("pipeline.stages", ",".join(s.name for s in stages))
        env = stage_env(root_path, uri, parent.run_id)
        wait = cfg.pipeline.data_lock_timeout_seconds   # for DVC's lock, held a moment by a stage beside this one

        stale, finished = stale_stages(root_path, stages), []

        def push_made() -> None:   # the data versions and warm starts made, on the DVC remote: after the graph, never
            for stage in finished:   # beside a running stage (a push holds DVC's lock while it uploads)
                push_versioned(root_path, env, stage, wait)

        try:
            statuses = run_graph(stages, cfg.pipeline.parallel_stages, lambda node: run_node(
                cfg, node, root_path, env, unchanged=node.name not in stale, submit=True), finished.append)
        except Exception:   # a stage failed once the others ended (not on an interrupt: stages may still run)
            with contextlib.suppress(Exception):   # the stage's failure is what the run reports
                push_made()
            raise
        except BaseException:   # interrupted (Ctrl-C, a cancelled run: the main thread only): the stages' DVC
            stop_running()      # commands end before the data lock is given back (worker threads still read them)
            raise
        push_made()
        parent.set_tags({f"stage.{name}": status for name, status in statuses.items()})
        metrics = collect_metrics(root_path, families)
        parent.log_metrics(metrics)
        # what is gated was made of one set of params, code and data: each stage read them as it started, so an
        # edit while the run went on leaves candidates no params make (the gate reads params.yaml as it is now)
        try:
            changed = out_of_date(root_path, [s.name for s in stages], wait)
        except PipelineError as err:   # of its kind: DVC's lock busy is transient
            raise type(err)(f"{root_path}: nothing gated or registered: whether params, code or data changed while "
                            f"the pipeline ran is unknown ({err}); run it again (what ran is cached)") from err
        if changed:
            raise PipelineError(f"{root_path}: params, code or data changed while the pipeline ran: DVC finds "
                                f"{', '.join(s.name for s in stages if s.name in changed)} out of date; nothing "
                                "gated or registered; run the pipeline again")
        gates = {family: retrying_promote(cfg)(family, root_path, uri, parent.run_id, promote) for family in families}
        for family, gate in gates.items():
            parent.set_tags({f"gate.{family}.passed": str(gate["passed"]).lower(),
                             f"registry.{family}.version": gate["version"]})
        publish_run(statuses, root_path, families, uri, parent.experiment_id, parent.run_id)
    return {"stages": statuses, "metrics": metrics, "parent_run_id": parent.run_id, "tracking_uri": redact(uri),
            "gates": gates}


def run_graph(stages: list[StageNode], width: int, submit: Callable[[StageNode], PrefectFuture],
              finished: Callable[[str], None]) -> dict[str, str]:
    """Run ``stages`` (in graph order), at most ``width`` at a time, each once every stage it depends on has
    finished and, unless it is one of them, once every validation stage has (bad data stops a run before any
    training); ``finished(stage)`` after each. Return each stage's status. After a failure no stage starts; those
    running finish, then the first failure is raised. With ``width`` 1 the stages run one by one in graph order."""
    names, checks = {s.name for s in stages}, {s.name for s in stages if s.checks}
    waiting, running, statuses = list(stages), {}, {}
    failure: BaseException | None = None
    while waiting or running:
        while failure is None and len(running) < width:
            ready = next((s for s in waiting if all(u in statuses for u in s.upstream if u in names)
                          and (s.checks or checks <= statuses.keys())), None)
            if ready is None:
                break
            waiting.remove(ready)
            running[ready.name] = submit(ready)
        if not running:
            break
        done = next(as_completed(list(running.values())))
        stage = next(name for name, future in running.items() if future is done)
        del running[stage]
        try:
            statuses[stage] = done.result()
            finished(stage)
        except Exception as err:  # noqa: BLE001 - raised once the running stages have finished
            failure = failure or err
    if failure is not None:
        raise failure
    return statuses


def chosen(cfg: Config, families: list[str] | None) -> list[str]:
    """The families a run covers, each once (``--family vision --family vision`` asked its data lock twice and
    gated it twice): those given (each one of params.yaml's ``families``), else all of those."""
    unknown = sorted(set(families or ()) - set(cfg.families))
    if unknown:
        raise PipelineError(f"families: unknown {unknown}; choose from {cfg.families} (params.yaml's families)")
    return list(dict.fromkeys(families or cfg.families))


@flow(name="gate-and-register", log_prints=True)
def gate_only(root: str = ".", families: list[str] | None = None) -> dict[str, Any]:
    """Gate and register the families' current candidates without running any stage (after ``dvc repro``); none
    when nothing was evaluated yet (no evaluation file), dvc.lock says a stage upstream of one ran again
    after it was made (``tasks.lineage.remade_since``), or DVC finds one of the stages that make it out of date (a
    param, code or data changed since)."""
    root_path = Path(root).resolve()
    cfg = load_config(root_path / "params.yaml")
    uri = tracking_uri(cfg, root_path)
    families = chosen(cfg, families)
    # the data it scores on stays as it is meanwhile (a pipeline run or an ingestion would rewrite it), as in a run
    with data_lock(root_path, families, cfg.pipeline.data_lock_timeout_seconds):
        lock_text = dvc_lock_text(root_path)
        nodes: list[StageNode] = []
        wait = cfg.pipeline.data_lock_timeout_seconds   # for DVC's lock: held a moment by another family's stage
        for family in families:   # what is gated is what its stages made of today's inputs, or nothing is
            if remade := remade_since(f"evaluate_{family}", lock_text):
                raise PipelineError(f"--gate-only: {root_path / 'dvc.lock'}: {family}'s candidate was made from "
                                    f"inputs remade since: {'; '.join(remade)}; run its stages first (`dvc repro` or "
                                    "the pipeline)")
            # and of today's params and code: the version records them (params.hash, lineage/params.yaml). No stage
            # recorded (no dvc.lock: a copy of a project, its candidate evaluated): nothing to tell what made it
            making = [] if lock_text is None else upstream_of(nodes := nodes or stage_graph(root_path),
                                                              f"evaluate_{family}")
            if making and (stale := below(making, out_of_date(root_path, [n.name for n in making], wait))):
                raise PipelineError(f"--gate-only: {family}'s candidate is not what its stages make of today's params, "
                                    f"code and data: DVC finds {', '.join(n.name for n in making if n.name in stale)} "
                                    "out of date; run them first (`dvc repro` or the pipeline)")
            if not (root_path / (evaluation := stage_paths(root_path, f"evaluate_{family}")["metrics"])).is_file():
                raise unevaluated(root_path, family, evaluation)   # with or without a dvc.lock
        with pipeline_run(cfg, "gate", root_path) as parent:
            gates = {family: retrying_promote(cfg)(family, root_path, uri, parent.run_id) for family in families}
    return {"stages": {}, "metrics": {}, "parent_run_id": parent.run_id, "tracking_uri": redact(uri), "gates": gates}


def unevaluated(root: Path, family: str, missing: Path) -> PipelineError:
    """``--gate-only`` with no candidate evaluated to gate (before: the gate's FileNotFoundError, retried twice)."""
    return PipelineError(f"--gate-only: {root}: nothing evaluated yet for {family} (no {missing}): run `dvc repro "
                         f"evaluate_{family}` or the pipeline")


@task(task_run_name="promote_{family}")
def promote(family: str, root: Path, uri: str, parent_run_id: str, may_promote: bool = True) -> dict[str, Any]:
    """Gate a family's INT8 student and register it (``flows.gating``); registry state is not DVC's to cache."""
    from flows.gating import gate_and_register
    from tasks.mlflow_store import client_for
    from tasks.tracking import child_run

    cfg = load_config(root / "params.yaml")
    client = client_for(uri)
    params = {f"gate.{family}": cfg.block("gate", family), f"evaluate.{family}": cfg.block("evaluate", family)}
    with child_run(f"promote_{family}", cfg, params, parent_run_id, root, client) as run:
        run.log_data_inputs(f"evaluate_{family}", root, "evaluation")   # the gate scores on evaluate's data
        report = gate_and_register(root, cfg, client, uri, run.run_id, parent_run_id, family, may_promote)
        metrics, tags = gate_record(report)
        run.log_metrics(metrics)
        run.set_tags(tags)
    publish_gate(family, report)
    flag_degraded_champion(family, report)
    return report


def gate_record(report: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """What the promote run logs of a gate ``report``: each check's value (not the one that compared nothing with
    no champion, or one not compared: a 0.0 there read as "no drop"), and the champion's health as the report says
    it, "not judged" included (before: tagged healthy, its unmeasured drop logged as measured)."""
    metrics = {f"gate.{c['name']}": c["value"] for c in report["checks"] if c.get("compared", True)}
    tags = {"registry.unchanged": str(report["unchanged"]).lower(), "gate.passed": str(report["passed"]).lower(),
            "registry.version": report["version"]}
    if (health := report.get("champion_health")) is not None:
        tags["champion.health"] = ("not judged" if not health["compared"] else
                                   "degraded" if health["degraded"] else "healthy")
        if health["compared"]:
            metrics["champion.recent_drop"] = health["drop"]
    return metrics, tags


def retrying_promote(cfg: Any) -> Any:
    """The promote task with the pipeline's retries for transient failures (a registry that did not answer);
    a retry finds its version by the candidate's hash: registered in part, it is gated and registered again
    (``flows.gating._interrupted``); complete, the retry reports that registration and changes nothing."""
    return promote.with_options(retries=cfg.pipeline.retries, retry_delay_seconds=cfg.pipeline.retry_delays(),
                                retry_condition_fn=retry_transient)


def collect_metrics(root: Path, families: list[str]) -> dict[str, float]:
    """Every numeric metric of the metrics files of ``families`` (those a run covers: another family's files are
    another run's), keyed ``<family>.<file>.<name>``."""
    from tasks.tracking import flatten

    found = {}
    for path in sorted(p for family in families for p in (root / "metrics" / family).glob("*.json")):
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
              f"  {mlflow_ui_command(result['tracking_uri'], str(bin_dir / 'mlflow'))} --port 5000",
              "open the Prefect UI (the ephemeral runs are kept in Prefect's local database):",
              f"  {shlex.join([str(bin_dir / 'prefect'), 'server', 'start'])}   # then http://127.0.0.1:4200"]
    return "\n".join(lines)


def preflight(root: Path, families: list[str] | None, gate_only: bool = False) -> None:
    """What a run refuses before it starts anything: no params.yaml (a root that is no project), a family it does not
    name, and for a run of the stages a profile dvc.yaml does not track or a dvc.yaml DVC cannot read. The CLI checks
    them before the flow starts Prefect (a temporary server, ~15 s, then the refusal's traceback in its log); the
    flows check them again (a deployment calls them directly)."""
    cfg = load_config(root / "params.yaml")
    chosen(cfg, families)
    if not gate_only:
        check_profile_tracked(cfg, root / "params.yaml")
        stage_graph(root)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the compression pipeline (every stage of dvc.yaml).")
    parser.add_argument("--root", default=".", help="project root holding dvc.yaml and params.yaml")
    parser.add_argument("--family", action="append", dest="families",
                        help="run only this family's stages and gate (repeatable; default: every family)")
    parser.add_argument("--gate-only", action="store_true",
                        help="no stage: gate and register the current outputs (refused when dvc.lock records an "
                             "input of the candidate remade since it was made)")
    parser.add_argument("--no-promote", action="store_true",
                        help="register the candidate as challenger only, even when it passes the gate")
    args = parser.parse_args()
    if args.gate_only and args.no_promote:
        parser.error("--no-promote runs the stages; --gate-only does not")
    preflight(Path(args.root).resolve(), args.families, args.gate_only)
    result = gate_only(args.root, args.families) if args.gate_only else \
        compression_pipeline(args.root, args.families, not args.no_promote)
    print(summary(result, Path(args.root).resolve()))


if __name__ == "__main__":
    run_cli(main)
