"""Benchmark of the recipe sweep's parallelism: the same smoke-sized recipes with 1 and with N Dask workers.

Runs in a scratch copy of the project on the smoke profile (its upstream stages run once, before the first sweep,
and are not timed); each sweep times its recipe phase (LocalCluster start, every recipe, cluster shutdown). Every
worker is one single-threaded process and every recipe's stages use one torch thread, so the ratio measures how
well recipes spread over workers, the target being >= 1.7x with 2 workers on 2 cores.

    python -m flows.sweep_benchmark [--family F] [--recipes 8] [--workers 2] [--out reports/benchmarks/sweep.json]

``--family``: any family of params.yaml with a ``sweep.space.<family>``; by default ``sweep.family``.
"""
from __future__ import annotations

import argparse
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

from flows.benchmark import leave_project_runs, machine, scratch_copy, target_rows, write_result
from flows.sweep import positive, recipe_sweep, swept_family
from flows.workspace import PROJECT
from tasks.config import load_config
from tasks.errors import run_cli

TARGET = (("speedup", ">=", 1.7, "recipe phase, 1 worker / N workers"),)


def timed_sweep(root: Path, family: str, recipes: int, workers: int) -> dict[str, Any]:
    result = recipe_sweep(str(root), family, None, workers, recipes, register_best=False)
    ok = [o for o in result["outcomes"] if o["status"] == "ok"]
    return {"workers": workers, "seconds": result["recipes_seconds"], "recipes": len(result["outcomes"]),
            "ok": len(ok), "failed": len(result["outcomes"]) - len(ok), "pareto": result["pareto"]}


def sweep_copy(dest: Path, source: Path = PROJECT) -> Path:
    """``source`` copied to ``dest`` on the smoke profile, its recipes on a LocalCluster of the benchmark's workers
    (a scheduler named by ``sweep.address`` would run both sweeps on one cluster, whose workers cannot see ``dest``)
    and tracked in the copy's own store."""
    return scratch_copy(dest, "smoke", {"sweep.address": None}, source)


def table(runs: list[dict[str, Any]], family: str) -> str:
    """Each sweep's row, its time per recipe over the recipes it ran (a grid may hold fewer than were asked)."""
    base, ran = runs[0]["seconds"], runs[0]["recipes"]
    lines = [(f"Sweep benchmark, {date.today()}, {machine()}; {ran} smoke-profile {family} recipes, "
              "Dask LocalCluster of single-threaded worker processes"), "",
             "| workers | recipes ok | failed | recipe phase (s) | s per recipe | speed-up |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['workers']} | {r['ok']} | {r['failed']} | {r['seconds']:.1f} | "
                     f"{r['seconds'] / max(r['recipes'], 1):.1f} | {base / r['seconds']:.2f}x |")
    lines += ["", *target_rows(TARGET, {"speedup": base / runs[-1]["seconds"]}, 2)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", help="default: sweep.family of params.yaml")
    # at least 1 each, refused as they are read: `--workers 0` ran a whole 1-worker sweep before its second sweep
    # refused it
    parser.add_argument("--recipes", type=positive, default=8)
    parser.add_argument("--workers", type=positive, default=2)
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args()
    cfg = load_config(Path("params.yaml"))
    args.family = swept_family(cfg, args.family)
    leave_project_runs()   # the scratch copy's own store, its own runs
    with tempfile.TemporaryDirectory(prefix="kdq-sweep-bench-") as tmp:
        root = sweep_copy(Path(tmp) / "project")
        runs = [timed_sweep(root, args.family, args.recipes, w) for w in (1, args.workers)]
    print(table(runs, args.family))
    if args.out:
        write_result(args.out, {"family": args.family, "recipes": args.recipes, "runs": runs,
                                "speedup": runs[0]["seconds"] / runs[-1]["seconds"]})


if __name__ == "__main__":
    run_cli(main)
