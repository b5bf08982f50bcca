"""The figures logged to MLflow: built from the numbers they show, for any history, split or layer set."""
from __future__ import annotations

import matplotlib
import numpy as np

from tasks.figures import confusion, ctr_curves, learning_curves, weights_kept

matplotlib.use("Agg")


def test_learning_curves_pair_each_metric_of_the_training_and_the_validation_rows():
    history = [{"train_loss": 1.0, "train_accuracy": 0.5, "val_accuracy": 0.4, "val_loss": 1.2, "lr": 0.1},
               {"train_loss": 0.8, "train_accuracy": 0.7, "val_accuracy": 0.6, "val_loss": 1.0, "lr": 0.0}]
    fig = learning_curves(history, "teacher")
    panels = [ax for ax in fig.axes if ax.lines]
    # lr has no validation twin; the training loss is the stage's objective, not the validation cross-entropy
    assert [ax.get_ylabel() for ax in panels] == ["accuracy"]
    accuracy = next(ax for ax in panels if ax.get_ylabel() == "accuracy")
    assert [list(line.get_ydata()) for line in accuracy.lines] == [[0.5, 0.7], [0.4, 0.6]]
    assert learning_curves([{"train_loss": 1.0, "val_auc": 0.8}], "x") is None and learning_curves([], "x") is None


def test_the_confusion_matrix_counts_every_image_once_per_true_class():
    y = np.array([0, 0, 1, 9, 9, 9])
    predicted = np.array([0, 1, 1, 9, 9, 0])
    fig = confusion(y, predicted, ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                   "Sneaker", "Bag", "Ankle boot"), "student")
    matrix = fig.axes[0].images[0].get_array()
    assert matrix[0, 0] == 0.5 and matrix[0, 1] == 0.5 and matrix[1, 1] == 1.0 and np.isclose(matrix[9, 9], 2 / 3)
    bars = [patch.get_width() for patch in fig.axes[1].patches]
    assert len(bars) == 10 and bars[0] == 0.5 and np.isclose(bars[9], 2 / 3)
    assert "accuracy 0.6667 on 6 images" in fig._suptitle.get_text()


def test_ctr_curves_show_roc_precision_recall_and_calibration():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=2000)
    y = (rng.uniform(size=2000) < p).astype(np.float32)   # calibrated by construction
    fig = ctr_curves(y, p, "student")
    roc, pr, cal = fig.axes
    assert roc.get_title() == "ROC" and "AUC 0.8" in roc.get_legend().get_texts()[0].get_text()
    assert pr.get_title() == "precision-recall"
    predicted, observed = cal.lines[0].get_data()
    assert len(predicted) == 10 and np.abs(np.asarray(predicted) - np.asarray(observed)).max() < 0.1


def test_weights_kept_draws_one_bar_per_layer():
    fig = weights_kept({"stem.0": 1.0, "blocks.0.conv.0": 0.5, "head": 0.25}, "structured")
    assert [p.get_width() for p in fig.axes[0].patches] == [1.0, 0.5, 0.25]
