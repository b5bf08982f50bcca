"""Benchmark: a family's published data replayed as it arrived, batch by batch, through the continuous-training path.

In a scratch copy of the project whose snapshot starts empty, ``flows.replay`` cuts the data into batches (for the
recommender: MovieLens-100K's oldest half, then a batch a week); each batch lands and ``continuous_training`` (the
``continuous-<family>`` deployment's flow) ingests it, retrains the family and gates it. Per batch the table gives
the rows accepted, where training started (``warm_start.<family>``'s plan: the teacher and the student from scratch,
fine-tuned from the champion's, or the champion's teacher reused), the challenger's and the champion's score on the
recent window (the newest batch's test rows, which no model trained on) and on the golden window (the first batch's
test rows), the gate's decision and the wall time of the run. Each ``--policy`` (a training policy:
``scratch`` or ``fine_tune``, optionally ``,teacher_every=K``) replays the same batches in a copy of its own, one
after the other; a last table compares them. ``--out`` writes the numbers as JSON, ``--plot`` the scores per batch.

    python -m flows.replay_benchmark --family recsys --policy scratch --policy fine_tune,teacher_every=4 \\
        --out reports/benchmarks/replay_recsys.json --plot docs/figures/replay_recsys.png
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from flows.benchmark import leave_project_runs, machine, scratch_copy, write_result
from flows.workspace import PROJECT
from tasks.config import PARAMS_FILE, check_profile_tracked, load_config
from tasks.errors import ConfigError, PipelineError, run_cli
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
            # what a policy is chosen on: the challenger's validation score (the windows are test rows: reported)
            "challenger_val": window(report.get("candidate"), "val"),
            "recent_rows": int(mine.get("recent_rows", 0))}   # what both were scored on (the rows the champion reads)


def parse_policy(text: str) -> dict[str, Any]:
    """``fine_tune,teacher_every=4`` -> ``{"policy": "fine_tune", "teacher_every": 4}``."""
    name, *rest = text.split(",")
    policy: dict[str, Any] = {"policy": name.strip(), "teacher_every": 1}
    for item in rest:
        key, _, value = item.partition("=")
        if key.strip() != "teacher_every" or not value.strip().isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: expected scratch|fine_tune[,teacher_every=K], K >= 1")
        policy["teacher_every"] = int(value)
    if policy["policy"] not in ("scratch", "fine_tune"):
        raise argparse.ArgumentTypeError(f"{text!r}: the policy is scratch or fine_tune")
    return policy


def policy_name(policy: dict[str, Any]) -> str:
    return policy["policy"] + (f", teacher every {policy['teacher_every']}" if policy["teacher_every"] > 1 else "")


def replay_benchmark(family: str, profile: str, batches: int | None, work: Path, policy: dict[str, Any],
                     record: Any = None) -> list[dict[str, Any]]:
    """Replay ``family`` batch by batch in a scratch copy under ``work`` trained by ``policy``; one row per batch
    (``record(rows)`` after each batch, so a failure keeps what was measured)."""
    from flows.ingest import continuous_training

    root = scratch_copy(work / "project", profile, {f"ingest.{family}.bootstrap": "empty",
                                                    **{f"warm_start.{family}.{k}": v for k, v in policy.items()}})
    cfg = load_config(root / "params.yaml")
    metric = cfg.block("gate", family).metric
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
        plan_file = root / "models" / family / "warm_start" / "plan.json"
        plan = json.loads(plan_file.read_text()) if report and plan_file.is_file() else {}
        rows.append({"batch": folder.name, "rows": entry.get("rows", {}), "status": outcome["status"],
                     "teacher": plan.get("teacher", ""), "student": plan.get("student", ""),
                     "reason": outcome["reason"], "seconds": round(seconds, 1), "version": report.get("version"),
                     "decision": decision, "failed_checks": failed,
                     "champion_health": "" if not health else "not judged" if not health["compared"] else
                     "degraded" if health["degraded"] else "healthy",
                     **_scores(report, metric)})
        print(table(rows[-1:], metric, header=False), flush=True)
        if record:
            record(rows)
    return rows


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def table(rows: list[dict[str, Any]], metric: str, header: bool = True) -> str:
    head = (f"| batch | rows | teacher / student | challenger {metric} val | challenger {metric} recent | "
            f"champion {metric} recent | "
            f"recent rows compared | challenger {metric} golden | champion {metric} golden | decision | failed checks | "
            "champion health | s |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|---:|"] if header else []
    for r in rows:
        size = ", ".join(f"{k} {v:,}" for k, v in r["rows"].items()) or "–"
        start = f"{r['teacher']} / {r['student']}" if r.get("teacher") else "–"
        lines.append(f"| {r['batch']} | {size} | {start} | {_fmt(r.get('challenger_val'))} | "
                     f"{_fmt(r['challenger_recent'])} | {_fmt(r['champion_recent'])} | {r['recent_rows'] or '–'} | "
                     f"{_fmt(r['challenger_golden'])} | {_fmt(r['champion_golden'])} | {r['decision']} | "
                     f"{', '.join(r['failed_checks']) or '–'} | {r['champion_health'] or '–'} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def summary(results: dict[str, dict[str, Any]], metric: str) -> str:
    """One line per policy: time, mean scores of the challengers, the last champion's golden score, promotions."""
    def mean(values: list[float | None]) -> str:
        found = [v for v in values if v is not None]
        return _fmt(sum(found) / len(found)) if found else "–"

    head = (f"| policy | batches trained | s | s per batch | mean challenger {metric} val | mean challenger {metric} "
            f"recent | mean challenger {metric} golden | last champion {metric} golden | champion moved |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in results.items():
        rows = [r for r in result["batches"] if r["decision"] != "not trained"]
        goldens = [r.get("challenger_golden") if r.get("decision") == "promoted" else r.get("champion_golden")
                   for r in rows]   # an unchanged batch's report carries none: the champion's score before it
        final = next((g for g in reversed(goldens) if g is not None), None)
        seconds = sum(r["seconds"] for r in rows)
        lines.append(f"| {name} | {len(rows)} | {seconds:.0f} | {seconds / max(len(rows), 1):.0f} | "
                     f"{mean([r.get('challenger_val') for r in rows])} | "
                     f"{mean([r['challenger_recent'] for r in rows])} | {mean([r['challenger_golden'] for r in rows])} "
                     f"| {_fmt(final)} | {sum(r['decision'] == 'promoted' for r in rows)} |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], metric: str, path: Path, title: str) -> None:
    """The challenger's and the champion's score per batch on each window, and the time per batch, per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, result) in enumerate(results.items()):
        color = colors[index % len(colors)]
        rows = result["batches"]
        x = list(range(len(rows)))
        for ax, window in zip(axes, ("recent", "golden"), strict=False):
            for who, style in (("challenger", "o-"), ("champion", "s--")):
                points = [(i, r[f"{who}_{window}"]) for i, r in enumerate(rows) if r[f"{who}_{window}"] is not None]
                ax.plot([i for i, _ in points], [y for _, y in points], style, color=color, alpha=0.9 if who ==
                        "challenger" else 0.5, markersize=4, label=f"{who}, {name}")
            ax.set_title(f"{window} window")
        axes[2].plot(x, [r["seconds"] for r in rows], "o-", color=color, label=name)
    longest = max((result["batches"] for result in results.values()), key=len, default=[])
    ticks = [r["batch"].split("-", 1)[-1] for r in longest]
    for ax in axes:
        ax.set_xticks(range(len(ticks)), ticks, rotation=60, fontsize=7)
        ax.set_xlabel("batch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[1].set_ylabel(metric)
    axes[2].set_ylabel("seconds (ingest + pipeline + gate)")
    axes[2].set_title("time per batch")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_args(args: argparse.Namespace) -> None:
    """The flags refused before anything replays (a policy's replay takes ~40 minutes): a policy given twice, fewer
    than one batch (a slice would replay none, or all but the last), a ``--keep`` folder an earlier run worked in."""
    names = [policy_name(policy) for policy in args.policy or []]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise PipelineError(f"--policy {', '.join(twice)}: given twice (each policy replays once)")
    if args.batches is not None and args.batches < 1:
        raise PipelineError(f"--batches {args.batches}: replay at least 1 batch (or leave it out: all of them)")
    if args.keep is not None and args.keep.exists() and (not args.keep.is_dir() or any(args.keep.glob("policy-*"))):
        raise PipelineError(f"--keep {args.keep}: not a new folder (an earlier replay's work is in it, or it is a "
                            "file); name another one")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--family", required=True)
    parser.add_argument("--profile", default="full", help="params profile of the scratch copy (default: full)")
    parser.add_argument("--policy", action="append", type=parse_policy,
                        help="a training policy, scratch|fine_tune[,teacher_every=K]; repeat to compare (default: "
                             "the family's warm_start params)")
    parser.add_argument("--batches", type=int, help="replay only the first N batches (default: all)")
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    parser.add_argument("--plot", type=Path, help="also draw the scores per batch into this PNG")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it, instead of a temporary one")
    args = parser.parse_args()
    check_args(args)
    leave_project_runs()   # the scratch copy's own store, its own runs
    # what it replays, checked before any folder is made: the profile's params, a family that takes batches and
    # warm-starts
    cfg = load_config(PROJECT / PARAMS_FILE, args.profile)   # the params the scratch copy is made from
    check_profile_tracked(cfg, PROJECT / PARAMS_FILE)   # as its stages would in the copy, once it is made
    with_warm = [f for f in cfg.families if getattr(cfg.warm_start, f, None) is not None]
    if args.family not in with_warm:
        raise ConfigError(f"--family {args.family}: replay compares warm-start policies; {args.family} has no "
                          f"warm_start block (families with one: {', '.join(with_warm)})")
    own = getattr(cfg.warm_start, args.family)
    policies = args.policy or [{"policy": own.policy, "teacher_every": own.teacher_every}]
    metric = getattr(cfg.gate, args.family).metric
    results: dict[str, dict[str, Any]] = {}

    def record() -> None:
        if args.out:
            write_result(args.out, {"family": args.family, "profile": args.profile, "policies": results})

    with tempfile.TemporaryDirectory(prefix="kdq-replay-") as tmp:
        work = args.keep or Path(tmp)
        for index, policy in enumerate(policies):
            name = policy_name(policy)
            print(f"\n{name}:")
            results[name] = {**policy, "batches": []}
            started = time.perf_counter()
            results[name]["batches"] = replay_benchmark(
                args.family, args.profile, args.batches, work / f"policy-{index}", policy,
                lambda rows, name=name: (results[name].update(batches=rows), record()))
            results[name]["seconds"] = round(time.perf_counter() - started, 1)
            record()
    title = f"{args.family} replay ({args.profile} profile), {date.today()}, {machine()}"
    print(f"\n{title}")
    for name, result in results.items():
        print(f"\n{name} ({result['seconds']:.0f} s):\n\n{table(result['batches'], metric)}")
    print(f"\n{summary(results, metric)}")
    if args.plot:
        plot(results, metric, args.plot, f"{args.family} replay, {args.profile} profile")


if __name__ == "__main__":
    run_cli(main)
