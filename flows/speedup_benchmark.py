"""How steady the gate's speed-up is: the same two exported files (a family's INT8 student and FP32 teacher) timed
``--repeats`` times the gate's way (``tasks.speedup.paired_timing``, ``gate.<family>.vs_teacher.speedup_pairs``
pairs) and the way the gate measured before (one timing of the candidate, then one of the teacher), the two
interleaved; prints the spread of each and how often it fell under the family's floor.

Reads what ``dvc repro export_<family>`` leaves (the evaluate stage's ``--onnx`` and ``--data`` paths). Run it on a
busy machine to see the difference: on a quiet one both are steady.

    python -m flows.speedup_benchmark --family recsys [--repeats 20] [--out reports/benchmarks/speedup_recsys.json]
"""
from __future__ import annotations

import argparse
import time
from datetime import date
from pathlib import Path

import numpy as np

from flows.benchmark import machine, write_result
from flows.stage_graph import stage_paths
from tasks.config import load_config
from tasks.errors import run_cli
from tasks.family import load_family
from tasks.io import require
from tasks.speedup import paired_timing


def measure(root: Path, family: str, repeats: int) -> dict:
    cfg = load_config(root / "params.yaml")
    contract, where = load_family(family), stage_paths(root, f"evaluate_{family}")
    onnx, data = root / where["onnx"], root / where["data"]
    require([onnx / "student_int8.onnx", onnx / "teacher_fp32.onnx", data],   # before a timing's traceback
            f"make them with `dvc repro export_{family}`")
    rel = cfg.block("gate", family).vs_teacher
    key, pairs = f"{contract.gate.latency}_p50_ms", rel.speedup_pairs
    candidate = lambda: contract.timing(onnx / "student_int8.onnx", data, cfg)
    teacher = lambda: contract.timing(onnx / "teacher_fp32.onnx", data, cfg)
    found: dict[str, dict[str, list[float]]] = {"before": {"speedup": [], "seconds": []},
                                                 "paired": {"speedup": [], "seconds": []}}
    for i in range(repeats):
        start = time.perf_counter()
        alone = candidate()[key]
        found["before"]["speedup"].append(teacher()[key] / alone)
        found["before"]["seconds"].append(time.perf_counter() - start)
        start = time.perf_counter()
        found["paired"]["speedup"].append(paired_timing(candidate, teacher, pairs, key)[2]["speedup_vs_teacher"])
        found["paired"]["seconds"].append(time.perf_counter() - start)
        print(f"{i + 1}/{repeats}: before {found['before']['speedup'][-1]:.3f}x, "
              f"paired {found['paired']['speedup'][-1]:.3f}x", flush=True)
    return {"family": family, "pairs": pairs, "repeats": repeats, "floor": rel.min_speedup, **found}


def table(result: dict) -> str:
    floor = result["floor"]
    lines = [f"| measurement | repeats | median speed-up | range | CV | under the {floor:g}x floor | seconds each |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, what in (("before", "one timing of each, in turn (before)"),
                       ("paired", f"{result['pairs']} pairs of rounds, the median pair (the gate's)")):
        v = np.array(result[name]["speedup"])
        cv = v.std(ddof=1) / v.mean() * 100 if len(v) > 1 else 0.0
        lines.append(f"| {what} | {len(v)} | {np.median(v):.2f} | {v.min():.2f}–{v.max():.2f} | {cv:.1f} % | "
                     f"{int((v < floor).sum())} | {np.mean(result[name]['seconds']):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    result = measure(args.root, args.family, args.repeats)
    print(f"{args.family}: the gate's speed-up, {date.today()}, {machine()}\n")
    print(table(result))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    run_cli(main)
