"""Figures logged to MLflow beside the numbers, where people would rather look than read: learning curves (train vs
validation), the INT8 student's confusion matrix and per-class accuracy (vision), ROC, precision-recall and
calibration (recommender), the weights each layer kept (pruning). Each function returns a matplotlib figure (Agg
backend, no display needed); ``RunLogger.log_figure`` logs and closes it."""
from __future__ import annotations

from typing import Any

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(history: list[dict[str, float]], title: str) -> Any | None:
    """One panel per metric recorded for both the training and the validation rows (``train_<m>`` and ``val_<m>``),
    the two curves over the epochs; None when the history has no such pair. ``loss`` is never paired: the training
    loss is the stage's objective (distillation terms included), the validation loss plain cross-entropy."""
    if not history:
        return None
    keys = history[0].keys()
    pairs = [k.removeprefix("val_") for k in keys
             if k.startswith("val_") and k != "val_loss" and f"train_{k.removeprefix('val_')}" in keys]
    if not pairs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.6 * len(pairs), 3.6), squeeze=False)
    epochs = np.arange(1, len(history) + 1)
    for ax, metric in zip(axes[0], pairs):
        for split, style in (("train", "-o"), ("val", "-s")):
            ax.plot(epochs, [row[f"{split}_{metric}"] for row in history], style, ms=3,
                    label="validation" if split == "val" else "train")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...], title: str) -> Any:
    """The confusion matrix (rows: true class, normalised per row) beside each class's accuracy."""
    n = len(classes)
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (y_true.astype(np.int64), y_pred.astype(np.int64)), 1)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.25, 1]})
    image = left.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                left.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if rates[i, j] > 0.5 else "black")
    left.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    left.set_yticks(range(n), classes, fontsize=8)
    left.set_xlabel("predicted")
    left.set_ylabel("true")
    fig.colorbar(image, ax=left, fraction=0.046)
    right.barh(range(n), np.diag(rates), color="tab:blue")
    right.set_yticks(range(n), classes, fontsize=8)
    right.invert_yaxis()
    right.set_xlim(0, 1)
    right.set_xlabel("accuracy of the class")
    right.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{title}: accuracy {float((y_true == y_pred).mean()):.4f} on {len(y_true):,} images")
    fig.tight_layout()
    return fig


def ctr_curves(y: np.ndarray, p: np.ndarray, title: str) -> Any:
    """ROC, precision-recall and calibration (reliability over ten probability bins) of click probabilities."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    plt = _plt()
    fig, (roc, pr, cal) = plt.subplots(1, 3, figsize=(14, 4.2))
    fpr, tpr, _ = roc_curve(y, p)
    roc.plot(fpr, tpr, label=f"AUC {roc_auc_score(y, p):.4f}")
    roc.plot([0, 1], [0, 1], "--", c="gray", lw=0.8)
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    precision, recall, _ = precision_recall_curve(y, p)
    pr.plot(recall, precision, label=f"AP {average_precision_score(y, p):.4f}")
    pr.axhline(float(np.mean(y)), ls="--", c="gray", lw=0.8, label=f"base rate {np.mean(y):.3f}")
    pr.set(xlabel="recall", ylabel="precision", title="precision-recall")
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="quantile")
    cal.plot(predicted, observed, "-o", ms=3, label="model")
    cal.plot([0, 1], [0, 1], "--", c="gray", lw=0.8, label="perfectly calibrated")
    cal.set(xlabel="mean predicted probability", ylabel="observed click rate", title="calibration (deciles)")
    for ax in (roc, pr, cal):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if ax is not cal else "upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def weights_kept(kept: dict[str, float], title: str) -> Any:
    """The fraction of each layer's weights the pruned model keeps (fewer channels, or fewer non-zero weights)."""
    plt = _plt()
    names = list(kept)
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(names) + 1.4))
    ax.barh(range(len(names)), [kept[n] for n in names], color="tab:green")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of the layer's weights kept")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    return fig
