"""Training and scoring of click-through models: data splits, the loss (labels or distillation), AUC / logloss.

The loop keeps the epoch with the best validation AUC (embedding models overfit within a few epochs), restoring
its weights at the end; optimisers and schedules are the shared ones of ``tasks.training``.

Distillation for a binary target: BCE against the teacher's temperature-softened probability σ(t/T), scaled by
T², mixed with BCE against the label; optional alignment of the student's field vectors to the teacher's through a
learned linear adapter. Only the teacher runs under ``no_grad``; ``train_step`` zeroes gradients every step.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn

from tasks.config import DistillRecsys, LossWeights, Training
from tasks.training import make_optimizer, make_scheduler


@dataclass(frozen=True)
class CtrSplit:
    fields: torch.Tensor   # int64 (N, F)
    genres: torch.Tensor   # float32 (N, G)
    y: torch.Tensor        # float32 (N,)

    @classmethod
    def load(cls, directory: Path, name: str) -> CtrSplit:
        arrays = [np.load(directory / f"{name}_{part}.npy", allow_pickle=False) for part in ("fields", "genres", "y")]
        return cls(*(torch.from_numpy(a.copy()) for a in arrays))

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.fields[idx], self.genres[idx], self.y[idx]


def load_ctr_data(data_dir: Path) -> tuple[CtrSplit, CtrSplit, CtrSplit, dict[str, int]]:
    """(train, val, test, model shape: vocabulary, fields, genres) from prepare_recsys's folder."""
    import json

    features = json.loads((data_dir / "features.json").read_text())
    shape = {"vocabulary": features["vocabulary"], "fields": len(features["fields"]), "genres": len(features["genres"])}
    return (*(CtrSplit.load(data_dir, s) for s in ("train", "val", "test")), shape)


@torch.no_grad()
def predict_logits(model: nn.Module, split: CtrSplit, batch_size: int = 8192) -> np.ndarray:
    model.eval()
    return np.concatenate([model(*split.batch(slice(i, i + batch_size))[:2]).float().numpy()
                           for i in range(0, len(split), batch_size)])


def ctr_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    p = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
    return {"auc": float(roc_auc_score(labels, p)), "logloss": float(log_loss(labels, p, labels=[0, 1]))}


def evaluate_ctr(model: nn.Module, split: CtrSplit, batch_size: int = 8192) -> dict[str, float]:
    return ctr_metrics(split.y.numpy(), 1 / (1 + np.exp(-predict_logits(model, split, batch_size))))


#: ``loss_fn(model, fields, genres, y) -> (loss, logits)``
CtrLossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def label_loss(model: nn.Module, fields: torch.Tensor, genres: torch.Tensor, y: torch.Tensor):
    logits = model(fields, genres)
    return F.binary_cross_entropy_with_logits(logits, y), logits


class CtrDistiller(nn.Module):
    """Student plus the field-vector adapter; the frozen teacher is held outside ``parameters``/``state_dict``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillRecsys) -> None:
        super().__init__()
        self.student, self.temperature, self.weights = student, cfg.temperature, cfg.weights
        teacher.eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)
        self.adapter = nn.Linear(student.arch.dim, teacher.arch.dim) if cfg.weights.feature else None

    def train(self, mode: bool = True) -> CtrDistiller:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, fields: torch.Tensor, genres: torch.Tensor) -> torch.Tensor:
        return self.student(fields, genres)

    def loss(self, fields: torch.Tensor, genres: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, t = self.weights, self.temperature
        with torch.no_grad():
            t_logits, t_vectors = self.teacher.forward_features(fields, genres)
        s_logits, s_vectors = self.student.forward_features(fields, genres)
        total = s_logits.new_zeros(())
        if w.ground_truth:
            total = total + w.ground_truth * F.binary_cross_entropy_with_logits(s_logits, y)
        if w.target:
            total = total + w.target * t * t * F.binary_cross_entropy_with_logits(s_logits / t, torch.sigmoid(t_logits / t))
        if w.feature:
            total = total + w.feature * F.mse_loss(self.adapter(s_vectors), t_vectors)
        if w.label:
            total = total + w.label * F.binary_cross_entropy_with_logits(s_logits, (t_logits > 0).float())
        return total, s_logits


def ctr_loss(weights: LossWeights | None) -> CtrLossFn:
    """The loss of a training stage: the distiller's when ``weights`` is set, else BCE on the labels."""
    if weights is None:
        return label_loss
    return lambda model, fields, genres, y: model.loss(fields, genres, y)


def fit_ctr(model: nn.Module, train: CtrSplit, val: CtrSplit, spec: Training, loss_fn: CtrLossFn,
            on_epoch: Callable[[int, dict[str, float]], None] | None = None,
            before_epoch: Callable[[int], None] | None = None) -> list[dict[str, float]]:
    """Train ``model`` in place; return the history. The best epoch by validation AUC is restored at the end."""
    steps = math.ceil(len(train) / spec.batch_size)
    opt = make_optimizer(model, spec.optimizer)
    sched = make_scheduler(opt, spec.schedule, spec.epochs * steps)
    gen = torch.Generator().manual_seed(spec.seed)
    history: list[dict[str, float]] = []
    best: tuple[float, dict] = (-1.0, copy.deepcopy(model.state_dict()))
    for epoch in range(spec.epochs):
        if before_epoch:
            before_epoch(epoch)
        model.train()
        order, loss_sum = torch.randperm(len(train), generator=gen), 0.0
        for start in range(0, len(order), spec.batch_size):
            fields, genres, y = train.batch(order[start:start + spec.batch_size])
            opt.zero_grad(set_to_none=True)
            loss, _ = loss_fn(model, fields, genres, y)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
        metrics = {"train_loss": loss_sum / len(train),
                   **{f"val_{k}": v for k, v in evaluate_ctr(model, val, spec.eval_batch_size).items()},
                   "lr": sched.get_last_lr()[0]}
        history.append(metrics)
        print(f"epoch {epoch + 1}/{spec.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if metrics["val_auc"] > best[0]:
            best = (metrics["val_auc"], copy.deepcopy(model.state_dict()))
        if on_epoch:
            on_epoch(epoch, metrics)
    model.load_state_dict(best[1])
    return history
