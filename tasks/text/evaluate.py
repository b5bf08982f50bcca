"""Stage ``evaluate_text``: the exported text models measured in onnxruntime as a serving engineer would.

Inputs: ``<data>``, ``<onnx>`` (export_text's folder) and the PyTorch models (for parameter counts). Output
``<metrics>``: per ONNX model the validation accuracy (``val_*``: what any choice between models may read), the test
accuracy (``test_*``: reported and gated, never chosen on), stored size, and the latency of one request holding one
test sentence as a client sends it (unpadded), the test sentences taken in turn (p50 / p95 / p99), with the
sentences/s that implies; plus ratios against the teacher, and the SHA-256 of every ONNX file measured (``sha256``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tasks.artifacts import count_parameters, load_model
from tasks.config import stage_args
from tasks.errors import run_cli
from tasks.onnx_models import file_sizes, percentiles_ms, session, timed_runs
from tasks.text.config import EvaluateText
from tasks.text.onnx_graph import feeds, onnx_text_logits, tokenizer_of
from tasks.text.training import TextSplit, accuracy

MODELS = ("teacher_fp32", "student_fp32", "student_int8")


def requests(path: Path, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """Each text as one request to the ONNX file: its tokens by the file's own tokenizer, no padding."""
    tokenizer = tokenizer_of(path)
    return [feeds(*tokenizer.encode([text])) for text in texts]


def sentence_latency(path: Path, texts: list[str], cfg: EvaluateText) -> dict[str, float]:
    """Latency of one request of one sentence (tokenized beforehand: the model's time only), ``texts`` in turn,
    after ``cfg.warmup`` runs."""
    times = timed_runs(session(path, cfg.threads), requests(path, texts[: cfg.repeats]), cfg.warmup, cfg.repeats)
    return {**percentiles_ms(times, "sentence"), "throughput_sentences_per_s": float(1 / np.mean(times))}


def score_onnx(path: Path, data_dir: Path, cfg: EvaluateText) -> dict[str, float]:
    """Test accuracy and sentence latency of one ONNX file (what the gate re-measures for a champion)."""
    test = TextSplit.load(data_dir, "test")
    return {"test_accuracy": accuracy(onnx_text_logits(path, test.texts, threads=cfg.threads), test.y.numpy()),
            **sentence_latency(path, test.texts, cfg)}


def evaluate_text(cfg: EvaluateText, data_dir: Path, onnx_dir: Path, models: dict[str, Path]) -> dict[str, dict]:
    torch.set_num_threads(cfg.threads)
    val = TextSplit.load(data_dir, "val")
    results = {}
    for name in MODELS:
        path = onnx_dir / f"{name}.onnx"
        results[name] = {"val_accuracy": accuracy(onnx_text_logits(path, val.texts, threads=cfg.threads),
                                                  val.y.numpy()),
                         **score_onnx(path, data_dir, cfg), **file_sizes(path),
                         "parameters": count_parameters(load_model(models[name]))}
    return results


def ratios(results: dict[str, dict]) -> dict[str, float]:
    teacher, fp32, int8 = results["teacher_fp32"], results["student_fp32"], results["student_int8"]
    return {"size_ratio_vs_teacher": teacher["bytes"] / int8["bytes"],
            "speedup_p50_vs_teacher": teacher["sentence_p50_ms"] / int8["sentence_p50_ms"],
            "int8_vs_fp32_speedup": fp32["sentence_p50_ms"] / int8["sentence_p50_ms"],
            "test_accuracy_drop_vs_teacher": teacher["test_accuracy"] - int8["test_accuracy"]}


def main() -> None:
    args, cfg = stage_args(__doc__, "--data", "--onnx", "--teacher", "--student", "--metrics")
    ev = cfg.evaluate.text
    from tasks.tracking import stage_run

    with stage_run("evaluate_text", cfg, {"evaluate.text": ev}) as run:
        models = {"teacher_fp32": args.teacher, "student_fp32": args.student, "student_int8": args.student}
        results = evaluate_text(ev, args.data, args.onnx, models)
        summary = ratios(results)
        run.publish_evaluation(args.metrics, results, summary, ev, args.onnx)
    for name, r in results.items():
        print(f"{name}: accuracy val {r['val_accuracy']:.4f}, test {r['test_accuracy']:.4f}, {r['bytes']:,} bytes, "
              f"p50 {r['sentence_p50_ms']:.3f} ms, p95 {r['sentence_p95_ms']:.3f} ms per sentence")
    print(", ".join(f"{k} {v:.3f}" for k, v in summary.items()))


if __name__ == "__main__":
    run_cli(main)
