"""The training loop every family shares: optimizer and schedule from params, the device (``device``: the CPU, or
CUDA when present), bf16 autocast where the device computes bf16 natively, one optimisation step (gradients
zeroed, forward with autograd on, backward, update), and ``fit_best``, the loop of the families whose training
takes minutes. Image data and the image families' loop with per-epoch checkpoints are in ``tasks.image_training``."""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tasks.errors import PipelineError
from tasks.family_config import Optimizer, Schedule
from tasks.hardware import native_bf16, training_device


def make_optimizer(model: nn.Module, cfg: Optimizer) -> torch.optim.Optimizer:
    # Weight decay only on conv/linear weights: decaying BN scales and biases hurts small nets.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))   # momentum: its beta1


def make_scheduler(opt: torch.optim.Optimizer, cfg: Schedule, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.name == "onecycle" and total_steps >= 3:   # (shorter, no cycle: the peak rate, as constant, below)
        # torch's peak is at step pct * total - 1: at least 1, so that the first step warms up at the start rate and
        # the cycle has a rise at all (shorter, a tiny data set trained at the floor rate; exactly 0, it divided by
        # zero: 0.25 of 4 steps, one epoch of 400 images in batches of 128)
        pct = max(cfg.warmup_fraction, 0.01, 2.0 / total_steps)
        low, high = cfg.cycle_momentum or (0.85, 0.95)   # (unused without cycling)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                   total_steps=total_steps, pct_start=pct,
                                                   cycle_momentum=cfg.cycle_momentum is not None,
                                                   base_momentum=low, max_momentum=high)
    if cfg.name == "cosine":
        warm = max(1, int(cfg.warmup_fraction * total_steps))
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(
            math.pi * min(s, total_steps) / total_steps))))
    # constant (after a linear warm-up over warmup_fraction of the steps), or a one-cycle of 1-2 steps
    warm = max(1, int(cfg.warmup_fraction * total_steps)) if cfg.name == "constant" else 1
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 1.0))


def autocast(bf16: bool, device_type: str = "cpu") -> torch.autocast:
    """bf16 autocast on ``device_type`` ("cpu" or "cuda") when asked for and native there, else a no-op region."""
    native = native_bf16(device_type)
    if bf16 and not native:
        _note_no_bf16(device_type)
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16 and native)


@functools.cache
def _note_no_bf16(device_type: str) -> None:
    what = "this GPU has no native bf16" if device_type == "cuda" else "this CPU has no native bf16 (AVX512-BF16 / AMX)"
    print(f"note: {what}; bf16 autocast is off, training in fp32", file=sys.stderr)


Inputs = torch.Tensor | tuple[torch.Tensor, ...]


def to_device(x: Inputs, device: torch.device) -> Inputs:
    """A batch's tensor (or tuple of tensors) on ``device``; the same objects when they are there already."""
    if isinstance(x, tuple):
        return tuple(t.to(device, non_blocking=True) for t in x)
    return x.to(device, non_blocking=True)


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any, such as an ONNX teacher)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@contextlib.contextmanager
def on_device(model: nn.Module, spec: Any, layout: Callable[[str], torch.memory_format] | None = None
              ) -> Iterator[torch.device]:
    """``model`` on the device of ``spec.device`` (``tasks.hardware.training_device``) for a training run, and back
    on the CPU after it, where it is saved, scored on test and exported; ``layout(device_type)``: the memory format
    its weights take on each (the image kit's). On the CPU nothing moves."""
    device = training_device(spec.device)
    if device.type == "cpu":
        yield device
        return
    model.to(device, **({"memory_format": layout(device.type)} if layout else {}))
    try:
        yield device
    finally:
        model.to("cpu", **({"memory_format": layout("cpu")} if layout else {}))


def weight_average(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """PyTorch's ``AveragedModel`` of ``model`` as an exponential moving average of its parameters and float buffers
    (batch-norm statistics); integer buffers (batch counters) follow the model. The decay warms up as TensorFlow's
    ``ExponentialMovingAverage(num_updates=...)`` does, ``min(decay, (1 + n) / (10 + n))`` at update ``n``: early on
    the average follows the model instead of holding on to its random start (with 0.998 from the first step, a
    Fashion-MNIST teacher's average still scored 15 % after three epochs of 215 steps), and a short schedule (the
    smoke profile's one epoch) keeps a usable model."""
    from torch.optim.swa_utils import AveragedModel

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        if averaged[0].is_floating_point():
            n = float(updates)
            torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))
        else:   # batch counters: the model's (a float average would truncate them)
            for mine, theirs in zip(averaged, current, strict=True):
                mine.copy_(theirs)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


