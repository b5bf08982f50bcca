"""Stage ``prune_recsys``: distilled CTR student -> student with fewer embedding dimensions, KD fine-tuned.

Inputs: ``<data>``, ``<teacher>``, ``<student>`` (distill_recsys's). Outputs: ``<model>``, ``<metrics>`` (test AUC,
dimensions before and after, parameters), ``<plots>``. Dimensions go on the cubic schedule of ``prune.recsys``
(``tasks/recsys/compression.py`` rebuilds the model narrower each step), fine-tuned with the ``distill.recsys`` loss
when ``distill`` is in ``recipe.recsys``. Left out of the recipe, the student passes through unchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tasks.artifacts import count_parameters, load_model
from tasks.errors import run_cli
from tasks.recsys.compression import prune_dimensions
from tasks.recsys.config import DistillRecsys, PruneRecsys
from tasks.recsys.ctr_training import ctr_trainer, evaluate_ctr, fit_ctr, load_ctr_data
from tasks.recsys.models import CtrModel
from tasks.recsys.stage import ctr_compression_stage


def kept_dimensions(cfg: PruneRecsys, dim: int, step: int) -> int:
    """Dimensions left after ``step`` of ``cfg.steps`` on the cubic schedule (``GradualPruning``)."""
    return max(1, dim - round(cfg.sparsity_after(step) * dim))


def prune_recsys(cfg: PruneRecsys, kd: DistillRecsys, distill: bool, data_dir: Path, teacher_path: Path,
                 student_path: Path, on_epoch: Callable[[int, dict[str, float]], None] | None = None
                 ) -> tuple[CtrModel, dict[str, int], list[dict[str, float]], dict[str, float]]:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train, val, test, shape = load_ctr_data(data_dir)
    teacher, student = load_model(teacher_path), load_model(student_path)
    before, history = student.arch.dim, []

    def tune(model: CtrModel, epochs: int) -> None:
        offset = len(history)
        history.extend(fit_ctr(*ctr_trainer(model, teacher, kd if distill else None), train, val,
                               cfg.model_copy(update={"epochs": epochs}),
                               on_epoch and (lambda epoch, m: on_epoch(offset + epoch, m))))

    for step in range(1, cfg.steps + 1):
        student = prune_dimensions(student, kept_dimensions(cfg, before, step))
        tune(student, cfg.epochs_per_step)
    if cfg.epochs > cfg.steps * cfg.epochs_per_step:
        tune(student, cfg.epochs - cfg.steps * cfg.epochs_per_step)
    metrics = {f"test_{k}": v for k, v in evaluate_ctr(student, test, cfg.eval_batch_size).items()}
    metrics.update(dimensions_before=before, dimensions_after=student.arch.dim, parameters=count_parameters(student))
    return student, shape, history, metrics


def main() -> None:
    ctr_compression_stage(
        "prune_recsys", "prune", __doc__,
        lambda cfg, args, on_epoch: prune_recsys(cfg.prune.recsys, cfg.distill.recsys, "distill" in cfg.recipe.recsys,
                                                 args.data, args.teacher, args.student, on_epoch),
        lambda m: f"pruned student: {m['dimensions_before']} -> {m['dimensions_after']} embedding dimensions, "
                  f"test AUC {m['test_auc']:.4f}")


if __name__ == "__main__":
    run_cli(main)
