"""Benchmark: where an image family's training step spends its time, for the teacher and for distillation.

Runs the training loop's own step (``tasks.image_training``'s batch, augmentation and ``train_step``) on the family's
processed data (``--data``, by default what its teacher stage reads: run ``dvc repro prepare_<family>`` first) with
``teacher.<family>``'s recipe (the teacher trained from fresh weights) and ``distill.<family>``'s (its student
against a frozen teacher of the params' architecture, fresh weights too: speed does not depend on them), at the
stages' threads, bf16 and memory layout on this machine. Times ``--steps`` steps plainly (the wall time per step),
then again under PyTorch's profiler, whose operators are summed by part: building the batch, augmentation, the
frozen teacher's forward, the forward and the backward pass split into convolutions, batch norm, activations and
the rest (losses, additions, copies), and the optimizer (zeroing gradients and the update). Prints a markdown table;
``--out`` writes JSON too.

    python -m flows.step_profile --family vision [--steps 20] [--out step_profile.json]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flows.benchmark import machine, write_result
from flows.stage_graph import stage_paths
from tasks.config import Config, load_config
from tasks.distillation import Distiller, distillation_loss, loss_config
from tasks.errors import ConfigError, run_cli
from tasks.image_training import Split, augment, memory_format, on
from tasks.images.arch_config import ResNetArch
from tasks.images.config import TrainingRecipe
from tasks.images.models import MobileStudent, ResNetTeacher
from tasks.training import LossFn, cross_entropy_loss, make_optimizer, on_device, train_step

BATCH, AUGMENT, TEACHER = "batch: uint8 to normalised float", "augmentation", "frozen teacher forward"
KINDS = ("convolutions", "batch norm", "activations", "other")
PARTS = (BATCH, AUGMENT, TEACHER, *(f"forward: {k}" for k in KINDS), *(f"backward: {k}" for k in KINDS),
         "optimizer")
OPTIMIZER = ("Optimizer.step#", "Optimizer.zero_grad#")
BACKWARD = "autograd::engine::evaluate_function"


def kind(op: str) -> str:
    """The kind of a PyTorch operator or autograd function (``aten::mkldnn_convolution``,
    ``aten::native_batch_norm_backward``, ``...evaluate_function: ConvolutionBackward0``)."""
    op = op.lower().replace("_", "")
    if "conv" in op:
        return "convolutions"
    if "batchnorm" in op:
        return "batch norm"
    if any(word in op for word in ("relu", "threshold", "clampmin")):
        return "activations"
    return "other"


def part(event: Any) -> str:
    """The part of the step a profiled operator belongs to: that of the first labelled region above it (batch,
    augmentation, teacher, optimizer, an autograd backward function), else the forward pass."""
    parent = event
    while parent is not None:
        if parent.name in (BATCH, AUGMENT, TEACHER):
            return parent.name
        if parent.name.startswith(OPTIMIZER):
            return "optimizer"
        if parent.name.startswith(BACKWARD):
            return f"backward: {kind(event.name)}"
        parent = parent.cpu_parent
    return f"forward: {kind(event.name)}"


@contextmanager
def _labelled_teacher(model: nn.Module) -> Iterator[None]:
    """The distiller's frozen-teacher forward inside a profiler region of its own (a no-op for a plain model)."""
    if not isinstance(model, Distiller):
        yield
        return
    outputs = model.teacher_outputs

    def labelled(x: torch.Tensor) -> Any:
        with torch.profiler.record_function(TEACHER):
            return outputs(x)

    model.teacher_outputs = labelled   # the instance's, over the class's method
    try:
        yield
    finally:
        del model.teacher_outputs


