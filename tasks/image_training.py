"""Image data and the image families' training loop: uint8 splits with their normalisation and class names (from
the processed data's manifest), channels_last where the CPU has AVX512, random crop and flip, evaluation, and
``fit``, which checkpoints after every epoch and resumes (an image teacher trains for tens of minutes)."""
from __future__ import annotations

import dataclasses
import functools
import math
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
from tasks.conv_grad import matmul_weight_grads
from tasks.errors import DataFormatError, PipelineError
from tasks.io import read_manifest, read_prepared
from tasks.observers import frozen_observers
from tasks.stratify import stratified_pick
from tasks.training import (
    EpochHook,
    History,
    LossFn,
    autocast,
    cross_entropy_loss,
    device_of,
    make_optimizer,
    make_scheduler,
    on_device,
    train_step,
    weight_average,
)

if TYPE_CHECKING:  # annotations only
    from tasks.images.config import Augmentation, Erasing, TrainingRecipe


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
        statistics and classes, as the family's prepare stage wrote them; a file missing or unreadable, one line
        naming it."""
        x, y = (read_array(directory / f"{name}_{part}.npy") for part in "xy")
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
        """The constructor arguments of a model for this data (``tasks.images.models``); saved with it."""
        return {"num_classes": self.num_classes, "input_shape": list(self.image_shape)}

    def inputs(self, index: Any = slice(None)) -> torch.Tensor:
        """The model inputs of ``x[index]``: see ``to_input``."""
        return to_input(self.x[index], self.pixels)

    def head(self, n: int) -> Split:
        """The first ``n`` rows, same normalisation and classes."""
        return dataclasses.replace(self, x=self.x[:n], y=self.y[:n])

    def sample(self, n: int, seed: int = 0) -> Split:
        """``n`` rows drawn stratified by class (seeded), in their stored order; all of them when there are no more:
        what calibrates quantization sees every class however the split is stored (an image folder's comes class
        by class, so its first rows are of the first classes only)."""
        if n >= len(self.y):
            return self
        index = torch.from_numpy(stratified_pick(self.y.numpy(), n, np.random.default_rng(seed)))
        return dataclasses.replace(self, x=self.x[index], y=self.y[index])


class TrainingDiverged(PipelineError):
    """A training run whose loss is no longer finite: every later epoch would train NaN weights."""


def model_shape(directory: Path) -> dict[str, Any]:
    """``Split.model_shape`` of the processed data in ``directory``, from its manifest."""
    image = image_manifest(directory)
    return {"num_classes": len(image["classes"]), "input_shape": [image["channels"], image["height"], image["width"]]}


PREPARE = "its prepare stage (prepare_<family>)"   # what wrote a processed image folder


def read_array(path: Path) -> np.ndarray:
    """One array of processed image data (``tasks.io.read_prepared``: missing or unreadable, one line naming it)."""
    return read_prepared(path, lambda found: np.load(found, allow_pickle=False), PREPARE)


def image_manifest(directory: Path) -> dict[str, Any]:
    """``manifest.json``'s ``image`` section of processed image data: channels, height, width, mean, std, classes."""
    manifest = read_manifest(directory, PREPARE)
    if "image" not in manifest:
        raise DataFormatError(f"{directory}/manifest.json: no image description; re-run {PREPARE}")
    return manifest["image"]


@functools.cache
def memory_format(device_type: str = "cpu") -> torch.memory_format:
    """``channels_last`` on CUDA and where the CPU has AVX512 (with bf16 autocast it trains ~4x faster there); the
    default layout elsewhere: on an AVX2-only CPU, torch 2.13's channels_last convolution backward hangs with 2
    threads and corrupts memory with 1 (seen on an AVX2 EPYC)."""
    if device_type == "cuda" or torch.cpu._is_avx512_supported():
        return torch.channels_last
    return torch.contiguous_format


