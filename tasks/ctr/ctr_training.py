"""Training and scoring of click-through models: data splits, the loss (labels or distillation), AUC / logloss.

The loop keeps the epoch with the best validation AUC (embedding models overfit within a few epochs), restoring
its weights at the end; optimisers and schedules are the shared ones of ``tasks.training``.

Distillation for a binary target: BCE against the teacher's temperature-softened probability σ(t/T), scaled by
T², mixed with BCE against the label; optional alignment of the student's field vectors to the teacher's through a
learned linear adapter. Only the teacher runs under ``no_grad``; the shared ``tasks.training.train_step`` zeroes
gradients every step.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.ctr.config import DistillCtr
from tasks.distillation import FrozenTeacher
from tasks.errors import ConfigError, PipelineError
from tasks.family_config import OnnxArch, Training
from tasks.io import read_prepared
from tasks.observers import frozen_observers
from tasks.training import device_of, fit_best, to_device

PREPARE = "its prepare stage (prepare_<family>)"   # what wrote a processed click-through folder


@dataclass(frozen=True)
class CtrSplit:
    fields: torch.Tensor   # int64 (N, F)
    genres: torch.Tensor   # float32 (N, G)
    y: torch.Tensor        # float32 (N,)

    @classmethod
    def load(cls, directory: Path, name: str) -> CtrSplit:
        """``<name>_fields.npy``, ``<name>_genres.npy`` and ``<name>_y.npy`` as the prepare stage wrote them; a file
        missing or unreadable, one line naming it."""
        arrays = [read_prepared(directory / f"{name}_{part}.npy", lambda path: np.load(path, allow_pickle=False),
                                PREPARE) for part in ("fields", "genres", "y")]
        return cls(*(torch.from_numpy(a.copy()) for a in arrays))

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.fields[idx], self.genres[idx], self.y[idx]


def load_ctr_data(data_dir: Path) -> tuple[CtrSplit, CtrSplit, CtrSplit, dict[str, int]]:
    """(train, val, test, model shape: vocabulary, fields, genres, and the multi-hot groups' sizes when the data has
    several) from a prepare stage's folder."""
    features = read_prepared(data_dir / "features.json", lambda path: json.loads(path.read_text()), PREPARE)
    shape = {"vocabulary": features["vocabulary"], "fields": len(features["fields"]), "genres": len(features["genres"])}
    if len(features.get("groups", [])) > 1:
        shape["groups"] = [group["size"] for group in features["groups"]]
    return (*(CtrSplit.load(data_dir, s) for s in ("train", "val", "test")), shape)


@torch.no_grad()
def predict_logits(model: nn.Module, split: CtrSplit, batch_size: int = 8192) -> np.ndarray:
    """Logits of every row of ``split`` (computed on the model's device); quantization ranges stay as they are."""
    model.eval()
    device = device_of(model)
    with frozen_observers(model):
        return np.concatenate([model(*to_device(split.batch(slice(i, i + batch_size))[:2], device)).float().cpu().numpy()
                               for i in range(0, len(split), batch_size)])


