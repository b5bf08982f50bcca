"""Stage ``evaluate_<family>``: the exported ONNX models measured the way a deployment engineer would.

Inputs: ``<data>`` (validation and test splits), ``<onnx>`` (export_<family>'s folder), the PyTorch ``<teacher>``,
``<student_fp32>`` and final ``<student>`` (for parameter, non-zero and MAC counts). Output ``<metrics>``: per ONNX
model its validation accuracy (``val_accuracy``: what any choice between models may read) and test accuracy
(``test_accuracy``: reported and gated, never chosen on) in onnxruntime, the same on each evaluation window of the
test split (``golden_accuracy``, ``recent_accuracy`` and their ``_rows``, ``windows.json``), size on disk (bytes,
gzip bytes),
parameters, non-zero parameters, multiply-accumulates per image, batch-1 latency p50 / p95 / p99 and
batch-``throughput_batch`` throughput, with the thread count,
warm-up and repeats used; plus ratios against the teacher and INT8 against FP32, and the SHA-256 of every ONNX
file measured (``sha256``: the gate registers only the file that was evaluated).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.artifacts import count_nonzero, count_parameters, load_model
from tasks.config import stage_args
from tasks.image_training import Split
from tasks.images.config import EvaluateImages
from tasks.io import read_windows
from tasks.onnx_models import (
    INPUT,
    file_sizes,
    onnx_accuracy,
    onnx_logits,
    percentiles_ms,
    session,
    timed_runs,
)


def count_macs(model: nn.Module, image_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one image of ``image_shape`` (C, H, W) through every convolution and linear layer (QAT modules are
    subclasses of these, so fake-quantized graphs count alike); an imported ONNX teacher's come from its graph."""
    if hasattr(model, "counts"):
        return model.counts()["macs"]
    total = 0

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * per_output
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *image_shape))
    for h in handles:
        h.remove()
    return total


def latency(path: Path, images: Split, cfg: EvaluateImages) -> dict[str, float]:
    """Batch-1 latency percentiles (ms) and batch-N throughput (images/s) in onnxruntime, on ``images``' first."""
    sess = session(path, cfg.threads)
    one = {INPUT: images.inputs(slice(1)).contiguous().numpy()}
    batch = {INPUT: images.inputs(slice(cfg.throughput_batch)).contiguous().numpy()}
    times = timed_runs(sess, one, cfg.warmup, cfg.repeats)
    batch_times = timed_runs(sess, batch, cfg.warmup, cfg.throughput_repeats)
    return {**percentiles_ms(times, "latency_b1"),
            # a test split smaller than the batch (a small image folder) gives a smaller batch: count what ran
            f"throughput_b{cfg.throughput_batch}_ips": float(len(batch[INPUT]) / np.median(batch_times))}


def accuracy_on_test(path: Path, test: Split, data_dir: Path, threads: int) -> tuple[dict[str, float], np.ndarray]:
    """``test_accuracy`` of one ONNX file, ``<window>_accuracy`` and ``<window>_rows`` on each evaluation window of
    the test split (an empty window: its rows only); and its class for each test image."""
    predicted = onnx_logits(path, test, threads=threads).argmax(1)
    correct = predicted == test.y.numpy()
    scores = {"test_accuracy": float(correct.mean())}
    for name, rows in read_windows(data_dir).items():
        scores[f"{name}_rows"] = len(rows)
        if len(rows):
            scores[f"{name}_accuracy"] = float(correct[rows].mean())
    return scores, predicted


def measure_onnx(path: Path, val: Split, test: Split, data_dir: Path, cfg: EvaluateImages
                 ) -> tuple[dict[str, float], np.ndarray]:
    """What onnxruntime says of one ONNX file: validation and test accuracy (on each window too), stored size,
    latency, throughput; and its class for each test image (the confusion matrix reads them: the file is not run
    twice)."""
    scores, predicted = accuracy_on_test(path, test, data_dir, cfg.threads)
    return {"val_accuracy": onnx_accuracy(path, val, cfg.threads), **scores,
            **file_sizes(path), **latency(path, test, cfg)}, predicted


def evaluate_images(cfg: EvaluateImages, data_dir: Path, onnx_dir: Path, teacher: Path, student_fp32: Path,
                    student: Path) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Measure every ONNX model of ``onnx_dir``; return {model name: metrics} and {model name: test predictions}."""
    torch.set_num_threads(cfg.threads)
    torch.backends.quantized.engine = "x86"
    val, test = Split.load(data_dir, "val"), Split.load(data_dir, "test")
    sources = {"teacher_fp32": teacher, "student_fp32": student_fp32, "student_int8": student,
               "student_ptq_int8": student_fp32}
    results: dict[str, dict[str, float]] = {}
    predictions: dict[str, np.ndarray] = {}
    for name, source in sources.items():
        path, model = onnx_dir / f"{name}.onnx", load_model(source)
        measured, predictions[name] = measure_onnx(path, val, test, data_dir, cfg)
        results[name] = {**measured, "parameters": count_parameters(model),
                         "nonzero_parameters": count_nonzero(model), "macs": count_macs(model, test.image_shape)}
    return results, predictions


def ratios(results: dict[str, dict[str, float]], throughput_key: str) -> dict[str, float]:
    """The comparisons the gates and the benchmark use, all measured in the same run."""
    teacher, fp32, int8 = results["teacher_fp32"], results["student_fp32"], results["student_int8"]
    return {"size_ratio_vs_teacher": teacher["bytes"] / int8["bytes"],
            "speedup_b1_p50_vs_teacher": teacher["latency_b1_p50_ms"] / int8["latency_b1_p50_ms"],
            "int8_vs_fp32_throughput_ratio": int8[throughput_key] / fp32[throughput_key],
            "test_accuracy_drop_vs_teacher": teacher["test_accuracy"] - int8["test_accuracy"],
            "test_int8_vs_ptq_accuracy": int8["test_accuracy"] - results["student_ptq_int8"]["test_accuracy"]}


def main(family: str) -> None:
    args, cfg = stage_args(__doc__, "--data", "--onnx", "--teacher", "--student-fp32", "--student", "--metrics")
    ev = cfg.block("evaluate", family)
    from tasks.tracking import stage_run

    with stage_run(f"evaluate_{family}", cfg, {f"evaluate.{family}": ev}) as run:
        results, predicted = evaluate_images(ev, args.data, args.onnx, args.teacher, args.student_fp32, args.student)
        summary = ratios(results, f"throughput_b{ev.throughput_batch}_ips")
        run.publish_evaluation(args.metrics, results, summary, ev, args.onnx)
        from tasks.figures import confusion

        test = Split.load(args.data, "test")
        run.log_figure(confusion(test.y.numpy(), predicted["student_int8"], test.classes, "INT8 student, test split"),
                       "student_int8_confusion.png")
    for name, r in results.items():
        print(f"{name}: accuracy val {r['val_accuracy']:.4f}, test {r['test_accuracy']:.4f}, {r['bytes']:,} bytes, "
              f"p50 {r['latency_b1_p50_ms']:.3f} ms")
    print(", ".join(f"{k} {v:.3f}" for k, v in summary.items()))

