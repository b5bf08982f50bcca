"""Benchmark: distillation's frozen teacher run by PyTorch vs the same teacher as ONNX in onnxruntime.

For an image family (``--family``): exports the params' teacher architecture (``teacher.<family>.arch``) with its
stage maps (fresh weights: speed does not depend on them) as ``distill.<family>.teacher_runtime: onnxruntime``
does (``tasks.imported_teacher.onnx_twin``), and times, alternating them in one run, the teacher's forward and a
whole distillation step (``distill.<family>``'s loss and student, SGD) at ``distill.<family>.threads`` threads:
PyTorch fp32, onnxruntime fp32 and, where the CPU has native bf16, PyTorch under bf16 autocast (``teacher_bf16:
true``). Inputs are random images of the shape and classes of the family's processed data (``--data``, by default
what its distill stage reads: run ``dvc repro prepare_<family>`` first). Prints a markdown table of medians and their ratios; ``--out`` writes JSON too.

    python -m flows.teacher_benchmark --family vision [--batch 256] [--steps 10] [--repeats 3] [--out teacher.json]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flows.benchmark import image_teacher_config, machine, write_result
from flows.stage_graph import stage_paths
from tasks.config import Config
from tasks.distillation import Distiller
from tasks.errors import run_cli
from tasks.hardware import native_bf16
from tasks.image_training import model_shape
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


def measure(cfg: Config, family: str, shape: dict[str, Any], batch: int, steps: int, repeats: int
            ) -> dict[str, dict[str, float]]:
    """Seconds of the teacher's forward and of a distillation step, per teacher kind: the median over ``repeats`` of
    the mean over ``steps``. ``shape``: the models' ``num_classes`` and ``input_shape``."""
    # the Distiller runs each teacher as the stages do (PyTorch's with its batch norms folded,
    # ``tasks.distillation.inference_teacher``): fp32, plus PyTorch's bf16 autocast where the CPU has native bf16 (what
    # ``teacher_bf16: true`` runs there); the forward column times the teacher the Distiller runs
    kd = cfg.block("distill", family).model_copy(update={"teacher_bf16": False, "teacher_runtime": "pytorch"})
    torch.set_num_threads(kd.threads)
    torch.manual_seed(0)
    teacher = ResNetTeacher(cfg.block("teacher", family).arch, **shape).eval()
    x, y = torch.randn(batch, *shape["input_shape"]), torch.randint(0, shape["num_classes"], (batch,))
    # the twin's example of its own: import_onnx runs it on batches of 1 and 2, whatever the timed batch
    twin = onnx_twin(teacher, (torch.randn(2, *shape["input_shape"]),), feature_rank=4)
    teachers = {"pytorch": teacher, "onnxruntime": twin}
    if native_bf16():
        teachers[BF16] = teacher
    times: dict[str, dict[str, list[float]]] = {name: {"forward": [], "step": []} for name in teachers}
    for _ in range(repeats):   # alternating, so all see the same machine load
        for name, frozen in teachers.items():
            torch.manual_seed(0)
            bf16 = name == BF16
            run_kd = kd.model_copy(update={"teacher_bf16": True}) if bf16 else kd
            distiller = Distiller(MobileStudent(kd.student, **shape), frozen, run_kd, x[:2]).train()
            opt = torch.optim.SGD(distiller.parameters(), lr=0.01)

            def step(d: Distiller = distiller, o: torch.optim.Optimizer = opt) -> None:
                o.zero_grad()
                d.loss(x, y)[0].backward()
                o.step()

            def forward(t: nn.Module = distiller.teacher, bf16: bool = bf16) -> None:
                with torch.no_grad(), autocast(bf16):
                    t.forward_features(x)

            times[name]["step"].append(_mean_seconds(step, steps))
            times[name]["forward"].append(_mean_seconds(forward, steps))
    return {name: {kind: statistics.median(values) for kind, values in kinds.items()} for name, kinds in times.items()}


def table(result: dict[str, dict[str, float]], family: str, batch: int, threads: int) -> str:
    onnx_t = result["onnxruntime"]
    lines = [(f"Teacher benchmark ({family}), {date.today()}, {machine()}; batch {batch}, {threads} thread(s), "
              "student in fp32"),
             "", "| teacher run by | forward ms | distillation step ms |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['forward'] * 1000:.1f} | {r['step'] * 1000:.1f} |" for name, r in result.items()]
    for base in ("pytorch", BF16):
        if base in result:
            lines.append(f"| onnxruntime / {base} | {onnx_t['forward'] / result[base]['forward']:.2f}× | "
                         f"{onnx_t['step'] / result[base]['step']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, help="an image family of params.yaml")
    parser.add_argument("--data", type=Path, help="its processed data (default: what distill_<family> reads)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements per teacher (median)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args()
    for option in ("batch", "steps", "repeats"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1, got {getattr(args, option)}")
    cfg = image_teacher_config(args.params, args.family)
    threads = cfg.block("distill", args.family).threads
    data = args.data or args.params.parent / stage_paths(args.params.parent, f"distill_{args.family}")["data"]
    result = measure(cfg, args.family, model_shape(data), args.batch, args.steps, args.repeats)
    print(table(result, args.family, args.batch, threads))
    if args.out:
        write_result(args.out, {"family": args.family, "batch": args.batch, "threads": threads, "seconds": result})


if __name__ == "__main__":
    run_cli(main)
