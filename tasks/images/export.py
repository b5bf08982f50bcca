"""Stage ``export_<family>``: teacher, FP32 student and final compressed student -> ONNX, with a parity check.

Inputs: ``<data>`` splits, ``<teacher>``, ``<student_fp32>`` (distill_<family>'s student), ``<student>`` (the last
compression stage's output). Outputs in ``<out>``: ``teacher_fp32.onnx``, ``student_fp32.onnx``,
``student_int8.onnx`` (the final student: a QAT student is converted to INT8 and exported as QDQ; a recipe
without ``qat`` gets onnxruntime PTQ of its FP32 student instead) and ``student_ptq_int8.onnx`` (the baseline a
user would otherwise pick: onnxruntime static PTQ of the FP32 student, calibrated on validation images).
``<metrics>``: parity of every ONNX file on the test split against an independent reference: a float model against
the PyTorch model it came from; a QAT student against the fake-quantized model that was trained and scored (not
against its own conversion, which would share a conversion's mistakes); a PTQ file, which has no PyTorch
counterpart, against its own QDQ graph run as written (simulated quantization, no fused INT8 kernels).
A parity failure (top-1 agreement or accuracy delta beyond ``export.<family>.parity``) stops the pipeline and
names the disagreeing test images, so nothing is evaluated or promoted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.artifacts import load_model
from tasks.config import stage_args
from tasks.errors import ParityError
from tasks.image_training import Split
from tasks.images.config import ExportImages, QatImages
from tasks.io import write_json
from tasks.observers import frozen_observers
from tasks.onnx_models import accuracy_delta, check_finite, export_fp32, export_student_int8, onnx_logits, quantize_ptq
from tasks.quantization import QatModel

FILES = ("teacher_fp32", "student_fp32", "student_int8", "student_ptq_int8")


@torch.no_grad()
def torch_logits(model: nn.Module, split: Split, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    with frozen_observers(model):
        return np.concatenate([model(split.inputs(slice(i, i + batch_size))).float().numpy()
                               for i in range(0, len(split.y), batch_size)])


def parity(name: str, reference: np.ndarray, onnx: np.ndarray, labels: np.ndarray, cfg: ExportImages) -> dict:
    """Top-1 agreement and accuracy delta of ``onnx`` logits against ``reference``; raise ParityError on failure."""
    check_finite(name, reference, onnx, "test images")
    ref_top, onnx_top = reference.argmax(1), onnx.argmax(1)
    agreement = float((ref_top == onnx_top).mean())
    delta = accuracy_delta(reference, onnx, labels)
    result = {"top1_agreement": agreement, "accuracy_delta": delta,
              "max_abs_logit_diff": float(np.abs(reference - onnx).max())}
    if agreement < cfg.parity.min_top1_agreement or delta > cfg.parity.max_accuracy_delta:
        bad = np.flatnonzero(ref_top != onnx_top)
        shown = ", ".join(f"#{i} (torch {ref_top[i]}, onnx {onnx_top[i]})" for i in bad[:10])
        raise ParityError(f"{name}: top-1 agreement {agreement:.4f} (min {cfg.parity.min_top1_agreement}), accuracy "
                          f"delta {delta:.4f} (max {cfg.parity.max_accuracy_delta}); {len(bad)} test images "
                          f"disagree, e.g. {shown}")
    return result


def export_images(cfg: ExportImages, qat: QatImages, data_dir: Path, teacher_path: Path, fp32_path: Path,
                  student_path: Path, out: Path) -> dict[str, dict]:
    """Write the four ONNX files into ``out``; return the parity metrics of each against its reference (module
    docstring). onnxruntime PTQ leaves ``qat.float_modules`` in float and takes ``qat.weight_bits``, as QAT does."""
    torch.set_num_threads(cfg.threads)
    torch.backends.quantized.engine = "x86"
    val, test = Split.load(data_dir, "val"), Split.load(data_dir, "test")
    calibration = val.sample(cfg.calibration_size)
    paths = {name: out / f"{name}.onnx" for name in FILES}
    teacher, fp32, final = load_model(teacher_path), load_model(fp32_path), load_model(student_path)
    export_fp32(teacher, paths["teacher_fp32"], cfg.opset)
    export_fp32(fp32, paths["student_fp32"], cfg.opset)
    quantize_ptq(paths["student_fp32"], calibration, paths["student_ptq_int8"], qat)
    export_student_int8(final, paths["student_int8"], calibration, cfg.opset, qat)

    def simulated(name: str) -> np.ndarray:  # a PTQ file's QDQ graph run as written: no fused INT8 kernels
        return onnx_logits(paths[name], test, threads=cfg.threads, optimized=False)

    trained = torch_logits(final, test) if isinstance(final, QatModel) else simulated("student_int8")
    references = {"teacher_fp32": torch_logits(teacher, test), "student_fp32": torch_logits(fp32, test),
                  "student_int8": trained, "student_ptq_int8": simulated("student_ptq_int8")}
    labels = test.y.numpy()
    return {name: parity(name, reference, onnx_logits(paths[name], test, threads=cfg.threads), labels, cfg)
            for name, reference in references.items()}


def main(family: str) -> None:
    args, cfg = stage_args(__doc__, "--data", "--teacher", "--student-fp32", "--student", "--out", "--metrics")
    export = cfg.block("export", family)
    from tasks.tracking import stage_run

    qat = cfg.block("qat", family)  # its float modules and weight bits: how PTQ quantizes, as QAT did
    params = {f"export.{family}": export, f"recipe.{family}": cfg.block("recipe", family),
              f"qat.{family}.float_modules": qat.float_modules, f"qat.{family}.weight_bits": qat.weight_bits}
    with stage_run(f"export_{family}", cfg, params) as run:
        checks = export_images(export, qat, args.data, args.teacher, args.student_fp32, args.student, args.out)
        metrics = {f"{name}.{k}": v for name, result in checks.items() for k, v in result.items()}
        write_json(args.metrics, metrics)
        run.log_metrics(metrics)
        run.log_artifact(args.metrics)
    for name, result in checks.items():
        print(f"{name}: top-1 agreement {result['top1_agreement']:.4f} with its reference, "
              f"accuracy delta {result['accuracy_delta']:.4f}")

