"""Benchmark of an image family's exported models: size, latency, throughput and accuracy, measured in one run.

Reads the four ONNX files ``export_<family>`` writes (``--onnx-dir``, default: the folder ``evaluate_<family>``
reads) or explicit paths, measures them back to back in onnxruntime with ``evaluate.<family>``'s threads, warm-up
and repeats, and prints a markdown table with the deployment targets: the family's gate goals relative to its
teacher (``gate.<family>.vs_teacher``) and INT8 at least twice the FP32 student's batch throughput. ``--out`` also
writes the numbers as JSON.

    python -m flows.export_benchmark --family vision [--onnx-dir models/vision/onnx] [--out export_vision.json]
"""
from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

from flows.benchmark import machine, target_rows, write_result
from flows.stage_graph import stage_paths
from tasks.config import Config, load_config
from tasks.errors import ConfigError, run_cli
from tasks.family_config import VsTeacher
from tasks.image_training import Split
from tasks.images.config import image_families
from tasks.images.evaluate import measure_onnx, ratios

NAMES = ("teacher_fp32", "student_fp32", "student_int8", "student_ptq_int8")
MIN_THROUGHPUT_RATIO = 2.0   # INT8 vs FP32 student, batch throughput: the benchmark's own target (no gate check)


def targets(goals: VsTeacher, batch: int) -> tuple[tuple[str, str, float, str], ...]:
    """The table's targets: the gate's goals relative to the teacher, and the throughput ratio."""
    return (("size_ratio_vs_teacher", ">=", goals.min_size_ratio, "student INT8 vs teacher FP32 size"),
            ("speedup_b1_p50_vs_teacher", ">=", goals.min_speedup, "batch-1 p50 speed-up vs teacher"),
            ("int8_vs_fp32_throughput_ratio", ">=", MIN_THROUGHPUT_RATIO,
             f"student INT8 vs FP32 batch-{batch} throughput"),
            ("test_accuracy_drop_vs_teacher", "<=", goals.max_accuracy_drop, "test accuracy drop vs teacher"))


def measure(paths: dict[str, Path], data: Path, cfg: Config, family: str) -> dict:
    ev, goals = cfg.block("evaluate", family), cfg.block("gate", family).vs_teacher
    val, test = Split.load(data, "val"), Split.load(data, "test")
    models = {name: measure_onnx(path, val, test, data, ev)[0] for name, path in paths.items()}
    return {"family": family, "models": models, "ratios": ratios(models, f"throughput_b{ev.throughput_batch}_ips"),
            "settings": ev.model_dump(), "targets": targets(goals, ev.throughput_batch),
            "files": {k: str(v) for k, v in paths.items()}}


def table(result: dict) -> str:
    ev, tp = result["settings"], f"throughput_b{result['settings']['throughput_batch']}_ips"
    lines = [f"ONNX benchmark ({result['family']}), {date.today()}, {machine()}; onnxruntime CPU, {ev['threads']} "
             "thread(s), "
             f"{ev['warmup']} warm-up, {ev['repeats']} batch-1 repeats", "",
             "| model | val accuracy % | test accuracy % | bytes | gzip bytes | b1 p50 ms | b1 p95 ms | b1 p99 ms "
             f"| b{ev['throughput_batch']} images/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in result["models"].items():
        lines.append(f"| {name} | {100 * m['val_accuracy']:.2f} | {100 * m['test_accuracy']:.2f} | {m['bytes']:,} | "
                     f"{m['gzip_bytes']:,} | "
                     f"{m['latency_b1_p50_ms']:.3f} | {m['latency_b1_p95_ms']:.3f} | {m['latency_b1_p99_ms']:.3f} | "
                     f"{m[tp]:,.0f} |")
    lines += ["", *target_rows(tuple(map(tuple, result["targets"])), result["ratios"], 3)]
    r = result["ratios"]
    lines.append(f"| QAT+KD INT8 vs onnxruntime PTQ INT8 accuracy (pt) | {100 * r['test_int8_vs_ptq_accuracy']:+.2f} | "
                 "(side by side) | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, help="an image family of params.yaml")
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--onnx-dir", type=Path, help="default: the ONNX folder evaluate_<family> reads")
    for name in NAMES:
        parser.add_argument(f"--{name.replace('_', '-')}", type=Path, help=f"override <onnx-dir>/{name}.onnx")
    parser.add_argument("--data", type=Path, help="default: the processed data evaluate_<family> reads")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cfg = load_config(args.root / "params.yaml")
    if args.family not in image_families(cfg):
        raise ConfigError(f"{args.root / 'params.yaml'}: --family {args.family} is no image family (families: "
                          f"{', '.join(cfg.families)})")
    where = stage_paths(args.root, f"evaluate_{args.family}")
    onnx_dir, data = args.onnx_dir or args.root / where["onnx"], args.data or args.root / where["data"]
    paths = {name: getattr(args, name) or onnx_dir / f"{name}.onnx" for name in NAMES}
    result = measure(paths, data, cfg, args.family)
    print(table(result))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    run_cli(main)