def profile_step(model: nn.Module, train: Split, spec: TrainingRecipe, loss_fn: LossFn, steps: int
                 ) -> dict[str, Any]:
    """Milliseconds per step of ``model``'s training step on ``train`` batches as ``spec`` makes them: the plain
    ``wall`` time and the profiled time by part (``parts``; their sum is ``profiled``)."""
    with on_device(model, spec, memory_format) as device:
        opt = make_optimizer(model, spec.optimizer)
        gen = torch.Generator().manual_seed(spec.seed)
        order = torch.randperm(len(train.y), generator=gen)
        batches = max(1, len(order) // spec.batch_size)
        model.train()

        def run(count: int, first: int) -> None:
            for i in range(first, first + count):
                start = (i % batches) * spec.batch_size
                idx = order[start:start + spec.batch_size]
                with torch.profiler.record_function(BATCH):
                    x = train.inputs(idx)
                with torch.profiler.record_function(AUGMENT):
                    x = augment(x, spec.augmentation, gen, train.pixels)
                train_step(model, on(x, device), train.y[idx].to(device), opt, loss_fn, spec.bf16)

        with _labelled_teacher(model):
            run(2, 0)   # warm-up: first-call allocations and kernel choices
            start = time.perf_counter()
            run(steps, 2)
            wall = (time.perf_counter() - start) / steps
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                run(steps, 2 + steps)
    parts = dict.fromkeys(PARTS, 0.0)
    for event in prof.events():   # each event's own time, its operators' excluded: onnxruntime's teacher, Python
        parts[part(event)] += event.self_cpu_time_total / 1000 / steps
    return {"wall": wall * 1000, "profiled": sum(parts.values()), "parts": parts}


def measure(cfg: Config, family: str, train: Split, steps: int) -> dict[str, dict[str, Any]]:
    """``profile_step`` of the teacher's training step and of a distillation step (``teacher.<family>`` and
    ``distill.<family>``, fresh weights) at each stage's threads."""
    teach, kd = cfg.block("teacher", family), cfg.block("distill", family).resolved()
    shape = train.model_shape()
    result = {}
    torch.set_num_threads(teach.threads)
    torch.manual_seed(teach.seed)
    teacher = ResNetTeacher(teach.arch, **shape).to(memory_format=memory_format())
    result["teacher"] = profile_step(teacher, train, teach, cross_entropy_loss(teach.label_smoothing), steps)
    result["teacher"].update(threads=teach.threads, batch=teach.batch_size, bf16=teach.bf16)
    torch.set_num_threads(kd.threads)
    torch.manual_seed(kd.seed)
    student = MobileStudent(kd.student, **shape).to(memory_format=memory_format())
    distiller = Distiller(student, teacher.eval(), loss_config(kd, True, kd.label_smoothing), train.inputs(slice(2)))
    result["distillation"] = profile_step(distiller, train, kd, distillation_loss, steps)
    result["distillation"].update(threads=kd.threads, batch=kd.batch_size, bf16=kd.bf16,
                                  teacher_runtime=kd.teacher_runtime, teacher_bf16=kd.teacher_bf16)
    return result


def table(result: dict[str, dict[str, Any]], family: str, steps: int) -> str:
    teacher, kd = result["teacher"], result["distillation"]
    teacher_bf16 = ", bf16" if kd["teacher_bf16"] and kd["teacher_runtime"] == "pytorch" else ""
    settings = (f"(teacher: batch {teacher['batch']}, {teacher['threads']} thread(s), bf16 {teacher['bf16']}; "
                f"distillation: batch {kd['batch']}, {kd['threads']} thread(s), student bf16 {kd['bf16']}, teacher run "
                f"by {kd['teacher_runtime']}{teacher_bf16})")
    lines = [f"Training-step profile ({family}), {date.today()}, {machine()}; {steps} steps each", settings, "", "| part of a step | teacher ms | % | distillation ms | % |", "|---|---:|---:|---:|---:|"]

    def cells(r: dict[str, Any], name: str) -> str:
        ms = r["parts"][name]
        return f"{ms:.1f} | {100 * ms / r['profiled']:.0f}"

    lines += [f"| {name} | {cells(teacher, name)} | {cells(kd, name)} |" for name in PARTS
              if teacher["parts"][name] or kd["parts"][name]]
    lines.append(f"| **profiled step** | **{teacher['profiled']:.1f}** | 100 | **{kd['profiled']:.1f}** | 100 |")
    lines.append(f"| step without the profiler | {teacher['wall']:.1f} | | {kd['wall']:.1f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, help="an image family of params.yaml")
    parser.add_argument("--data", type=Path, help="its processed data (default: what train_teacher_<family> reads)")
    parser.add_argument("--steps", type=int, default=20, help="steps timed, then profiled")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args()
    cfg = load_config(args.params)
    if args.family not in cfg.families or not isinstance(getattr(cfg.block("teacher", args.family), "arch", None),
                                                         ResNetArch):
        raise ConfigError(f"{args.params}: --family {args.family} is no image family with a teacher architecture "
                          f"of its own (families: {', '.join(cfg.families)})")
    data = args.data or args.params.parent / stage_paths(args.params.parent, f"train_teacher_{args.family}")["data"]
    result = measure(cfg, args.family, Split.load(data, "train"), args.steps)
    print(table(result, args.family, args.steps))
    if args.out:
        write_result(args.out, {"family": args.family, "steps": args.steps, "milliseconds": result})


if __name__ == "__main__":
    run_cli(main)
