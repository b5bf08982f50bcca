"""What every click-through family's evaluation reports of its ONNX files: AUC and logloss on a split, and the INT8
student's ratios against the teacher and the FP32 student."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.ctr.ctr_onnx import onnx_probabilities
from tasks.ctr.ctr_training import CtrSplit, ctr_metrics


def split_quality(path: Path, data_dir: Path, split: str, threads: int) -> dict[str, float]:
    """``<split>_auc`` and ``<split>_logloss`` of one ONNX file."""
    rows = CtrSplit.load(data_dir, split)
    quality = ctr_metrics(rows.y.numpy(), onnx_probabilities(path, rows, threads=threads))
    return {f"{split}_{k}": v for k, v in quality.items()}


def log_int8_curves(run: Any, onnx_dir: Path, data_dir: Path, threads: int) -> None:
    """The INT8 student's ROC, precision-recall and calibration on the test split, as a figure of ``run``."""
    from tasks.figures import ctr_curves

    test = CtrSplit.load(data_dir, "test")
    candidate = onnx_probabilities(onnx_dir / "student_int8.onnx", test, threads=threads)
    run.log_figure(ctr_curves(test.y.numpy(), candidate, "INT8 student, test split"),
                   "student_int8_roc_pr_calibration.png")


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """The INT8 student against the teacher (size, p50 latency, test AUC) and the FP32 student (p50 latency)."""
    teacher, fp32, int8 = results["teacher_fp32"], results["student_fp32"], results["student_int8"]
    return {"size_ratio_vs_teacher": teacher["bytes"] / int8["bytes"],
            "speedup_p50_vs_teacher": teacher["latency_p50_ms"] / int8["latency_p50_ms"],
            "int8_vs_fp32_speedup": fp32["latency_p50_ms"] / int8["latency_p50_ms"],
            "test_auc_drop_vs_teacher": teacher["test_auc"] - int8["test_auc"]}
