"""Benchmark: the whole pipeline, cold and then with nothing changed, in a scratch copy of the project.

Prints a table (markdown) of per-stage status and wall time from the MLflow child runs, the total wall time of
each ``python -m flows.pipeline`` invocation (Prefect's ephemeral server start included) and each family's teacher:
its test score and training time, against ``--teacher-target`` and ``--teacher-seconds`` where given.
``--out`` also writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from flows.workspace import PROJECT, copy_project
from tasks.config import PARAMS_FILE, Config, check_profile_tracked, load_config
from tasks.errors import ConfigError, run_cli
from tasks.gate import meets
from tasks.tracking import PARENT_ENV

#: what ties a process to the project's tracking store and pipeline run: a scratch copy's runs go to its own
PROJECT_RUN_ENV = ("MLFLOW_TRACKING_URI", PARENT_ENV)


def leave_project_runs() -> None:
    """Drop PROJECT_RUN_ENV from this process's environment (a benchmark in a scratch copy started from a run)."""
    for name in PROJECT_RUN_ENV:
        os.environ.pop(name, None)


def run_pipeline(root: Path, families: list[str] | None = None) -> tuple[float, dict[str, Any]]:
    """Run the pipeline as a user would (``families`` only, when given); return (wall seconds, per-stage info of the
    newest parent run)."""
    env = {k: v for k, v in os.environ.items() if k not in PROJECT_RUN_ENV}
    start = time.perf_counter()
    only = [arg for family in families or [] for arg in ("--family", family)]
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "--root", str(root), *only], cwd=root, env=env)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"pipeline failed in {root} (exit {proc.returncode})")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    parent = client.search_runs(["1"], "tags.`pipeline.launcher` = 'prefect'", order_by=["start_time DESC"])[0]
    statuses = {k.removeprefix("stage."): v for k, v in parent.data.tags.items() if k.startswith("stage.")}
    return wall, {"statuses": statuses, "stage_seconds": stage_seconds(client, parent),
                  "metrics": parent.data.metrics}


def stage_seconds(client: MlflowClient, parent: Run) -> dict[str, float]:
    """Wall seconds of each stage's child run of ``parent``: its newest finished one (a retried stage's failed
    attempts before it are not what the stage took)."""
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  order_by=["start_time DESC"])
    seconds: dict[str, float] = {}
    for run in children:
        if run.info.status == "FINISHED":
            seconds.setdefault(run.data.tags["pipeline.stage"], (run.info.end_time - run.info.start_time) / 1000)
    return seconds


def scratch_copy(dest: Path, profile: str, overrides: dict[str, Any] | None = None, source: Path = PROJECT) -> Path:
    """``source`` copied to ``dest`` on ``profile`` with ``overrides``, tracking into the copy's own SQLite store
    (what a benchmark reads) whatever params.yaml or the profile name: a tracking server of the project would
    get the copy's runs and registrations, promotions included."""
    return copy_project(dest, {"profile": profile, "tracking.uri": None, **(overrides or {})}, source)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def target_rows(targets: tuple[tuple[str, str, float, str], ...], ratios: dict[str, float], digits: int) -> list[str]:
    """The markdown target table of a benchmark: one row per ``(ratio key, ">=" | "<=", threshold, what)``."""
    lines = ["| target | measured | threshold | |", "|---|---:|---:|---|"]
    for key, op, threshold, what in targets:
        value = ratios[key]
        met = meets(value, op, threshold)   # as the gate judges it: within floating-point error counts
        lines.append(f"| {what} | {value:.{digits}f} | {op} {threshold:g} | {'met' if met else 'MISSED'} |")
    return lines


def image_teacher_config(params: Path, family: str) -> Config:
    """``params`` loaded, for a benchmark of ``family``'s trained image teacher: a ConfigError unless the family is
    an image family of it whose teacher has an architecture of its own (not an imported one)."""
    from tasks.images.arch_config import ResNetArch

    cfg = load_config(params)
    if family not in cfg.families or not isinstance(getattr(cfg.block("teacher", family), "arch", None), ResNetArch):
        raise ConfigError(f"{params}: --family {family} is no image family with a teacher architecture of its own "
                          f"(families: {', '.join(cfg.families)})")
    return cfg