EpochHook = Callable[[int, dict[str, float]], None]
#: ``loss_fn(model, x, y) -> (loss, logits)``; runs inside the autocast region of a training step.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class History(list[dict[str, float]]):
    """A training run's per-epoch scores (a list, one dict an epoch, as the plots CSV has them) and which weights it
    kept: ``kept_epoch`` (1-based; 0 for the starting weights of a warm start that no epoch beat) and ``kept``, their
    ``val_*`` scores. MLflow's run value of a per-epoch metric is its last epoch's; ``publish_training`` logs these
    as ``best_epoch`` and ``best_val_*``, so the runs table also shows the model the stage wrote."""

    def __init__(self, rows: list[dict[str, float]], kept_epoch: int, kept: dict[str, float]) -> None:
        super().__init__(rows)
        self.kept_epoch = kept_epoch
        self.kept = {k: v for k, v in kept.items() if k.startswith("val_")}


def cross_entropy_loss(label_smoothing: float) -> LossFn:
    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing), logits

    return loss_fn


def train_step(model: nn.Module, x: Inputs, y: torch.Tensor,
               opt: torch.optim.Optimizer, loss_fn: LossFn, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step: gradients zeroed, forward with autograd on, backward, update. ``x`` is what
    ``loss_fn`` feeds the model (a tuple for the recommender's two inputs), on the model's device."""
    opt.zero_grad(set_to_none=True)
    with autocast(bf16, y.device.type):
        loss, logits = loss_fn(model, x, y)
    loss.backward()
    opt.step()
    return loss.detach(), logits.detach()


def fit_best(model: nn.Module, loss_fn: Callable, count: int,
             batch: Callable[[torch.Tensor], tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]],
             spec: Any, scores: Callable[[], dict[str, float]], key: str, on_epoch: EpochHook | None = None,
             before_epoch: Callable[[int], None] | None = None, bf16: bool = False,
             from_start: bool = False) -> History:
    """Train ``model`` in place for ``spec.epochs`` over ``count`` rows, ``batch(indices)`` giving a batch's inputs
    and targets in a seeded order; after each epoch ``scores()`` (``train_*`` and ``val_*``, in eval mode, on the
    model's device). The epoch with the best ``key`` (a validation score: higher is better) is restored at the end;
    return the history. ``from_start``: the weights it starts from (a warm start's) compete too, scored before the
    first epoch; the history says which weights were kept. On ``spec.device``, the model back on the CPU at the end.
    The loop of the families whose training takes minutes (no checkpoint to resume)."""
    with on_device(model, spec) as device:
        return _fit_best(model, loss_fn, count, batch, spec, scores, key, on_epoch, before_epoch, bf16, from_start,
                         device)


def _fit_best(model: nn.Module, loss_fn: Callable, count: int, batch: Callable, spec: Any,
              scores: Callable[[], dict[str, float]], key: str, on_epoch: EpochHook | None,
              before_epoch: Callable[[int], None] | None, bf16: bool, from_start: bool, device: torch.device
              ) -> History:
    steps = math.ceil(count / spec.batch_size)
    opt = make_optimizer(model, spec.optimizer)
    sched = make_scheduler(opt, spec.schedule, spec.epochs * steps)
    gen = torch.Generator().manual_seed(spec.seed)
    history: list[dict[str, float]] = []
    start_scores = scores() if from_start else {key: -math.inf}
    start = start_scores[key]
    # (score, weights, epoch: 0 for the start's, its scores)
    best: tuple[float, dict, int, dict[str, float]] = (start, copy.deepcopy(model.state_dict()), 0, start_scores)
    for epoch in range(spec.epochs):
        if before_epoch:
            before_epoch(epoch)
        model.train()
        order, loss_sum = torch.randperm(count, generator=gen), 0.0
        for first in range(0, count, spec.batch_size):
            inputs, y = batch(order[first:first + spec.batch_size])
            loss, _ = train_step(model, to_device(inputs, device), y.to(device), opt, loss_fn, bf16=bf16)
            sched.step()
            loss_sum += loss.item() * len(y)
        metrics = {"train_loss": loss_sum / count, **scores(), "lr": sched.get_last_lr()[0]}
        history.append(metrics)
        print(f"epoch {epoch + 1}/{spec.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        if math.isnan(metrics[key]):   # never better than anything: the start's weights would be kept, untrained
            raise PipelineError(f"{key} is not a number after epoch {epoch + 1} (a validation split of one class has "
                                "no AUC): no epoch can be chosen by it")
        if metrics[key] > best[0]:
            best = (metrics[key], copy.deepcopy(model.state_dict()), epoch + 1, metrics)
        if on_epoch:
            on_epoch(epoch, metrics)
    if from_start and not any(m[key] > start for m in history):
        print(f"no epoch beat the starting weights' {key} {best[0]:.4f}: kept them", flush=True)
    model.load_state_dict(best[1])
    return History(history, best[2], best[3])


