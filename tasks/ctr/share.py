"""Stage ``share_<family>``: CTR student -> student whose field-embedding rows are shared k-means centroids.

Inputs: ``<data>``, ``<teacher>``, ``<student>`` (the QAT stage's: QAT or FP32). Outputs: ``<model>`` (the same
kind as its input, with ``arch.shared_rows`` set and a ``row_map`` buffer), ``<metrics>``, ``<plots>``. The
centroids (and everything else) are fine-tuned with the ``distill.<family>`` loss when ``distill`` is in
``recipe.<family>``; a QAT student keeps its frozen quantization ranges. Left out of the recipe, the student passes
through unchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tasks.artifacts import count_parameters, load_model
from tasks.ctr.compression import id_rows, share_rows
from tasks.ctr.config import DistillCtr, ShareCtr
from tasks.ctr.ctr_training import ctr_trainer, evaluate_ctr, fit_ctr, load_ctr_data
from tasks.ctr.models import CtrModel
from tasks.ctr.stage import ctr_compression_stage
from tasks.errors import ConfigError
from tasks.observers import freeze_observers


def share_ctr(cfg: ShareCtr, kd: DistillCtr, distill: bool, data_dir: Path, teacher_path: Path,
                 student_path: Path, on_epoch: Callable[[int, dict[str, float]], None] | None = None,
                 where: str = "share") -> tuple[CtrModel, dict[str, int], list[dict[str, float]], dict[str, float]]:
    """``where``: the params block ``cfg`` is (``share.<family>``), named when its ``clusters`` cannot work."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    student = load_model(student_path)
    # before any data is read or trained on: k-means needs fewer centroids than rows
    if cfg.clusters >= (rows := id_rows(student)):
        raise ConfigError(f"{where}.clusters ({cfg.clusters}) must be fewer than the {rows} embedding rows of "
                          f"{student_path} (its data's ids): lower it")
    train, val, test, shape = load_ctr_data(data_dir)
    student = share_rows(student, cfg.clusters, cfg.seed)
    freeze_observers(student)  # a QAT student's ranges stay where QAT left them
    shared_auc = evaluate_ctr(student, test, cfg.eval_batch_size)["auc"]
    history = fit_ctr(*ctr_trainer(student, load_model(teacher_path), kd if distill else None), train, val, cfg,
                      on_epoch)
    metrics = {f"test_{k}": v for k, v in evaluate_ctr(student, test, cfg.eval_batch_size).items()}
    metrics.update(test_auc_before_fine_tuning=shared_auc, shared_rows=cfg.clusters, ids=shape["vocabulary"],
                   parameters=count_parameters(student))
    return student, shape, history, metrics


def main(family: str) -> None:
    ctr_compression_stage(
        family, "share", __doc__,
        lambda cfg, args, on_epoch: share_ctr(cfg.block("share", family), cfg.block("distill", family),
                                              "distill" in cfg.block("recipe", family), args.data, args.teacher,
                                              args.student, on_epoch, f"share.{family}"),
        lambda m: f"shared student: {m['ids']} ids on {m['shared_rows']} rows, test AUC {m['test_auc']:.4f} "
                  f"({m['test_auc_before_fine_tuning']:.4f} before fine-tuning)")

