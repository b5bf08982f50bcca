"""What a sweep found: the Pareto front over (quality up, ONNX bytes down, latency down), the best recipe that
passes the gate's thresholds on validation scores, and the report files (``sweep.json``, ``sweep.md``,
``pareto.png``, ``recipes.csv`` for ``dvc plots``).

Quality here is always the validation score (``val_<metric>``): the front and the best recipe are choices, and
choices are made on validation data. The test score is shown beside it, as the number to report, never to rank by.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tasks.io import write_atomic, write_json


def _dominates(a: dict[str, Any], b: dict[str, Any], score: str) -> bool:
    at_least = a[score] >= b[score] and a["bytes"] <= b["bytes"] and a["latency_p50_ms"] <= b["latency_p50_ms"]
    better = a[score] > b[score] or a["bytes"] < b["bytes"] or a["latency_p50_ms"] < b["latency_p50_ms"]
    return at_least and better


def pareto_front(measured: list[dict[str, Any]], metric: str) -> list[str]:
    """Names of the recipes no other recipe beats on every axis at once (validation ``metric``, bytes, latency),
    best validation ``metric`` first. A recipe without a validation score (NaN: nothing dominates it) is none."""
    score = f"val_{metric}"
    measured = [p for p in measured if math.isfinite(p[score])]
    front = [p for p in measured if not any(_dominates(q, p, score) for q in measured if q is not p)]
    return [p["name"] for p in sorted(front, key=lambda p: (-p[score], p["bytes"]))]


def best_passing(outcomes: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The recipe with the best validation ``metric`` (then fewest bytes) among those that ran and pass the gate's
    thresholds on their validation scores (``passed``; the test gate is applied when the chosen one is registered)."""
    passing = [o for o in outcomes if o["status"] == "ok" and o["passed"]]
    return min(passing, key=lambda o: (-o[f"val_{metric}"], o["bytes"])) if passing else None


def markdown(outcomes: list[dict[str, Any]], front: list[str], best: dict[str, Any] | None, metric: str,
             context: dict[str, Any]) -> str:
    lines = [f"# Recipe sweep: {context['family']}, {context['recipes']} recipes, {context['seconds']:.1f} s", "",
             f"| recipe | status | val {metric} (ranked) | test {metric} (reported) | bytes | p50 ms | gate on val "
             "| Pareto "
             "| overrides |",
             "|---|---|---:|---:|---:|---:|---|---|---|"]
    for o in outcomes:
        overrides = ", ".join(f"{k}={v}" for k, v in o["overrides"].items())
        if o["status"] != "ok":
            lines.append(f"| {o['name']} | FAILED | | | | | | | {overrides} |")
            continue
        gate = "pass" if o["passed"] else "fail: " + ", ".join(o["failed_checks"])
        lines.append(f"| {o['name']} | ok | {o[f'val_{metric}']:.4f} | {o[f'test_{metric}']:.4f} | {o['bytes']:,} "
                     f"| {o['latency_p50_ms']:.3f} | {gate} "
                     f"| {'yes' if o['name'] in front else ''} | {overrides} |")
    lines += ["", f"Best recipe passing the gate on validation, by validation {metric}: "
              f"{best['name'] if best else 'none'}.",
              "Latencies were measured while other recipes ran on the other workers: compare them within a sweep."]
    failed = [o for o in outcomes if o["status"] != "ok"]
    lines += [""] + [f"- {o['name']} failed: {o['error'].strip().splitlines()[-1] if o['error'].strip() else ''}"
                     for o in failed] if failed else []
    return "\n".join(lines) + "\n"


def plot(path: Path, outcomes: list[dict[str, Any]], front: list[str], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [o for o in outcomes if o["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, label) in zip(axes, (("bytes", "ONNX size (KB)"), ("latency_p50_ms", "p50 latency (ms)"))):
        scale = 1024 if key == "bytes" else 1
        for group, style in ((False, {"c": "tab:gray", "marker": "o"}), (True, {"c": "tab:red", "marker": "*", "s": 120})):
            pts = [o for o in ran if (o["name"] in front) is group]
            ax.scatter([o[key] / scale for o in pts], [o[f"val_{metric}"] for o in pts],
                       label="Pareto front" if group else "dominated", **style)
        for o in ran:
            ax.annotate(o["name"].removeprefix("recipe-"), (o[key] / scale, o[f"val_{metric}"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel(label)
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Recipe sweep: INT8 students (front over quality, size and latency together)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep_report(out: Path, outcomes: list[dict[str, Any]], front: list[str], best: dict[str, Any] | None,
                       metric: str, context: dict[str, Any]) -> list[Path]:
    """Write the sweep's JSON, Markdown table and Pareto plot under ``out``; return their paths."""
    files = [out / "sweep.json", out / "sweep.md", out / "pareto.png", out / "recipes.csv"]
    write_json(files[0], {**context, "metric": metric, "pareto": front, "best": best and best["name"],
                          "outcomes": outcomes})
    write_atomic(files[1], markdown(outcomes, front, best, metric, context).encode())
    plot(files[2], outcomes, front, metric)
    write_atomic(files[3], recipes_csv(outcomes, front, metric).encode())
    return files


def recipes_csv(outcomes: list[dict[str, Any]], front: list[str], metric: str) -> str:
    """One row per recipe that ran: what ``dvc plots show`` draws as the sweep's Pareto scatter (dvc.yaml)."""
    lines = [f"recipe,val_{metric},test_{metric},bytes,latency_p50_ms,pareto"]
    lines += [f"{o['name']},{o[f'val_{metric}']:.6f},{o[f'test_{metric}']:.6f},{o['bytes']},{o['latency_p50_ms']:.4f},"
              f"{'yes' if o['name'] in front else 'no'}" for o in outcomes if o["status"] == "ok"]
    return "\n".join(lines) + "\n"