def write_result(out: Path, doc: dict) -> None:
    """A benchmark's numbers as JSON, with the date and the machine they came from."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "machine": machine(), **doc}, indent=2) + "\n")


def teacher_rows(cold: dict, scores: dict[str, str], targets: dict[str, float], seconds: dict[str, float]
                 ) -> list[str]:
    """A row per family whose teacher stage ran: its test score (``<family>.teacher.test_<metric>`` of the parent
    run, ``metric`` its gate's: ``scores``) and its training stage's wall time, each against the family's target
    when there is one."""
    def verdict(met: bool | None) -> str:
        return "" if met is None else "met" if met else "MISSED"

    lines = ["", "| family | teacher test score | target | | training stage wall (s) | target | | parameters |",
             "|---|---:|---:|---|---:|---:|---|---:|"]
    for stage in cold["statuses"]:
        if not stage.startswith("train_teacher_"):
            continue
        family = stage.removeprefix("train_teacher_")
        metric = scores.get(family, "score")
        score = cold["metrics"].get(f"{family}.teacher.test_{metric}", float("nan"))
        wall = cold["stage_seconds"].get(stage, float("nan"))
        floor, limit = targets.get(family), seconds.get(family)
        lines.append(
            f"| {family} | {metric} {score:.4f} | "
            f"{'' if floor is None else f'≥ {floor:.4f}'} | "
            f"{verdict(None if floor is None else meets(score, '>=', floor))} | "
            f"{wall:.0f} | {'' if limit is None else f'≤ {limit:.0f}'} | "
            f"{verdict(None if limit is None else meets(wall, '<=', limit))} | "
            f"{cold['metrics'].get(f'{family}.teacher.parameters', 0):,.0f} |")
    return lines


def table(cold: tuple[float, dict], warm: tuple[float, dict], scores: dict[str, str],
          targets: dict[str, float] | None = None, seconds: dict[str, float] | None = None) -> str:
    lines = [f"Pipeline benchmark, {date.today()}, {machine()}", "",
             "| stage | cold run | stage wall (s) | re-run, nothing changed |", "|---|---|---:|---|"]
    for stage, status in cold[1]["statuses"].items():
        wall = cold[1]["stage_seconds"].get(stage)
        shown = "–" if wall is None else f"{wall:.1f}"   # a stage that tracks no run of its own
        lines.append(f"| {stage} | {status} | {shown} | {warm[1]['statuses'].get(stage)} |")
    lines.append(f"| **whole `python -m flows.pipeline`** | | **{cold[0]:.1f}** | **{warm[0]:.1f} s** |")
    return "\n".join([*lines, *teacher_rows(cold[1], scores, targets or {}, seconds or {})])


def family_values(pairs: list[str], option: str, families: list[str]) -> dict[str, float]:
    """``["vision=0.95", ...]`` as ``{"vision": 0.95}``; anything else (a family not of ``families``, a number that
    is not finite: a target nothing meets) is a one-line error naming the option."""
    found = {}
    for pair in pairs:
        family, _, value = pair.partition("=")
        try:
            found[family] = float(value)
        except ValueError:
            family = ""
        if not family or not math.isfinite(found[family]):
            raise SystemExit(f"{option} {pair!r}: expected FAMILY=NUMBER, a finite number")
        if family not in families:
            raise ConfigError(f"{option} {pair!r}: {family} is not one of families {families}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="full", help="params profile for the scratch copy (default: full)")
    parser.add_argument("--family", action="append", dest="families",
                        help="run only this family's stages (repeatable; default: every family)")
    parser.add_argument("--teacher-target", action="append", default=[], metavar="FAMILY=SCORE",
                        help="the teacher's test score to reach (repeatable), e.g. <family>=0.95")
    parser.add_argument("--teacher-seconds", action="append", default=[], metavar="FAMILY=SECONDS",
                        help="the teacher stage's wall time to stay within (repeatable), e.g. <family>=900")
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args()
    mine = load_config(PROJECT / PARAMS_FILE, args.profile)   # the params the scratch copy is made from
    check_profile_tracked(mine, PROJECT / PARAMS_FILE)   # as its stages would in the copy, once it is made
    # checked before anything is copied or run
    if unknown := [f for f in args.families or [] if f not in mine.families]:
        raise ConfigError(f"--family {unknown[0]} is not one of families {mine.families}")
    targets = family_values(args.teacher_target, "--teacher-target", mine.families)
    seconds = family_values(args.teacher_seconds, "--teacher-seconds", mine.families)
    with tempfile.TemporaryDirectory(prefix="kdq-bench-") as tmp:
        root = scratch_copy(Path(tmp) / "project", args.profile)
        cfg = load_config(root / "params.yaml")
        scores = {family: cfg.block("gate", family).metric for family in cfg.families}
        cold, warm = run_pipeline(root, args.families), run_pipeline(root, args.families)
    print(table(cold, warm, scores, targets, seconds))
    if args.out:
        write_result(args.out, {"profile": args.profile, "cold": {"wall_seconds": cold[0], **cold[1]},
                                "warm": {"wall_seconds": warm[0], **warm[1]}})


if __name__ == "__main__":
    run_cli(main)
