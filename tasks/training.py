"""The training loop every family shares: optimizer and schedule from params, bf16 autocast where the CPU computes
bf16 natively, one optimisation step (gradients zeroed, forward with autograd on, backward, update), and
``fit_best``, the loop of the families whose training takes minutes. Image data and the image families' loop with
per-epoch checkpoints are in ``tasks.image_training``."""
from __future__ import annotations

import copy
import functools
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tasks.family_config import Optimizer, Schedule
from tasks.hardware import native_bf16


def make_optimizer(model: nn.Module, cfg: Optimizer) -> torch.optim.Optimizer:
    # Weight decay only on conv/linear weights: decaying BN scales and biases hurts small nets.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(opt: torch.optim.Optimizer, cfg: Schedule, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                   total_steps=total_steps, pct_start=max(cfg.warmup_fraction, 0.01))
    if cfg.name == "cosine":
        warm = max(1, int(cfg.warmup_fraction * total_steps))
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(
            math.pi * min(s, total_steps) / total_steps))))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def autocast(bf16: bool) -> torch.autocast:
    """bf16 autocast on the CPU when asked for and native here, else a no-op region."""
    if bf16 and not native_bf16():
        _note_no_bf16()
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and native_bf16())


@functools.cache
def _note_no_bf16() -> None:
    print("note: this CPU has no native bf16 (AVX512-BF16 / AMX); bf16 autocast is off, training in fp32",
          file=sys.stderr)


EpochHook = Callable[[int, dict[str, float]], None]
#: ``loss_fn(model, x, y) -> (loss, logits)``; runs inside the autocast region of a training step.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def cross_entropy_loss(label_smoothing: float) -> LossFn:
    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing), logits

    return loss_fn


def train_step(model: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...], y: torch.Tensor,
               opt: torch.optim.Optimizer, loss_fn: LossFn, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step: gradients zeroed, forward with autograd on, backward, update. ``x`` is what
    ``loss_fn`` feeds the model (a tuple for the recommender's two inputs)."""
    opt.zero_grad(set_to_none=True)
    with autocast(bf16):
        loss, logits = loss_fn(model, x, y)
    loss.backward()
    opt.step()
    return loss.detach(), logits.detach()


def fit_best(model: nn.Module, loss_fn: Callable, count: int,
             batch: Callable[[torch.Tensor], tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]],
             spec: Any, scores: Callable[[], dict[str, float]], key: str, on_epoch: EpochHook | None = None,
             before_epoch: Callable[[int], None] | None = None, bf16: bool = False,
             from_start: bool = False) -> list[dict[str, float]]:
    """Train ``model`` in place for ``spec.epochs`` over ``count`` rows, ``batch(indices)`` giving a batch's inputs
    and targets in a seeded order; after each epoch ``scores()`` (``train_*`` and ``val_*``, in eval mode). The
    epoch with the best ``key`` (a validation score: higher is better) is restored at the end; return the history.
    ``from_start``: the weights it starts from (a warm start's) compete too, scored before the first epoch.
    The loop of the families whose training takes minutes (no checkpoint to resume)."""
    steps = math.ceil(count / spec.batch_size)
    opt = make_optimizer(model, spec.optimizer)
    sched = make_scheduler(opt, spec.schedule, spec.epochs * steps)
    gen = torch.Generator().manual_seed(spec.seed)
    history: list[dict[str, float]] = []
    start = scores()[key] if from_start else -math.inf
    best: tuple[float, dict] = (start, copy.deepcopy(model.state_dict()))
    for epoch in range(spec.epochs):
        if before_epoch:
            before_epoch(epoch)
        model.train()
        order, loss_sum = torch.randperm(count, generator=gen), 0.0
        for start in range(0, count, spec.batch_size):
            inputs, y = batch(order[start:start + spec.batch_size])
            loss, _ = train_step(model, inputs, y, opt, loss_fn, bf16=bf16)
            sched.step()
            loss_sum += loss.item() * len(y)
        metrics = {"train_loss": loss_sum / count, **scores(), "lr": sched.get_last_lr()[0]}
        history.append(metrics)
        print(f"epoch {epoch + 1}/{spec.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        if metrics[key] > best[0]:
            best = (metrics[key], copy.deepcopy(model.state_dict()))
        if on_epoch:
            on_epoch(epoch, metrics)
    if from_start and not any(m[key] > start for m in history):
        print(f"no epoch beat the starting weights' {key} {best[0]:.4f}: kept them", flush=True)
    model.load_state_dict(best[1])
    return history


