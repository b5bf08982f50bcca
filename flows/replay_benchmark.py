"""Benchmark: a family's published data replayed as it arrived, batch by batch, through the continuous-training path.

In a scratch copy of the project whose snapshot starts empty, ``flows.replay`` cuts the data into batches (for the
recommender: MovieLens-100K's oldest half, then a batch a week); each batch lands and ``continuous_training`` (the
``continuous-<family>`` deployment's flow) ingests it, retrains the family and gates it. Per batch the table gives
the rows accepted, the challenger's and the champion's score on the recent window (the newest batch's test rows,
which no model trained on) and on the golden window (the first batch's test rows), the gate's decision and the wall
time of the run. ``--out`` writes the numbers as JSON, ``--plot`` the scores per batch as a PNG.

    python -m flows.replay_benchmark --family recsys --out reports/benchmarks/replay_recsys.json \\
        --plot docs/figures/replay_recsys.png
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from flows.benchmark import machine, write_result
from flows.workspace import copy_project
from tasks.config import load_config
from tasks.intake import load_intake


def _scores(report: dict[str, Any], metric: str) -> dict[str, float | None]:
    """The challenger's and the champion's score on each window, as the gate compared them (a champion of an older
    vocabulary and the challenger on the rows it can read)."""
    champion = report.get("champion_before")
    mine = (champion or {}).get("candidate", report.get("candidate") or {})

    def window(scores: dict[str, Any] | None, name: str) -> float | None:
        value = (scores or {}).get(f"{name}_{metric}")
        return float(value) if value is not None else None

    return {**{f"{who}_{name}": window(scores, name) for who, scores in (("challenger", mine), ("champion", champion))
               for name in ("recent", "golden")},
            "recent_rows": int(mine.get("recent_rows", 0))}   # what both were scored on (the rows the champion reads)


def replay_benchmark(family: str, profile: str, batches: int | None, work: Path,
                     out: Path | None = None) -> list[dict[str, Any]]:
    """Replay ``family`` batch by batch in a scratch copy under ``work``; one row per batch (also written to ``out``
    after each batch, so a failure keeps what was measured)."""
    from flows.ingest import continuous_training

    root = copy_project(work / "project", {"profile": profile, f"ingest.{family}.bootstrap": "empty"})
    cfg = load_config(root / "params.yaml")
    metric = getattr(cfg.gate, family).metric
    released = load_intake(family).replay(cfg, work / "released")[:batches]
    landing = root / "landing"
    landing.mkdir()
    rows = []
    for folder in released:
        shutil.copytree(folder, landing / folder.name)
        start = time.perf_counter()
        result = continuous_training(str(root), family, str(landing))
        seconds = time.perf_counter() - start
        outcome = next((o for o in result["ingested"] if o["batch"] == folder.name),
                       {"status": "missing", "reason": "ingest reported nothing of it"})
        snapshot = json.loads((root / "data" / family / "raw" / "snapshot.json").read_text())
        entry = next((b for b in snapshot["batches"] if b["id"] == folder.name), {})
        report = (result["pipeline"] or {}).get("gates", {}).get(family) or {}
        health = report.get("champion_health") or {}
        failed = [c["name"] for c in report.get("checks", []) if not c["passed"]]
        decision = ("not trained" if not report else "unchanged" if report.get("unchanged") else
                    "promoted" if report.get("champion") else
                    f"kept v{report['champion_before']['version']}" if report.get("champion_before") else
                    "no champion")
        rows.append({"batch": folder.name, "rows": entry.get("rows", {}), "status": outcome["status"],
                     "reason": outcome["reason"], "seconds": round(seconds, 1), "version": report.get("version"),
                     "decision": decision, "failed_checks": failed,
                     "champion_health": "" if not health else "not judged" if not health["compared"] else
                     "degraded" if health["degraded"] else "healthy",
                     **_scores(report, metric)})
        print(table(rows[-1:], metric, header=False), flush=True)
        if out:
            write_result(out, {"family": family, "profile": profile, "policy": "scratch", "batches": rows})
    return rows


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def table(rows: list[dict[str, Any]], metric: str, header: bool = True) -> str:
    head = (f"| batch | rows | challenger {metric} recent | champion {metric} recent | recent rows compared | "
            f"challenger {metric} golden | champion {metric} golden | decision | failed checks | champion health | s |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---|---|---|---:|"] if header else []
    for r in rows:
        size = ", ".join(f"{k} {v:,}" for k, v in r["rows"].items()) or "–"
        lines.append(f"| {r['batch']} | {size} | {_fmt(r['challenger_recent'])} | {_fmt(r['champion_recent'])} | "
                     f"{r['recent_rows'] or '–'} | {_fmt(r['challenger_golden'])} | {_fmt(r['champion_golden'])} | {r['decision']} | "
                     f"{', '.join(r['failed_checks']) or '–'} | {r['champion_health'] or '–'} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], metric: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    x = list(range(len(rows)))
    for ax, window in zip(axes, ("recent", "golden"), strict=True):
        for who, style in (("challenger", "o-"), ("champion", "s--")):
            ys = [r[f"{who}_{window}"] for r in rows]
            ax.plot([i for i, y in zip(x, ys, strict=True) if y is not None], [y for y in ys if y is not None], style,
                    label=who)
        for i, r in enumerate(rows):
            if r["decision"] == "promoted":
                ax.axvline(i, color="green", alpha=0.15)
        ax.set_title(f"{window} window")
        ax.set_xticks(x, [r["batch"].split("-", 1)[-1] for r in rows], rotation=60, fontsize=7)
        ax.set_xlabel("batch (green: champion moved)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--family", required=True)
    parser.add_argument("--profile", default="full", help="params profile of the scratch copy (default: full)")
    parser.add_argument("--batches", type=int, help="replay only the first N batches (default: all)")
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    parser.add_argument("--plot", type=Path, help="also draw the scores per batch into this PNG")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it, instead of a temporary one")
    args = parser.parse_args()
    for name in ("MLFLOW_TRACKING_URI", "PIPELINE_PARENT_RUN_ID"):   # the scratch copy's own store, its own runs
        os.environ.pop(name, None)
    with tempfile.TemporaryDirectory(prefix="kdq-replay-") as tmp:
        work = args.keep or Path(tmp)
        started = time.perf_counter()
        rows = replay_benchmark(args.family, args.profile, args.batches, work, args.out)
        total = time.perf_counter() - started
        metric = getattr(load_config(work / "project" / "params.yaml").gate, args.family).metric
    title = f"{args.family} replay ({args.profile} profile), {date.today()}, {machine()}"
    print(f"\n{title}\n\n{table(rows, metric)}\n\n{len(rows)} batches in {total:.0f} s; champion moved "
          f"{sum(r['decision'] == 'promoted' for r in rows)} times")
    if args.out:
        write_result(args.out, {"family": args.family, "profile": args.profile, "policy": "scratch",
                                "seconds": round(total, 1), "batches": rows})
    if args.plot:
        plot(rows, metric, args.plot, f"{args.family} replay, {args.profile} profile")


if __name__ == "__main__":
    main()
