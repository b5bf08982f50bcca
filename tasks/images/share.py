"""Stage ``share_<family>``: QAT student -> weight-shared student (k centroids per layer), KD fine-tuned.

Deep Compression's order (prune -> quantize -> share): it runs after QAT, with fake quantization active and its
ranges and batch-norm statistics fixed, so what is fine-tuned is what deploys. Inputs: ``<data>``, ``<teacher>``,
``<student>``. Outputs: ``<model>``, ``<metrics>`` (test accuracy; the bytes and gzip bytes of the INT8 ONNX file
the student ships as, before and after sharing: INT8 files store one value per weight, so sharing saves bytes only
once compressed, and the metrics say how many), ``<plots>``. Left out of ``recipe.<family>``, it passes the student
through.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.ao.nn.intrinsic.qat import freeze_bn_stats

from tasks.artifacts import (
    count_nonzero,
    count_parameters,
    fingerprint,
    load_model,
    model_meta,
    pass_through,
    publish_training,
    training_inputs,
)
from tasks.config import stage_args
from tasks.distillation import Distiller, distillation_loss, loss_config
from tasks.image_training import Split, evaluate, fit, model_shape
from tasks.images.config import DistillImages, ExportImages, QatImages, ShareImages
from tasks.observers import freeze_observers
from tasks.onnx_models import export_student_int8, file_sizes
from tasks.weight_sharing import bake, share_weights


def fix_quantization(model: nn.Module) -> None:
    """Keep QAT's learned ranges and folded batch-norm statistics while the centroids move."""
    freeze_observers(model)
    model.apply(freeze_bn_stats)


def shipped_sizes(before: nn.Module, after: nn.Module, calibration: Split, export: ExportImages,
                  qat: QatImages) -> dict[str, float]:
    """Bytes and gzip bytes of the INT8 ONNX file each model ships as (``export_student_int8``), and the savings."""
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [file_sizes(export_student_int8(model, Path(tmp) / f"{name}.onnx", calibration, export.opset,
                                                qat))
                 for name, model in (("before", before), ("after", after))]
    return {"onnx_int8_bytes_before": sizes[0]["bytes"], "onnx_int8_gzip_bytes_before": sizes[0]["gzip_bytes"],
            "onnx_int8_bytes": sizes[1]["bytes"], "onnx_int8_gzip_bytes": sizes[1]["gzip_bytes"],
            "shipped_bytes_saved": sizes[0]["bytes"] - sizes[1]["bytes"],
            "shipped_gzip_bytes_saved": sizes[0]["gzip_bytes"] - sizes[1]["gzip_bytes"]}


def share_images(cfg: ShareImages, kd: DistillImages, distill: bool, data_dir: Path, teacher_path: Path,
                 student_path: Path, checkpoint: Path, export: ExportImages, qat: QatImages,
                 on_epoch: Callable[[int, dict[str, float]], None] | None = None
                 ) -> tuple[nn.Module, list[dict[str, float]], dict[str, float]]:
    """Cluster every layer's weights and fine-tune the centroids; return (model, history, metrics). ``export`` and
    ``qat`` say how the student ships (``export.<family>``; ``qat.<family>``'s float modules and weight bits)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.backends.quantized.engine = "x86"
    train, val, test = (Split.load(data_dir, s) for s in ("train", "val", "test"))
    teacher, model = load_model(teacher_path), load_model(student_path)
    layers = share_weights(model, cfg.clusters)
    loss = loss_config(kd, distill, cfg.label_smoothing)
    distiller = Distiller(model, teacher, loss, train.inputs(slice(2)))
    inputs = training_inputs(data_dir, teacher_path, student_path)
    history = fit(distiller, train, val, cfg, checkpoint, fingerprint([cfg, loss], inputs), on_epoch,
                  distillation_loss, before_epoch=lambda _epoch: fix_quantization(model))
    bake(model)
    calibration = val.sample(export.calibration_size)
    metrics = {"test_accuracy": evaluate(model, test, cfg.eval_batch_size)["accuracy"], "shared_layers": layers,
               "clusters": cfg.clusters, "parameters": count_parameters(model),
               "nonzero_parameters": count_nonzero(model),
               **shipped_sizes(load_model(student_path), model, calibration, export, qat)}
    return model.eval(), history, metrics


def main(family: str) -> None:
    args, cfg = stage_args(__doc__, "--data", "--teacher", "--student", "--checkpoint", "--model", "--metrics", "--plots")
    share, recipe = cfg.block("share", family), cfg.block("recipe", family)
    kd = cfg.block("distill", family).resolved(share.device)   # the teacher beside this stage's student
    from tasks.tracking import stage_run

    export, qat = cfg.block("export", family), cfg.block("qat", family)
    params = {f"share.{family}": share, f"recipe.{family}": recipe, f"export.{family}.opset": export.opset,
              f"export.{family}.calibration_size": export.calibration_size,
              f"qat.{family}.float_modules": qat.float_modules, f"qat.{family}.weight_bits": qat.weight_bits,
              f"distill.{family}": kd}   # the distillation loss it trains with, as QAT logs it
    with stage_run(f"share_{family}", cfg, params) as run:
        if "share" not in recipe:
            pass_through(run, args, f"share_{family}")
            return
        model, history, metrics = share_images(share, kd, "distill" in recipe, args.data, args.teacher,
                                               args.student, args.checkpoint, export, qat,
                                               lambda epoch, m: run.log_metrics(m, step=epoch + 1))
        meta = model_meta(args.student)
        kind, arch = meta.pop("kind"), meta.pop("arch")
        # what rebuilding the input needed (a QAT student's bits and float modules) the output needs too
        publish_training(run, model, kind, arch, history, metrics, args, **{**meta, "shape": model_shape(args.data)})
    print(f"weight-shared student ({share.clusters} clusters/layer): test accuracy {metrics['test_accuracy']:.4f}; "
          f"INT8 ONNX {metrics['onnx_int8_bytes_before']:,} -> {metrics['onnx_int8_bytes']:,} B "
          f"(gzip {metrics['onnx_int8_gzip_bytes_before']:,} -> {metrics['onnx_int8_gzip_bytes']:,} B)")

