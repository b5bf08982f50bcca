"""Supervised training loop shared by stages: bf16 autocast and channels_last where the CPU has them natively,
checkpoint and resume per epoch."""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tasks.checkpoints import load_checkpoint, save_checkpoint
from tasks.errors import DataFormatError
from tasks.family_config import Optimizer, Schedule
from tasks.hardware import native_bf16
from tasks.io import read_manifest
from tasks.observers import frozen_observers

if TYPE_CHECKING:  # annotations only: the recommender runs this code without the vision config
    from tasks.vision_config import Augmentation, TrainingRecipe

@dataclass(frozen=True)
class Pixels:
    """Per-channel normalisation of uint8 images, ``(x / 255 - mean) / std``: the data's own (its manifest's), so
    every stage and the exported model's callers normalise alike. The default (none) is for a split built by hand."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


@dataclass(frozen=True)
class Split:
    """Images as uint8 (N, H, W) for one channel or (N, C, H, W), labels as int64 (N,), and what the data's manifest
    says of them: the pixel normalisation and the class names (their order is the label's)."""

    x: torch.Tensor
    y: torch.Tensor
    pixels: Pixels = Pixels()
    classes: tuple[str, ...] = ()

    @classmethod
    def load(cls, directory: Path, name: str) -> Split:
        """Load ``<name>_x.npy`` (uint8 images) and ``<name>_y.npy`` (labels) with ``manifest.json``'s pixel
        statistics and classes, as prepare_vision wrote them."""
        x = np.load(directory / f"{name}_x.npy", allow_pickle=False)
        y = np.load(directory / f"{name}_y.npy", allow_pickle=False)
        image = image_manifest(directory)
        return cls(torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64)),
                   Pixels(tuple(image["mean"]), tuple(image["std"])), tuple(image["classes"]))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image, as the models take it."""
        return (1, *self.x.shape[1:]) if self.x.ndim == 3 else tuple(self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.y.max()) + 1

    def model_shape(self) -> dict[str, Any]:
        """The constructor arguments of a model for this data (``tasks.vision_models``); saved with it."""
        return {"num_classes": self.num_classes, "input_shape": list(self.image_shape)}

    def inputs(self, index: Any = slice(None)) -> torch.Tensor:
        """The model inputs of ``x[index]``: see ``to_input``."""
        return to_input(self.x[index], self.pixels)

    def head(self, n: int) -> Split:
        """The first ``n`` rows, same normalisation and classes."""
        return dataclasses.replace(self, x=self.x[:n], y=self.y[:n])


def model_shape(directory: Path) -> dict[str, Any]:
    """``Split.model_shape`` of the processed data in ``directory``, from its manifest."""
    image = image_manifest(directory)
    return {"num_classes": len(image["classes"]), "input_shape": [image["channels"], image["height"], image["width"]]}


def image_manifest(directory: Path) -> dict[str, Any]:
    """``manifest.json``'s ``image`` section of processed image data: channels, height, width, mean, std, classes."""
    manifest = read_manifest(directory, "prepare_vision")
    if "image" not in manifest:
        raise DataFormatError(f"{directory}/manifest.json: no image description; re-run prepare_vision")
    return manifest["image"]


@functools.cache
def memory_format() -> torch.memory_format:
    """``channels_last`` where the CPU has AVX512 (with bf16 autocast it trains ~4x faster there); the default
    layout elsewhere: on an AVX2-only CPU, torch 2.13's channels_last convolution backward hangs with 2 threads and
    corrupts memory with 1 (seen on an AVX2 EPYC)."""
    return torch.channels_last if torch.cpu._is_avx512_supported() else torch.contiguous_format


def to_input(x: torch.Tensor, pixels: Pixels) -> torch.Tensor:
    """uint8 (N, H, W) or (N, C, H, W) -> float (N, C, H, W) normalised per channel, in ``memory_format()``."""
    x = x.float() / 255.0
    x = x.unsqueeze(1) if x.ndim == 3 else x
    if len(pixels.mean) == 1:  # python scalars: the arithmetic every stage has always done on one channel
        x = (x - pixels.mean[0]) / pixels.std[0]
    else:
        x = (x - torch.tensor(pixels.mean).view(1, -1, 1, 1)) / torch.tensor(pixels.std).view(1, -1, 1, 1)
    return x.contiguous(memory_format=memory_format())


