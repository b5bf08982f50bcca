"""Benchmark: the whole pipeline, cold and then with nothing changed, in a scratch copy of the project.

Prints a table (markdown) of per-stage status and wall time from the MLflow child runs, the total wall time of
each ``python -m flows.pipeline`` invocation (Prefect's ephemeral server start included) and the teacher's
result against its targets. ``--out`` also writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
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
from mlflow.tracking import MlflowClient

from flows.workspace import copy_project

TARGET_ACCURACY, TARGET_SECONDS = 0.94, 600.0


def run_pipeline(root: Path, families: list[str] | None = None) -> tuple[float, dict[str, Any]]:
    """Run the pipeline as a user would (``families`` only, when given); return (wall seconds, per-stage info of the
    newest parent run)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PIPELINE_PARENT_RUN_ID")}
    start = time.perf_counter()
    only = [arg for family in families or [] for arg in ("--family", family)]
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "--root", str(root), *only], cwd=root, env=env)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"pipeline failed in {root} (exit {proc.returncode})")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    parent = client.search_runs(["1"], "tags.`pipeline.launcher` = 'prefect'", order_by=["start_time DESC"])[0]
    children = client.search_runs(["1"], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    stages = {r.data.tags["pipeline.stage"]: (r.info.end_time - r.info.start_time) / 1000 for r in children}
    statuses = {k.removeprefix("stage."): v for k, v in parent.data.tags.items() if k.startswith("stage.")}
    return wall, {"statuses": statuses, "stage_seconds": stages, "metrics": parent.data.metrics}


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def target_rows(targets: tuple[tuple[str, str, float, str], ...], ratios: dict[str, float], digits: int) -> list[str]:
    """The markdown target table of a benchmark: one row per ``(ratio key, ">=" | "<=", threshold, what)``."""
    lines = ["| target | measured | threshold | |", "|---|---:|---:|---|"]
    for key, op, threshold, what in targets:
        value = ratios[key]
        met = value >= threshold if op == ">=" else value <= threshold
        lines.append(f"| {what} | {value:.{digits}f} | {op} {threshold:g} | {'met' if met else 'MISSED'} |")
    return lines


def write_result(out: Path, doc: dict) -> None:
    """A benchmark's numbers as JSON, with the date and the machine they came from."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "machine": machine(), **doc}, indent=2) + "\n")


def table(cold: tuple[float, dict], warm: tuple[float, dict]) -> str:
    lines = [f"Pipeline benchmark, {date.today()}, {machine()}", "",
             "| stage | cold run | stage wall (s) | re-run, nothing changed |", "|---|---|---:|---|"]
    for stage, status in cold[1]["statuses"].items():
        seconds = cold[1]["stage_seconds"].get(stage)
        wall = "–" if seconds is None else f"{seconds:.1f}"   # a stage that tracks no run of its own
        lines.append(f"| {stage} | {status} | {wall} | {warm[1]['statuses'].get(stage)} |")
    lines.append(f"| **whole `python -m flows.pipeline`** | | **{cold[0]:.1f}** | **{warm[0]:.1f} s** |")
    m = cold[1]["metrics"]
    acc, train_s = m.get("vision.teacher.test_accuracy", float("nan")), cold[1]["stage_seconds"].get("train_teacher_vision", 0)
    lines += ["", "| teacher | measured | target | |", "|---|---:|---:|---|",
              f"| test accuracy | {acc:.4f} | ≥ {TARGET_ACCURACY:.4f} | {'met' if acc >= TARGET_ACCURACY else 'MISSED'} |",
              f"| training stage wall (s) | {train_s:.0f} | ≈ {TARGET_SECONDS:.0f} | {'met' if train_s <= TARGET_SECONDS * 1.1 else 'MISSED'} |",
              f"| parameters | {m.get('vision.teacher.parameters', 0):,.0f} | | |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="full", help="params profile for the scratch copy (default: full)")
    parser.add_argument("--family", action="append", dest="families",
                        help="run only this family's stages (repeatable; default: every family)")
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdq-bench-") as tmp:
        root = copy_project(Path(tmp) / "project", {"profile": args.profile})
        cold, warm = run_pipeline(root, args.families), run_pipeline(root, args.families)
    print(table(cold, warm))
    if args.out:
        write_result(args.out, {"profile": args.profile, "cold": {"wall_seconds": cold[0], **cold[1]},
                                "warm": {"wall_seconds": warm[0], **warm[1]}})


if __name__ == "__main__":
    main()