def on(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Model inputs made on the CPU, on ``device`` in its layout (on the CPU: ``x`` itself)."""
    if device.type == "cpu":
        return x
    return x.to(device, non_blocking=True).contiguous(memory_format=memory_format(device.type))


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
    """Random crop from an image padded with black, random horizontal flip and random erasing (each where ``cfg``
    asks for it), vectorised over the batch."""
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
    if cfg.erasing is not None and cfg.erasing.probability > 0:
        x = erase(x, cfg.erasing, gen)
    return x.contiguous(memory_format=memory_format())


def erase(x: torch.Tensor, cfg: Erasing, gen: torch.Generator) -> torch.Tensor:
    """Random erasing of normalised images (N, C, H, W): see ``tasks.images.config.Erasing``."""
    n, _, h, w = x.shape
    chosen = torch.rand(n, generator=gen) < cfg.probability
    low, high = cfg.area
    area = (low + (high - low) * torch.rand(n, generator=gen)) * (h * w)
    aspect = torch.exp((2 * torch.rand(n, generator=gen) - 1) * math.log(cfg.max_aspect))
    tall = (area * aspect).sqrt().round().clamp(1, h).long()
    wide = (area / aspect).sqrt().round().clamp(1, w).long()
    top = (torch.rand(n, generator=gen) * (h - tall + 1)).long()
    left = (torch.rand(n, generator=gen) * (w - wide + 1)).long()
    rows, cols = torch.arange(h)[None, :], torch.arange(w)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + tall)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + wide)[:, None])
    box = in_rows[:, :, None] & in_cols[:, None, :] & chosen[:, None, None]
    return x.masked_fill(box[:, None], 0.0)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int, bf16: bool = False) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``split`` (on the model's device); quantization ranges stay
    as they are."""
    model.eval()
    correct, loss = 0, 0.0
    device = device_of(model)
    with frozen_observers(model):
        for i in range(0, len(split.y), batch_size):
            x, y = on(split.inputs(slice(i, i + batch_size)), device), split.y[i:i + batch_size].to(device)
            with autocast(bf16, device.type):
                logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    return {"accuracy": correct / len(split.y), "loss": loss / len(split.y)}


def fit(model: nn.Module, train: Split, val: Split, spec: TrainingRecipe, checkpoint: Path, fingerprint: str,
        on_epoch: EpochHook | None = None, loss_fn: LossFn | None = None,
        before_epoch: Callable[[int], None] | None = None) -> History:
    """Train ``model``; checkpoint after every epoch and resume from ``checkpoint`` when its fingerprint matches.

    ``loss_fn`` defaults to cross-entropy with the spec's label smoothing; distillation passes its own.
    ``before_epoch(epoch)`` runs at the start of every epoch, resumed ones included (QAT freezes observers there);
    ``on_epoch(epoch, metrics)`` after every epoch, a resumed run's restored ones first (its curves are whole).
    Trains on ``spec.device`` (``tasks.training.on_device``); the model is back on the CPU at the end.
    """
    with on_device(model, spec, memory_format) as device:
        return _fit(model, train, val, spec, checkpoint, fingerprint, on_epoch, loss_fn, before_epoch, device)


def _fit(model: nn.Module, train: Split, val: Split, spec: TrainingRecipe, checkpoint: Path, fingerprint: str,
         on_epoch: EpochHook | None, loss_fn: LossFn | None, before_epoch: Callable[[int], None] | None,
         device: torch.device) -> History:
    loss_fn = loss_fn or cross_entropy_loss(spec.label_smoothing)
    steps_per_epoch = len(batch_starts(len(train.y), spec.batch_size))
    opt = make_optimizer(model, spec.optimizer)
    sched = make_scheduler(opt, spec.schedule, spec.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(spec.seed)
    history: list[dict[str, float]] = []
    # what is kept: a distiller's student (tasks.distillation.FrozenTeacher; adapters are scaffolding), as a moving
    # average with ``ema``
    kept = getattr(model, "student", model)
    average = weight_average(kept, spec.ema.decay) if spec.ema else None
    state = load_checkpoint(checkpoint, fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        history = list(state["history"])
        if average is not None:
            average.load_state_dict(state["ema"])
        if on_epoch:   # the restored epochs too: a resumed run's curves start at epoch 1, not at the resumed one
            for epoch, metrics in enumerate(history):
                on_epoch(epoch, metrics)
    scored = average.module if average is not None else model
    after_step = (lambda: average.update_parameters(kept)) if average is not None else None
    for epoch in range(len(history), spec.epochs):
        if before_epoch:
            before_epoch(epoch)
        metrics = train_epoch(model, train, spec, opt, sched, gen, loss_fn, f"epoch {epoch + 1}/{spec.epochs}",
                              device, after_step)
        if not math.isfinite(metrics["train_loss"]):   # no later epoch comes back from NaN weights
            raise TrainingDiverged(f"epoch {epoch + 1}/{spec.epochs}: the training loss is {metrics['train_loss']}: "
                                   f"the run diverged at learning rate {spec.optimizer.lr:g} (lower it); nothing of "
                                   "this epoch was kept")
        metrics.update({f"val_{k}": v for k, v in evaluate(scored, val, spec.eval_batch_size, spec.bf16).items()})
        metrics["lr"] = sched.get_last_lr()[0]
        history.append(metrics)
        tqdm.write(f"epoch {epoch + 1}/{spec.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        extra = {"ema": average.state_dict()} if average is not None else {}
        save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                     "scheduler": sched.state_dict(), "generator": gen.get_state(),
                                     "history": history, **extra}, fingerprint)
        if on_epoch:
            on_epoch(epoch, metrics)
    if average is not None:   # the average is the model trained
        kept.load_state_dict(average.module.state_dict())
    # the last epoch is kept (no best epoch restored): its val_* scored the weights kept, the average's with ``ema``
    return History(history, len(history), history[-1] if history else {})


# Profiler regions of a training step (``flows.step_profile``); without a profiler running they cost nothing measurable
BATCH, AUGMENT = "batch: uint8 to normalised float", "augmentation"


def batch_starts(rows: int, batch_size: int) -> list[int]:
    """Where each training batch of an epoch starts: every ``batch_size`` rows, but a last batch of one row joins
    the one before it (a batch norm cannot normalise one value per channel: a 1x1 map of a single image)."""
    starts = list(range(0, rows, batch_size))
    return starts[:-1] if len(starts) > 1 and rows - starts[-1] == 1 else starts


def train_epoch(model: nn.Module, train: Split, spec: TrainingRecipe, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator, loss_fn: LossFn,
                desc: str, device: torch.device, after_step: Callable[[], None] | None = None) -> dict[str, float]:
    """One pass over ``train`` in a random order (from ``gen``), a step per batch of ``spec.batch_size``
    (``batch_starts``): the batch made, augmented, moved to ``device``, one ``train_step``, the schedule's step,
    ``after_step``. In bf16 on a CPU
    with AMX, small convolutions take their weight gradients by matmul (``tasks.conv_grad``)."""
    model.train()
    order = torch.randperm(len(train.y), generator=gen)
    seen, correct, loss_sum = 0, 0, 0.0
    # disable=None: no bar when stderr is not a terminal (CI, Prefect workers, log files), where each redraw is a line
    starts = batch_starts(len(order), spec.batch_size)
    bar = tqdm(starts, desc=desc, unit="batch", leave=True, mininterval=2.0, disable=None)
    for start, end in zip(bar, [*starts[1:], len(order)], strict=True):
        idx = order[start:end]
        with torch.profiler.record_function(BATCH):
            x = train.inputs(idx)
        with torch.profiler.record_function(AUGMENT):
            x = augment(x, spec.augmentation, gen, train.pixels)
        x, y = on(x, device), train.y[idx].to(device)
        with matmul_weight_grads(model, spec.bf16, device):
            loss, logits = train_step(model, x, y, opt, loss_fn, spec.bf16)
        sched.step()
        if after_step:
            after_step()
        seen += len(y)
        correct += (logits.argmax(1) == y).sum().item()
        loss_sum += loss.item() * len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
    return {"train_loss": loss_sum / seen, "train_accuracy": correct / seen}