def augment(x: torch.Tensor, cfg: Augmentation, gen: torch.Generator, pixels: Pixels) -> torch.Tensor:
    """Random crop from an image padded with black and random horizontal flip, vectorised over the batch."""
    n, c, h, w = x.shape
    if cfg.crop_padding:
        p = cfg.crop_padding
        black = [float(-m / s) for m, s in zip(pixels.mean, pixels.std, strict=True)]
        padded = torch.cat([F.pad(x[:, i:i + 1], (p, p, p, p), value=black[i]) for i in range(c)], 1) if c > 1 \
            else F.pad(x, (p, p, p, p), value=black[0])
        oy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        rows = (torch.arange(h)[None, :] + oy[:, None])[:, None, :, None]
        cols = (torch.arange(w)[None, :] + ox[:, None])[:, None, None, :]
        x = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if cfg.horizontal_flip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.contiguous(memory_format=memory_format())


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


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int, bf16: bool = False) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``split``; quantization ranges stay as they are."""
    model.eval()
    correct, loss = 0, 0.0
    with frozen_observers(model):
        for i in range(0, len(split.y), batch_size):
            x, y = split.inputs(slice(i, i + batch_size)), split.y[i:i + batch_size]
            with autocast(bf16):
                logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    return {"accuracy": correct / len(split.y), "loss": loss / len(split.y)}


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


def fit(model: nn.Module, train: Split, val: Split, spec: TrainingRecipe, checkpoint: Path, fingerprint: str,
        on_epoch: EpochHook | None = None, loss_fn: LossFn | None = None,
        before_epoch: Callable[[int], None] | None = None) -> list[dict[str, float]]:
    """Train ``model``; checkpoint after every epoch and resume from ``checkpoint`` when its fingerprint matches.

    ``loss_fn`` defaults to cross-entropy with the spec's label smoothing; distillation passes its own.
    ``before_epoch(epoch)`` runs at the start of every epoch, resumed ones included (QAT freezes observers there).
    """
    loss_fn = loss_fn or cross_entropy_loss(spec.label_smoothing)
    steps_per_epoch = math.ceil(len(train.y) / spec.batch_size)
    opt = make_optimizer(model, spec.optimizer)
    sched = make_scheduler(opt, spec.schedule, spec.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(spec.seed)
    history: list[dict[str, float]] = []
    state = load_checkpoint(checkpoint, fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        history = list(state["history"])
    for epoch in range(len(history), spec.epochs):
        if before_epoch:
            before_epoch(epoch)
        metrics = _train_epoch(model, train, spec, opt, sched, gen, loss_fn, f"epoch {epoch + 1}/{spec.epochs}")
        metrics.update({f"val_{k}": v for k, v in evaluate(model, val, spec.eval_batch_size, spec.bf16).items()})
        metrics["lr"] = sched.get_last_lr()[0]
        history.append(metrics)
        tqdm.write(f"epoch {epoch + 1}/{spec.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                     "scheduler": sched.state_dict(), "generator": gen.get_state(),
                                     "history": history}, fingerprint)
        if on_epoch:
            on_epoch(epoch, metrics)
    return history


def _train_epoch(model: nn.Module, train: Split, spec: TrainingRecipe, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator, loss_fn: LossFn,
                 desc: str) -> dict[str, float]:
    model.train()
    order = torch.randperm(len(train.y), generator=gen)
    seen, correct, loss_sum = 0, 0, 0.0
    # disable=None: no bar when stderr is not a terminal (CI, Prefect workers, log files), where each redraw is a line
    bar = tqdm(range(0, len(order), spec.batch_size), desc=desc, unit="batch", leave=True, mininterval=2.0,
               disable=None)
    for start in bar:
        idx = order[start:start + spec.batch_size]
        x, y = augment(train.inputs(idx), spec.augmentation, gen, train.pixels), train.y[idx]
        loss, logits = train_step(model, x, y, opt, loss_fn, spec.bf16)
        sched.step()
        seen += len(y)
        correct += (logits.argmax(1) == y).sum().item()
        loss_sum += loss.item() * len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
    return {"train_loss": loss_sum / seen, "train_accuracy": correct / seen}
