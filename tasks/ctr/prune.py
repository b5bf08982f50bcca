"""Stage ``prune_<family>``: distilled CTR student -> student with fewer embedding dimensions, KD fine-tuned.

Inputs: ``<data>``, ``<teacher>``, ``<student>`` (the distill stage's). Outputs: ``<model>``, ``<metrics>`` (test
AUC, dimensions before and after, parameters), ``<plots>``. Dimensions go on the cubic schedule of
``prune.<family>`` (``tasks/ctr/compression.py`` rebuilds the model narrower each step), fine-tuned with the
``distill.<family>`` loss when ``distill`` is in ``recipe.<family>``. Left out of the recipe, the student passes
through unchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tasks.artifacts import count_parameters, load_model
from tasks.ctr.compression import prune_dimensions
from tasks.ctr.config import DistillCtr, PruneCtr
from tasks.ctr.ctr_training import ctr_trainer, evaluate_ctr, fit_ctr, load_ctr_data
from tasks.ctr.models import CtrModel
from tasks.ctr.stage import ctr_compression_stage
from tasks.training import History


def kept_dimensions(cfg: PruneCtr, dim: int, step: int) -> int:
    """Dimensions left after ``step`` of ``cfg.steps`` on the cubic schedule (``GradualPruning``)."""
    return max(1, dim - round(cfg.sparsity_after(step) * dim))


def prune_ctr(cfg: PruneCtr, kd: DistillCtr, distill: bool, data_dir: Path, teacher_path: Path,
                 student_path: Path, on_epoch: Callable[[int, dict[str, float]], None] | None = None
                 ) -> tuple[CtrModel, dict[str, int], list[dict[str, float]], dict[str, float]]:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train, val, test, shape = load_ctr_data(data_dir)
    teacher, student = load_model(teacher_path), load_model(student_path)
    before, history, kept = student.arch.dim, [], None

    def tune(model: CtrModel, epochs: int) -> tuple[int, dict[str, float]]:
        offset = len(history)
        tuned = fit_ctr(*ctr_trainer(model, teacher, kd if distill else None), train, val,
                        cfg.model_copy(update={"epochs": epochs}),
                        on_epoch and (lambda epoch, m: on_epoch(offset + epoch, m)))
        history.extend(tuned)
        return offset + tuned.kept_epoch, tuned.kept   # the weights it kept: its best epoch's, counted over all calls

    for step in range(1, cfg.steps + 1):
        student = prune_dimensions(student, kept_dimensions(cfg, before, step))
        kept = tune(student, cfg.epochs_per_step)
    if cfg.epochs > cfg.steps * cfg.epochs_per_step:
        kept = tune(student, cfg.epochs - cfg.steps * cfg.epochs_per_step)
    if kept is not None:   # the student written: the last call's kept weights (logged as best_epoch, best_val_*)
        history = History(history, *kept)
    metrics = {f"test_{k}": v for k, v in evaluate_ctr(student, test, cfg.eval_batch_size).items()}
    metrics.update(dimensions_before=before, dimensions_after=student.arch.dim, parameters=count_parameters(student))
    return student, shape, history, metrics


def main(family: str) -> None:
    ctr_compression_stage(
        family, "prune", __doc__,
        lambda cfg, args, on_epoch: prune_ctr(cfg.block("prune", family), cfg.block("distill", family),
                                              "distill" in cfg.block("recipe", family), args.data, args.teacher,
                                              args.student, on_epoch),
        lambda m: f"pruned student: {m['dimensions_before']} -> {m['dimensions_after']} embedding dimensions, "
                  f"test AUC {m['test_auc']:.4f}")

