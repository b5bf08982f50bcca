"""Stage ``qat_<family>``: student -> quantization-aware trained student, with the KD loss when the recipe distils.

Inputs: ``<data>`` splits, ``<teacher>``, ``<student>`` (from distill_<family>). Outputs: ``<model>`` (the
fake-quantized FX graph's state with its observers frozen; ``tasks.artifacts.load_model`` rebuilds it and
``tasks.onnx_models.export_int8`` exports it as INT8), ``<metrics>`` (fake-quant test accuracy, parameters),
``<plots>``.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tasks.artifacts import (
    count_nonzero,
    count_parameters,
    derived_extra,
    fingerprint,
    load_model,
    model_meta,
    pass_through,
    publish_training,
    qat_extra,
    training_inputs,
)
from tasks.config import stage_args
from tasks.distillation import Distiller, distillation_loss, loss_config
from tasks.image_training import Split, evaluate, fit, model_shape
from tasks.images.config import DistillImages, QatImages
from tasks.observers import freeze_observers
from tasks.pruning import enforce_masks, keep_pruned_zeros
from tasks.quantization import QatModel, freeze_schedule, prepare_qat


def qat_images(cfg: QatImages, kd: DistillImages, distill: bool, data_dir: Path, teacher_path: Path,
               student_path: Path, checkpoint: Path, on_epoch: Callable[[int, dict[str, float]], None] | None = None
               ) -> tuple[QatModel, list[dict[str, float]], dict[str, float]]:
    """Fine-tune the student with fake quantization (``kd``'s loss when ``distill``, else the labels alone); return
    (QAT model with its observers frozen, history, test metrics)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.backends.quantized.engine = "x86"
    train, val, test = (Split.load(data_dir, s) for s in ("train", "val", "test"))
    teacher, student = load_model(teacher_path), load_model(student_path)
    sample = train.inputs(slice(2))
    qat = prepare_qat(student, cfg.activation_bits, sample, cfg.float_modules, cfg.weight_bits)
    keep_pruned_zeros(qat, cfg.pruned_min_sparsity)  # a pruned student stays pruned through QAT
    loss = loss_config(kd, distill, cfg.label_smoothing)
    distiller = Distiller(qat, teacher, loss, sample)
    inputs = training_inputs(data_dir, teacher_path, student_path)
    history = fit(distiller, train, val, cfg, checkpoint, fingerprint([cfg, loss], inputs), on_epoch, distillation_loss,
                  before_epoch=freeze_schedule(qat, cfg.freeze_observers_after, cfg.freeze_bn_after))
    enforce_masks(qat)
    freeze_observers(qat)  # what ships is what was trained: no later pass may move its ranges
    # the INT8 file's accuracy is measured by evaluate_<family>, in onnxruntime, on what ships
    metrics = {"test_accuracy_fake_quant": evaluate(qat, test, cfg.eval_batch_size)["accuracy"],
               "parameters": count_parameters(qat),
               "nonzero_parameters": count_nonzero(qat)}
    return qat, history, metrics


def main(family: str) -> None:
    args, cfg = stage_args(__doc__, "--data", "--teacher", "--student", "--checkpoint", "--model", "--metrics", "--plots")
    qat, recipe = cfg.block("qat", family), cfg.block("recipe", family)
    kd = cfg.block("distill", family).resolved(qat.device)   # the teacher beside this stage's student
    from tasks.tracking import stage_run

    params = {f"qat.{family}": qat, f"distill.{family}": kd, f"recipe.{family}": recipe}
    with stage_run(f"qat_{family}", cfg, params) as run:
        if "qat" not in recipe:
            pass_through(run, args, f"qat_{family}")
            return
        model, history, metrics = qat_images(qat, kd, "distill" in recipe, args.data, args.teacher, args.student,
                                             args.checkpoint, lambda epoch, m: run.log_metrics(m, step=epoch + 1))
        # the architecture of the student that was trained, and the layer widths of a structurally pruned one
        student = model_meta(args.student)
        publish_training(run, model, "mobile_student", student["arch"], history, metrics, args, **qat_extra(qat),
                         **derived_extra(student), shape=model_shape(args.data))
    print(f"QAT student test accuracy (fake-quantized): {metrics['test_accuracy_fake_quant']:.4f}")

