"""Benchmark: distillation's frozen teacher run by PyTorch vs the same teacher as ONNX in onnxruntime.

Exports the params' vision teacher architecture with its stage maps (fresh weights: speed does not depend on them)
as ``distill.vision.teacher_runtime: onnxruntime`` does (``tasks.imported_teacher.onnx_twin``), and times,
alternating them in one run, the teacher's forward and a whole distillation step (``distill.vision``'s loss and
student, SGD) at ``distill.vision.threads`` threads: PyTorch fp32, onnxruntime fp32 and, where the CPU has native
bf16, PyTorch under bf16 autocast (``teacher_bf16: true``). Prints a markdown table of medians and their ratios;
``--out`` writes JSON too.

    python -m flows.teacher_benchmark [--batch 256] [--steps 10] [--repeats 3] [--out reports/benchmarks/teacher.json]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from torch import nn

from flows.benchmark import machine, write_result
from tasks.config import Config, load_config
from tasks.distillation import Distiller
from tasks.errors import run_cli
from tasks.hardware import native_bf16
from tasks.images.models import MobileStudent, ResNetTeacher
from tasks.imported_teacher import onnx_twin
from tasks.training import autocast

BF16 = "pytorch bf16"   # PyTorch's bf16 autocast, measured only where the CPU has native bf16


def _mean_seconds(run: Callable[[], object], steps: int) -> float:
    run()   # warm-up: first-call allocations, onnxruntime's session start
    start = time.perf_counter()
    for _ in range(steps):
        run()
    return (time.perf_counter() - start) / steps


def measure(cfg: Config, batch: int, steps: int, repeats: int) -> dict[str, dict[str, float]]:
    """Seconds of the teacher's forward and of a distillation step, per teacher kind: the median over ``repeats`` of
    the mean over ``steps``."""
    # the Distiller runs each teacher as given: fp32, plus PyTorch's bf16 autocast where the CPU has native bf16
    # (what ``teacher_bf16: true`` runs there)
    kd = cfg.distill.vision.model_copy(update={"teacher_bf16": False, "teacher_runtime": "pytorch"})
    torch.set_num_threads(kd.threads)
    torch.manual_seed(0)
    teacher = ResNetTeacher(cfg.teacher.vision.arch).eval()
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    teachers = {"pytorch": teacher, "onnxruntime": onnx_twin(teacher, (x[:2],), feature_rank=4)}
    if native_bf16():
        teachers[BF16] = teacher
    times: dict[str, dict[str, list[float]]] = {name: {"forward": [], "step": []} for name in teachers}
    for _ in range(repeats):   # alternating, so all see the same machine load
        for name, frozen in teachers.items():
            torch.manual_seed(0)
            bf16 = name == BF16
            run_kd = kd.model_copy(update={"teacher_bf16": True}) if bf16 else kd
            distiller = Distiller(MobileStudent(kd.student), frozen, run_kd, x[:2]).train()
            opt = torch.optim.SGD(distiller.parameters(), lr=0.01)

            def step(d: Distiller = distiller, o: torch.optim.Optimizer = opt) -> None:
                o.zero_grad()
                d.loss(x, y)[0].backward()
                o.step()

            def forward(t: nn.Module = frozen, bf16: bool = bf16) -> None:
                with torch.no_grad(), autocast(bf16):
                    t.forward_features(x)

            times[name]["step"].append(_mean_seconds(step, steps))
            times[name]["forward"].append(_mean_seconds(forward, steps))
    return {name: {kind: statistics.median(values) for kind, values in kinds.items()} for name, kinds in times.items()}


def table(result: dict[str, dict[str, float]], batch: int, threads: int) -> str:
    onnx_t = result["onnxruntime"]
    lines = [f"Teacher benchmark, {date.today()}, {machine()}; batch {batch}, {threads} thread(s), student in fp32",
             "", "| teacher run by | forward ms | distillation step ms |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['forward'] * 1000:.1f} | {r['step'] * 1000:.1f} |" for name, r in result.items()]
    for base in ("pytorch", BF16):
        if base in result:
            lines.append(f"| onnxruntime / {base} | {onnx_t['forward'] / result[base]['forward']:.2f}× | "
                         f"{onnx_t['step'] / result[base]['step']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements per teacher (median)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args()
    cfg = load_config(args.params)
    result = measure(cfg, args.batch, args.steps, args.repeats)
    print(table(result, args.batch, cfg.distill.vision.threads))
    if args.out:
        write_result(args.out, {"batch": args.batch, "threads": cfg.distill.vision.threads, "seconds": result})


if __name__ == "__main__":
    run_cli(main)
