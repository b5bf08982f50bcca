"""Stage ``export_<family>``: CTR teacher, FP32 student and final student -> ONNX, with a parity check.

Inputs: ``<data>``, ``<teacher>``, ``<student_fp32>`` (the distill stage's), ``<student>`` (the last compression
stage's). Outputs in
``<out>``: ``teacher_fp32.onnx``, ``student_fp32.onnx`` and ``student_int8.onnx`` (INT8 tables feeding
DequantizeLinear + Gather, QDQ MLP; a recipe without QAT gets its tables quantized after training and a float MLP).
``<metrics>``: per file, against the PyTorch model it came from on the test split, the share of rows whose
probabilities agree within ``max_probability_diff`` and the AUC delta. A failure stops the pipeline naming the rows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.artifacts import load_model
from tasks.config import stage_args
from tasks.ctr.config import ExportCtr
from tasks.ctr.ctr_onnx import MODELS, export_ctr_fp32, export_ctr_int8, onnx_probabilities
from tasks.ctr.ctr_training import CtrSplit, ctr_metrics, predict_logits
from tasks.ctr.models import convert_ctr_int8
from tasks.errors import ParityError
from tasks.io import write_json


def ctr_parity(name: str, reference: np.ndarray, onnx: np.ndarray, labels: np.ndarray, cfg: ExportCtr) -> dict:
    """Probability agreement and AUC delta of ``onnx`` against ``reference``; raise ParityError on failure."""
    if not np.isfinite(onnx).all():
        raise ParityError(f"{name}: {int((~np.isfinite(onnx)).sum())} of {len(onnx)} test rows' probabilities are "
                          "not finite")
    diff = np.abs(reference - onnx)
    within = float((diff <= cfg.parity.max_probability_diff).mean())
    delta = abs(ctr_metrics(labels, onnx)["auc"] - ctr_metrics(labels, reference)["auc"])
    result = {"rows_within": within, "auc_delta": delta, "max_probability_diff": float(diff.max())}
    if within < cfg.parity.min_rows_within or not delta <= cfg.parity.max_auc_delta:   # a NaN delta fails too
        worst = np.argsort(-diff)[:10]
        shown = ", ".join(f"#{i} (torch {reference[i]:.4f}, onnx {onnx[i]:.4f})" for i in worst)
        raise ParityError(f"{name}: {within:.4%} of test rows within {cfg.parity.max_probability_diff} (min "
                          f"{cfg.parity.min_rows_within:.2%}), AUC delta {delta:.4f} (max {cfg.parity.max_auc_delta}); "
                          f"worst rows: {shown}")
    return result


def export_ctr(cfg: ExportCtr, data_dir: Path, teacher_path: Path, fp32_path: Path, student_path: Path,
                  out: Path) -> dict[str, dict]:
    """Write the three ONNX files into ``out``; return parity metrics per file."""
    torch.set_num_threads(cfg.threads)
    torch.backends.quantized.engine = "x86"
    test = CtrSplit.load(data_dir, "test")
    paths = {name: out / f"{name}.onnx" for name in MODELS}
    references: dict[str, nn.Module] = {"teacher_fp32": load_model(teacher_path), "student_fp32": load_model(fp32_path)}
    export_ctr_fp32(references["teacher_fp32"], paths["teacher_fp32"], cfg.opset)
    export_ctr_fp32(references["student_fp32"], paths["student_fp32"], cfg.opset)
    final = load_model(student_path)
    int8 = convert_ctr_int8(final)
    export_ctr_int8(int8, paths["student_int8"], cfg.opset)
    # A QAT student is checked against the fake-quantized model that was trained and scored; an FP32 one against
    # itself with its tables quantized after training.
    references["student_int8"] = final if final.fake_quant_tables else int8
    labels = test.y.numpy()
    return {name: ctr_parity(name, 1 / (1 + np.exp(-predict_logits(model, test))),
                             onnx_probabilities(paths[name], test, threads=cfg.threads), labels, cfg)
            for name, model in references.items()}


def main(family: str) -> None:
    args, cfg = stage_args(__doc__, "--data", "--teacher", "--student-fp32", "--student", "--out", "--metrics")
    export = cfg.block("export", family)
    from tasks.tracking import stage_run

    with stage_run(f"export_{family}", cfg, {f"export.{family}": export,
                                             f"recipe.{family}": cfg.block("recipe", family)}) as run:
        checks = export_ctr(export, args.data, args.teacher, args.student_fp32, args.student, args.out)
        metrics = {f"{name}.{k}": v for name, result in checks.items() for k, v in result.items()}
        write_json(args.metrics, metrics)
        run.log_metrics(metrics)
        run.log_artifact(args.metrics)
    for name, result in checks.items():
        print(f"{name}: {result['rows_within']:.4%} of rows within tolerance, AUC delta {result['auc_delta']:.5f}")

