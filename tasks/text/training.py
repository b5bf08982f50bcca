"""Training and scoring of the text family's models: splits of token ids, accuracy, the distillation loss.

Batches are cut to their longest sentence (the models' outputs do not depend on padding, so this is exact and
saves the LSTM most of its steps). The loop keeps the epoch with the best validation accuracy and restores it.

Distillation (Tang et al. 2019): the frozen teacher's logits and pooled features are computed once for the training
rows and the transfer set (augmented copies, no label of their own: ``y = -1``), in eval mode, exactly what a
per-batch teacher pass would give. total = ground_truth·CE(y) on labelled rows + target·KL at temperature T, × T²
+ feature·MSE(adapter(student features), teacher features) + label·CE(teacher argmax). Only the teacher runs
without gradients; the shared ``train_step`` zeroes them every step.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from tasks.distillation import soft_target_kl
from tasks.errors import DataFormatError
from tasks.family_config import LossWeights, Training
from tasks.io import read_manifest, read_prepared
from tasks.training import autocast, device_of, fit_best, to_device

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TextSplit:
    texts: list[str]
    y: torch.Tensor         # int64 (N,); -1 for a transfer-set copy (no label of its own)

    @classmethod
    def load(cls, directory: Path, name: str) -> TextSplit:
        """The ``name`` rows of ``sentences.csv`` as prepare_text wrote it; the file missing or unreadable (a stage
        run before prepare_text, a wrong ``--data``), one line naming it rather than pandas' traceback."""
        path = directory / "sentences.csv"
        rows = read_prepared(path, lambda found: pd.read_csv(found, dtype={"text": str}, keep_default_na=False),
                             "prepare_text")
        if missing := sorted({"text", "label", "split"} - set(rows.columns)):
            raise DataFormatError(f"{path}: no column {', '.join(missing)}; re-run prepare_text")
        rows = rows[rows.split == name]
        return cls(rows.text.tolist(), torch.tensor(rows.label.to_numpy(np.int64)))

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Encoded:
    """A split as one model's tokenizer encodes it: ids (N, longest) right-padded with 0, lengths (N,)."""

    ids: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module, texts: list[str]) -> Encoded:
        tokenized = model.student if isinstance(model, TextDistiller) else model
        return cls(*tokenized.encode(texts))

    def batch(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids cut to the batch's longest sentence, lengths)."""
        ids, lengths = self.ids[idx], self.lengths[idx]
        return ids[:, : max(int(lengths.max()), 1)], lengths


def manifest(data_dir: Path) -> dict:
    return read_manifest(data_dir, "prepare_text")


def student_shape(data_dir: Path) -> dict:
    """What building a word-level model for this data takes: vocabulary, longest input, number of classes, and the
    pattern its words were split with."""
    found = manifest(data_dir)
    return {"vocabulary": found["vocabulary"], "max_tokens": found["max_tokens"], "classes": len(found["labels"]),
            "pattern": found["pattern"]}


@torch.no_grad()
def predict(model: nn.Module, texts: list[str], batch_size: int = 512, features: bool = False, bf16: bool = False
            ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Logits of every text (and pooled features, with ``features``), in eval mode (under bf16 autocast with
    ``bf16`` where native); batched by length (exact: the models' outputs do not depend on padding)."""
    model.eval()
    encoded = Encoded.of(model, texts)
    order = torch.argsort(encoded.lengths, stable=True)
    logits, feats = [], []
    device = device_of(model)
    for i in range(0, len(texts), batch_size):
        with autocast(bf16, device.type):
            out = model.forward_features(*to_device(encoded.batch(order[i:i + batch_size]), device))
        logits.append(out[0].float().cpu())
        feats.append(out[1].float().cpu())
    unsort = torch.argsort(order)
    logits_all = torch.cat(logits)[unsort].numpy() if logits else np.zeros((0, 0), np.float32)
    if not features:
        return logits_all
    return logits_all, torch.cat(feats)[unsort].numpy()


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def evaluate_text(model: nn.Module, split: TextSplit, batch_size: int = 512, bf16: bool = False) -> dict[str, float]:
    logits = predict(model, split.texts, batch_size, bf16=bf16)
    loss = F.cross_entropy(torch.from_numpy(logits), split.y).item()
    return {"accuracy": accuracy(logits, split.y.numpy()), "loss": loss}


class TextDistiller(nn.Module):
    """The student plus the adapter that maps its features onto the teacher's; ``forward`` is the student's."""

    def __init__(self, student: nn.Module, teacher_width: int, weights: LossWeights, temperature: float) -> None:
        super().__init__()
        self.student, self.weights, self.temperature = student, weights, temperature
        self.adapter = nn.Linear(student.feature_width, teacher_width) if weights.feature else None

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.student(ids, lengths)

    def forward_features(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student.forward_features(ids, lengths)

    def loss(self, ids: torch.Tensor, lengths: torch.Tensor, t_logits: torch.Tensor, t_features: torch.Tensor,
             y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights
        logits, features = self.student.forward_features(ids, lengths)
        # a zero that backpropagates to nothing: a batch no weighted term reads (transfer copies alone, labels alone
        # weighted) leaves every parameter's gradient None, so the optimizer skips it (not an error in backward)
        total = logits.new_zeros((), dtype=torch.float32, requires_grad=True)
        labelled = y >= 0
        if w.ground_truth and labelled.any():
            total = total + w.ground_truth * F.cross_entropy(logits[labelled], y[labelled])
        if w.target:
            total = total + w.target * soft_target_kl(logits, t_logits, self.temperature)
        if w.feature:
            total = total + w.feature * F.mse_loss(self.adapter(features), t_features)
        if w.label:
            total = total + w.label * F.cross_entropy(logits, t_logits.argmax(1))
        return total, logits


def label_loss(model: nn.Module, inputs: tuple[torch.Tensor, ...], y: torch.Tensor):
    logits = model(*inputs[:2])
    return F.cross_entropy(logits, y), logits


def distilled_loss(model: TextDistiller, inputs: tuple[torch.Tensor, ...], y: torch.Tensor):
    return model.loss(*inputs, y)


@dataclass(frozen=True)
class TrainingRows:
    """What one epoch iterates over: texts with labels (-1: none), encoded for the model trained, plus, when
    distilling, the teacher's logits and features for each."""

    split: TextSplit
    encoded: Encoded
    teacher_logits: torch.Tensor | None = None
    teacher_features: torch.Tensor | None = None

    def batch(self, idx: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        inputs = self.encoded.batch(idx)
        if self.teacher_logits is not None:
            inputs = (*inputs, self.teacher_logits[idx], self.teacher_features[idx])
        return inputs, self.split.y[idx]


def fit_text(model: nn.Module, loss_fn: Callable, rows: TrainingRows, val: TextSplit, spec: Training,
             on_epoch: Callable[[int, dict[str, float]], None] | None = None, bf16: bool = False
             ) -> list[dict[str, float]]:
    """Train ``model`` in place (under bf16 autocast with ``bf16`` where native); return the history. The best epoch
    by validation accuracy is restored at the end."""
    keep = (rows.split.y >= 0).numpy()
    labelled = TextSplit([t for t, k in zip(rows.split.texts, keep, strict=True) if k], rows.split.y[keep])

    def scores() -> dict[str, float]:   # the labelled training sentences scored as the validation ones are
        return {**{f"train_{k}": v for k, v in evaluate_text(model, labelled, spec.eval_batch_size, bf16).items()},
                **{f"val_{k}": v for k, v in evaluate_text(model, val, spec.eval_batch_size, bf16).items()}}

    torch.manual_seed(spec.seed)   # dropout's draws: a stage's result depends on its params only
    return fit_best(model, loss_fn, len(rows.split), rows.batch, spec, scores, "val_accuracy", on_epoch, bf16=bf16)
