"""Stage ``qat_<family>``: distilled CTR student -> quantization-aware trained student (INT8 tables and MLP).

Inputs: ``<data>``, ``<teacher>``, ``<student>`` (the distill stage's). Outputs: ``<model>`` (the fake-quantized
student; the model file records ``qat_form`` so it is rebuilt the same way), ``<metrics>``, ``<plots>``.
Embedding tables are fake-quantized per row, the MLP by FX QAT; the ``distill.<family>`` loss stays active when
``distill`` is in ``recipe.<family>``. Observers are frozen from epoch ``freeze_observers_after``, and for good
before the model is scored or saved. Without ``qat`` in ``recipe.<family>`` the student passes through unchanged
(export then quantizes its tables after training).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tasks.artifacts import count_parameters, load_model
from tasks.ctr.config import DistillCtr, QatCtr
from tasks.ctr.ctr_training import ctr_trainer, evaluate_ctr, fit_ctr, load_ctr_data
from tasks.ctr.models import CtrModel, prepare_ctr_qat
from tasks.ctr.stage import ctr_compression_stage
from tasks.observers import freeze_observers


def qat_ctr(cfg: QatCtr, kd: DistillCtr, distill: bool, data_dir: Path, teacher_path: Path,
               student_path: Path, on_epoch: Callable[[int, dict[str, float]], None] | None = None
               ) -> tuple[CtrModel, dict[str, int], list[dict[str, float]], dict[str, float]]:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train, val, test, shape = load_ctr_data(data_dir)
    qat = prepare_ctr_qat(load_model(student_path), cfg.mlp_weight_bits, cfg.float_last_layer)

    def before_epoch(epoch: int) -> None:
        if epoch >= cfg.freeze_observers_after:
            freeze_observers(qat)

    history = fit_ctr(*ctr_trainer(qat, load_model(teacher_path), kd if distill else None), train, val, cfg,
                      on_epoch, before_epoch)
    freeze_observers(qat)  # the best epoch restored may predate the freeze: its flags would switch them back on
    metrics = {f"test_{k}": v for k, v in evaluate_ctr(qat, test, cfg.eval_batch_size).items()}
    return qat, shape, history, {**metrics, "parameters": count_parameters(qat)}


def main(family: str) -> None:
    ctr_compression_stage(
        family, "qat", __doc__,
        lambda cfg, args, on_epoch: qat_ctr(cfg.block("qat", family), cfg.block("distill", family),
                                            "distill" in cfg.block("recipe", family), args.data, args.teacher,
                                            args.student, on_epoch),
        lambda m: f"QAT student test AUC {m['test_auc']:.4f}")