def ctr_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """AUC and logloss of binary ``labels`` (0 or 1) against ``probabilities`` (for the logloss clipped to [1e-7,
    1 - 1e-7]); the AUC is NaN when the labels hold one class only, as scikit-learn's is."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{len(y)} labels but {len(p)} probabilities")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 0 or 1, found {sorted(set(np.unique(y)) - {0.0, 1.0})[:5]}")
    if not np.isfinite(p).all():   # a diverged model (or broken inputs): no retry makes it finite
        raise PipelineError(f"{int((~np.isfinite(p)).sum())} of {len(p)} probabilities are not finite: a model that "
                            "diverged (lower the learning rate) or inputs it cannot read")
    clipped = np.clip(p, 1e-7, 1 - 1e-7)   # for the logloss: the AUC ranks the scores as they are (no ties made)
    return {"auc": roc_auc(y, p), "logloss": float(-np.mean(y * np.log(clipped) + (1 - y) * np.log1p(-clipped)))}


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The area under the ROC curve of binary ``labels`` (NaN for one class): the chance that a positive row scores
    above a negative one, ties counted half (the Mann-Whitney statistic, from the scores' average ranks;
    scikit-learn's ``roc_auc_score`` to rounding, without importing it: ~1.2 CPU-s in each training stage's
    process)."""
    positive = np.asarray(labels).ravel() == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(np.asarray(scores).ravel(), return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2   # 1-based rank of each distinct score, ties averaged
    rank_sum = float(average_rank[inverse][positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def evaluate_ctr(model: nn.Module, split: CtrSplit, batch_size: int = 8192) -> dict[str, float]:
    return ctr_metrics(split.y.numpy(), 1 / (1 + np.exp(-predict_logits(model, split, batch_size))))


#: ``loss_fn(model, (fields, genres), y) -> (loss, logits)``: the ``LossFn`` shape of ``tasks.training.train_step``
CtrLossFn = Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor], torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def label_loss(model: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor):
    logits = model(*inputs)
    return F.binary_cross_entropy_with_logits(logits, y), logits


class CtrDistiller(FrozenTeacher):
    """Student plus the field-vector adapter, against a frozen CTR teacher."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillCtr) -> None:
        super().__init__(student, teacher)
        self.temperature, self.weights = cfg.temperature, cfg.weights
        self.adapter = nn.Linear(student.arch.dim, _vector_width(teacher)) if cfg.weights.feature else None

    def loss(self, fields: torch.Tensor, genres: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, t = self.weights, self.temperature
        with torch.no_grad():
            t_logits, t_vectors = self.teacher.forward_features(fields, genres)
        if isinstance(t_vectors, list):   # an imported ONNX teacher's named features: the field vectors, if any
            t_vectors = t_vectors[0] if t_vectors else None
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


def _vector_width(teacher: nn.Module) -> int:
    """How wide the teacher's field vectors are: an imported ONNX teacher's as its graph says (asked only when
    feature distillation is on: a teacher imported without ``features`` has none)."""
    if not isinstance(teacher.arch, OnnxArch):
        return teacher.arch.dim
    if not teacher.arch.feature_shapes:   # params validation refuses this; a teacher file from other params may not
        raise ConfigError("distill.<family>.weights.feature > 0 aligns the teacher's field vectors, but the imported "
                          "teacher exposes none: name them in teacher.<family>.pretrained.features (and rerun its "
                          "stage) or set the weight to 0")
    return teacher.arch.feature_shapes[0][-1]


def distilled_loss(model: CtrDistiller, inputs: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor):
    return model.loss(*inputs, y)


def ctr_trainer(student: nn.Module, teacher: nn.Module, kd: DistillCtr | None) -> tuple[nn.Module, CtrLossFn]:
    """What a stage trains and with which loss: the student against ``teacher`` with ``kd``'s loss, or the student
    alone on the labels when ``kd`` is None."""
    if kd is None:
        return student, label_loss
    return CtrDistiller(student, teacher, kd), distilled_loss


def fit_ctr(model: nn.Module, loss_fn: CtrLossFn, train: CtrSplit, val: CtrSplit, spec: Training,
            on_epoch: Callable[[int, dict[str, float]], None] | None = None,
            before_epoch: Callable[[int], None] | None = None, from_start: bool = False) -> list[dict[str, float]]:
    """Train ``model`` in place; return the history. The best epoch by validation AUC is restored at the end (or,
    ``from_start``, the starting weights when no epoch beat them)."""
    def batch(idx: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        fields, genres, y = train.batch(idx)
        return (fields, genres), y

    # the training rows scored as the validation rows are (eval mode, after the epoch): one curve each
    def scores() -> dict[str, float]:
        return {**{f"train_{k}": v for k, v in evaluate_ctr(model, train, spec.eval_batch_size).items()},
                **{f"val_{k}": v for k, v in evaluate_ctr(model, val, spec.eval_batch_size).items()}}

    return fit_best(model, loss_fn, len(train), batch, spec, scores, "val_auc", on_epoch, before_epoch,
                    from_start=from_start)
