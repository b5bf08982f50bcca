"""Stage ``distill_text``: frozen text teacher + processed sentences -> BiLSTM (or 1-D CNN) student, FP32.

Inputs: ``<data>``, ``<teacher>``. With ``distill`` in ``recipe.text`` the student learns on the training split
plus a transfer set of augmented copies labelled by the teacher (Tang et al. 2019; ``distill.text.transfer``), with
the loss of ``tasks.text.training``; each model reads every sentence through its own tokenizer. Without it, the
student learns from the training labels alone (the baseline). Outputs: ``<model>`` (the student only; the feature
adapter is training scaffolding), ``<metrics>`` (validation and test accuracy, parameters, the teacher's on the same
splits, training rows), ``<plots>``.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.artifacts import load_model, publish_training
from tasks.config import stage_args
from tasks.errors import run_cli
from tasks.text.config import DistillText
from tasks.text.data import SPECIALS, transfer_texts
from tasks.text.models import RecurrentStudent
from tasks.text.train_teacher import split_metrics
from tasks.text.training import (
    Encoded,
    TextDistiller,
    TextSplit,
    TrainingRows,
    distilled_loss,
    fit_text,
    label_loss,
    predict,
    student_shape,
)
from tasks.training import on_device


def distillation_rows(cfg: DistillText, train: TextSplit, teacher: nn.Module, student: RecurrentStudent
                      ) -> TrainingRows:
    """The training rows plus the transfer set (label -1), each with the frozen teacher's logits and features."""
    extra = transfer_texts(train.texts, cfg.transfer, student.tokenizer.vocabulary, np.random.default_rng(cfg.seed))
    rows = TextSplit(train.texts + extra, torch.cat([train.y, torch.full((len(extra),), -1, dtype=torch.int64)]))
    with on_device(teacher, cfg):   # the teacher labels on the students' device
        logits, features = predict(teacher, rows.texts, cfg.eval_batch_size, features=True, bf16=cfg.teacher_bf16)
    return TrainingRows(rows, Encoded.of(student, rows.texts), torch.from_numpy(logits), torch.from_numpy(features))


@torch.no_grad()
def embeddings_from_teacher(student: RecurrentStudent, teacher: nn.Module) -> None:
    """Set the student's word embeddings to the teacher's input embedding of each of its words, projected on their
    first principal components and scaled to unit variance (the scale of the default initialisation); padding
    stays zero, the unknown word gets the mean (zero)."""
    words = student.tokenizer.vocabulary[len(SPECIALS):]
    vectors = teacher.word_vectors(words).float()
    centered = vectors - vectors.mean(0)
    width = student.arch.embedding
    components = torch.linalg.svd(centered, full_matrices=False).Vh[:width]
    projected = centered @ components.T
    projected = projected / projected.std()
    table = student.embed.weight
    table[:len(SPECIALS)] = 0.0
    table[len(SPECIALS):, : projected.shape[1]] = projected
    table[len(SPECIALS):, projected.shape[1]:] = 0.0   # a student wider than the teacher's table


def distill_text(cfg: DistillText, distill: bool, data_dir: Path, teacher_path: Path,
                 on_epoch: Callable[[int, dict[str, float]], None] | None = None
                 ) -> tuple[RecurrentStudent, dict, list[dict[str, float]], dict[str, float]]:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    shape = student_shape(data_dir)
    train, val = TextSplit.load(data_dir, "train"), TextSplit.load(data_dir, "val")
    teacher = load_model(teacher_path)
    student = RecurrentStudent(cfg.student, **shape)
    if distill:
        if cfg.embeddings_from_teacher:
            embeddings_from_teacher(student, teacher)
        rows = distillation_rows(cfg, train, teacher, student)
        model = TextDistiller(student, teacher.feature_width, cfg.weights, cfg.temperature)
        history = fit_text(model, distilled_loss, rows, val, cfg, on_epoch)
    else:
        rows = TrainingRows(train, Encoded.of(student, train.texts))
        history = fit_text(student, label_loss, rows, val, cfg, on_epoch)
    metrics = split_metrics(student, data_dir, cfg.eval_batch_size)
    teacher_metrics = split_metrics(teacher, data_dir, cfg.eval_batch_size)
    metrics |= {f"teacher_{k}": teacher_metrics[k] for k in ("val_accuracy", "test_accuracy")}
    metrics["training_rows"] = len(rows.split)
    return student, shape, history, metrics


def main() -> None:
    args, cfg = stage_args(__doc__, "--data", "--teacher", "--model", "--metrics", "--plots")
    kd, distill = cfg.distill.text, "distill" in cfg.recipe.text
    from tasks.tracking import stage_run

    with stage_run("distill_text", cfg, {"distill.text": kd, "recipe.text": cfg.recipe.text}) as run:
        student, shape, history, metrics = distill_text(kd, distill, args.data, args.teacher,
                                                        lambda epoch, m: run.log_metrics(m, step=epoch + 1))
        publish_training(run, student, "text_student", kd.student, history, metrics, args, shape=shape)
    print(f"student accuracy val {metrics['val_accuracy']:.4f}, test {metrics['test_accuracy']:.4f} "
          f"({metrics['parameters']:,} parameters); teacher test {metrics['teacher_test_accuracy']:.4f}")


if __name__ == "__main__":
    run_cli(main)
