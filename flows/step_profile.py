"""Benchmark: where an image family's training step spends its time, for the teacher and for distillation.

Runs the training loop itself (``tasks.image_training.train_epoch``: the batch made and augmented, ``train_step``,
the schedule's step) over ``--steps`` batches of the family's processed data (``--data``, by default what its
teacher stage reads: run ``dvc repro prepare_<family>`` first) with ``teacher.<family>``'s recipe (a teacher from
fresh weights) and ``distill.<family>``'s (its student against a frozen teacher of the params' architecture, fresh
weights too: speed does not depend on them), at the stages' threads, bf16 and memory layout, on the CPU (the
profiler times CPU work; a moving average of the weights, where set, is left out). The steps are timed plainly (the
wall time per step), then again under PyTorch's profiler, each operator's own time summed into the part of the
first labelled region above it: building the batch, augmentation, the frozen teacher's forward, a convolution's
backward by matmul (``tasks.conv_grad``), an autograd backward function, the optimizer (zeroing gradients and the
update), else the forward pass; forward and backward split by the operator's name into convolutions, batch norm,
activations and the rest (losses, additions, copies, casts); and, from one more profiled pass that records input
shapes (which slows it), the ``--top`` slowest operators by own time with their shapes (where a part's time goes).
Prints markdown tables; ``--out`` writes JSON too.

    python -m flows.step_profile --family vision [--steps 20] [--top 10] [--out step_profile.json]
"""
from __future__ import annotations

import argparse
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flows.benchmark import image_teacher_config, machine, write_result
from flows.stage_graph import stage_paths
from tasks.config import Config
from tasks.conv_grad import WEIGHT_GRAD
from tasks.distillation import TEACHER, Distiller, distillation_loss, loss_config
from tasks.errors import DataFormatError, run_cli
from tasks.hardware import native_bf16
from tasks.image_training import AUGMENT, BATCH, Split, memory_format, train_epoch
from tasks.images.config import TrainingRecipe
from tasks.images.models import MobileStudent, ResNetTeacher
from tasks.training import LossFn, cross_entropy_loss, make_optimizer, make_scheduler

KINDS = ("convolutions", "batch norm", "activations", "other")
PARTS = (BATCH, AUGMENT, TEACHER, *(f"forward: {k}" for k in KINDS), *(f"backward: {k}" for k in KINDS),
         "optimizer")
OPTIMIZER = ("Optimizer.step#", "Optimizer.zero_grad#")
BACKWARD = "autograd::engine::evaluate_function"


def kind(op: str) -> str:
    """The kind of a PyTorch operator (``aten::mkldnn_convolution``, ``aten::native_batch_norm_backward``) or autograd
    function (``...evaluate_function: ConvolutionBackward0``), by its name: the copies, casts and allocations inside a
    convolution's backward are "other"."""
    op = op.lower().replace("_", "")
    if "conv" in op:
        return "convolutions"
    if "batchnorm" in op:
        return "batch norm"
    if any(word in op for word in ("relu", "threshold", "clampmin")):
        return "activations"
    return "other"


def part(event: Any) -> str:
    """The part of the step a profiled event belongs to: that of the first labelled region above it (itself
    included: batch, augmentation, teacher, optimizer, ``tasks.conv_grad``'s convolution backward, an autograd
    backward function), else the forward pass."""
    parent = event
    while parent is not None:
        if parent.name in (BATCH, AUGMENT, TEACHER):
            return parent.name
        if parent.name.startswith(OPTIMIZER):
            return "optimizer"
        if parent.name == WEIGHT_GRAD:   # tasks.conv_grad's backward of a convolution: patches gathered, matmul
            return "backward: convolutions"
        if parent.name.startswith(BACKWARD):
            return f"backward: {kind(event.name)}"
        parent = parent.cpu_parent
    return f"forward: {kind(event.name)}"


def profile_step(model: nn.Module, train: Split, spec: TrainingRecipe, loss_fn: LossFn, steps: int, top: int = 0
                 ) -> dict[str, Any]:
    """Milliseconds per step of ``train_epoch`` over ``steps`` batches of ``train`` as ``spec`` makes them, on the
    CPU: the plain ``wall`` time, the ``profiled`` time (the profiler's top-level events) and its ``parts``; and the
    ``top`` operators by own time in a further profiled pass that records input shapes (``operators``; the shapes
    of tensor arguments, None and scalars left out)."""
    spec = spec.model_copy(update={"device": "cpu"})
    if not len(train.y):
        raise DataFormatError("no training images to profile a step on")
    # whole batches only (fewer where the data has fewer images; one smaller batch where it has less than one)
    steps = max(1, min(steps, len(train.y) // spec.batch_size))
    data = train.head(steps * spec.batch_size)
    opt = make_optimizer(model, spec.optimizer)
    sched = make_scheduler(opt, spec.schedule, 2 + 3 * steps)
    gen = torch.Generator().manual_seed(spec.seed)
    cpu = torch.device("cpu")

    def run(split: Split) -> None:
        train_epoch(model, split, spec, opt, sched, gen, loss_fn, "profile", cpu)

    run(train.head(2 * spec.batch_size))   # warm-up: first-call allocations and kernel choices
    start = time.perf_counter()
    run(data)
    wall = (time.perf_counter() - start) / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(data)
    if top:   # recording shapes slows the profiled step (~5-15 %): a pass of its own, apart from the parts
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as shaped:
            run(data)
    parts = dict.fromkeys(PARTS, 0.0)
    events = prof.events()
    for event in events:   # each event's own time, its operators' excluded: onnxruntime's teacher, Python
        parts[part(event)] += event.self_cpu_time_total / 1000 / steps
    profiled = sum(e.cpu_time_total for e in events if e.cpu_parent is None) / 1000 / steps
    ops = sorted((a for a in shaped.key_averages(group_by_input_shape=True) if a.key.startswith("aten::")),
                 key=lambda a: a.self_cpu_time_total, reverse=True)[:top] if top else []
    operators = [{"operator": a.key, "input_shapes": [list(shape) for shape in a.input_shapes if shape],
                  "ms": a.self_cpu_time_total / 1000 / steps, "calls": a.count / steps} for a in ops]
    return {"steps": steps, "wall": wall * 1000, "profiled": profiled, "parts": parts, "operators": operators}


def measure(cfg: Config, family: str, train: Split, steps: int, top: int = 0) -> dict[str, dict[str, Any]]:
    """``profile_step`` of the teacher's training step and of a distillation step (``teacher.<family>`` and
    ``distill.<family>``, fresh weights) at each stage's threads."""
    teach, kd = cfg.block("teacher", family), cfg.block("distill", family).resolved("cpu")
    shape, threads, bf16 = train.model_shape(), torch.get_num_threads(), native_bf16()
    result = {}
    try:
        torch.set_num_threads(teach.threads)
        torch.manual_seed(teach.seed)
        teacher = ResNetTeacher(teach.arch, **shape).to(memory_format=memory_format())
        result["teacher"] = profile_step(teacher, train, teach, cross_entropy_loss(teach.label_smoothing), steps,
                                         top)
        result["teacher"].update(threads=teach.threads, batch=teach.batch_size, bf16=teach.bf16 and bf16)
        torch.set_num_threads(kd.threads)
        torch.manual_seed(kd.seed)
        frozen = ResNetTeacher(teach.arch, **shape).to(memory_format=memory_format()).eval()
        student = MobileStudent(kd.student, **shape).to(memory_format=memory_format())
        distiller = Distiller(student, frozen, loss_config(kd, True, kd.label_smoothing), train.inputs(slice(2)))
        result["distillation"] = profile_step(distiller, train, kd, distillation_loss, steps, top)
        result["distillation"].update(threads=kd.threads, batch=kd.batch_size, bf16=kd.bf16 and bf16,
                                      teacher_runtime=kd.teacher_runtime,
                                      teacher_bf16=kd.teacher_bf16 and bf16 and kd.teacher_runtime == "pytorch")
    finally:
        torch.set_num_threads(threads)
    return result


def table(result: dict[str, dict[str, Any]], family: str) -> str:
    teacher, kd = result["teacher"], result["distillation"]
    teacher_bf16 = ", bf16" if kd["teacher_bf16"] else ""
    settings = (f"(teacher: batch {teacher['batch']}, {teacher['threads']} thread(s), bf16 {teacher['bf16']}; "
                f"distillation: batch {kd['batch']}, {kd['threads']} thread(s), student bf16 {kd['bf16']}, teacher run "
                f"by {kd['teacher_runtime']}{teacher_bf16})")
    title = (f"Training-step profile ({family}), {date.today()}, {machine()}; steps: teacher {teacher['steps']}, "
             f"distillation {kd['steps']}")
    lines = [title, settings, "", "| part of a step | teacher ms | % | distillation ms | % |", "|---|---:|---:|---:|---:|"]

    def cells(r: dict[str, Any], name: str) -> str:
        ms = r["parts"][name]
        return f"{ms:.1f} | {100 * ms / r['profiled']:.0f}"

    lines += [f"| {name} | {cells(teacher, name)} | {cells(kd, name)} |" for name in PARTS
              if teacher["parts"][name] or kd["parts"][name]]
    lines.append(f"| **profiled step** | **{teacher['profiled']:.1f}** | 100 | **{kd['profiled']:.1f}** | 100 |")
    lines.append(f"| step without the profiler | {teacher['wall']:.1f} | | {kd['wall']:.1f} | |")
    for name, r in (("teacher", teacher), ("distillation", kd)):
        if r["operators"]:
            lines += ["", f"Slowest operators of the {name} step, by own time and input shapes:", "",
                      "| operator | input shapes (tensors) | ms a step | calls a step |", "|---|---|---:|---:|"]
            lines += [f"| {op['operator']} | {' '.join(map(str, op['input_shapes']))} | {op['ms']:.1f} | "
                      f"{op['calls']:g} |" for op in r["operators"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, help="an image family of params.yaml")
    parser.add_argument("--data", type=Path, help="its processed data (default: what train_teacher_<family> reads)")
    parser.add_argument("--steps", type=int, default=20, help="steps timed, then profiled")
    parser.add_argument("--top", type=int, default=10, help="also list this many slowest operators with their input "
                        "shapes (0: none)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args()
    if args.steps < 1 or args.top < 0:
        parser.error(f"--steps must be at least 1 and --top at least 0, got {args.steps} and {args.top}")
    cfg = image_teacher_config(args.params, args.family)
    data = args.data or args.params.parent / stage_paths(args.params.parent, f"train_teacher_{args.family}")["data"]
    result = measure(cfg, args.family, Split.load(data, "train"), args.steps, args.top)
    print(table(result, args.family))
    if args.out:
        write_result(args.out, {"family": args.family, "milliseconds": result})


if __name__ == "__main__":
    run_cli(main)
