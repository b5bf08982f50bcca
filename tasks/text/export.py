"""Stage ``export_text``: Transformer teacher and student -> ONNX (FP32 and dynamic INT8), with a parity check.

Inputs: ``<data>``, ``<teacher>``, ``<student>`` (distill_text's). Outputs in ``<out>``: ``teacher_fp32.onnx``,
``student_fp32.onnx`` and ``student_int8.onnx`` (``tasks.text.onnx_graph``: INT8 weights, activations quantized at run
time; each file carries the tokenizer). ``<metrics>``: per file, against the PyTorch model it came from on the
test split, the share of sentences whose predicted class agrees and the accuracy delta. A failure stops the
pipeline naming the sentences.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tasks.artifacts import load_model
from tasks.config import stage_args
from tasks.errors import ParityError, run_cli
from tasks.io import write_json
from tasks.onnx_models import accuracy_delta, check_finite
from tasks.text.config import ExportText
from tasks.text.onnx_graph import attach_tokenizer, export_text_fp32, onnx_text_logits, quantize_text_int8
from tasks.text.training import TextSplit, manifest, predict

MODELS = ("teacher_fp32", "student_fp32", "student_int8")


def text_parity(name: str, reference: np.ndarray, onnx: np.ndarray, labels: np.ndarray, cfg: ExportText,
                texts: list[str]) -> dict:
    """Top-1 agreement and accuracy delta of ``onnx`` logits against ``reference``; raise ParityError on failure."""
    check_finite(name, reference, onnx, "test sentences")
    agree = reference.argmax(1) == onnx.argmax(1)
    delta = accuracy_delta(reference, onnx, labels)
    result = {"top1_agreement": float(agree.mean()), "accuracy_delta": delta,
              "max_logit_diff": float(np.abs(reference - onnx).max())}
    if agree.mean() < cfg.parity.min_top1_agreement or delta > cfg.parity.max_accuracy_delta:
        shown = ", ".join(f"#{i} {texts[i][:40]!r}" for i in np.flatnonzero(~agree)[:5])
        raise ParityError(f"{name}: predicted class agrees with PyTorch on {agree.mean():.4%} of test sentences (min "
                          f"{cfg.parity.min_top1_agreement:.2%}), accuracy delta {delta:.4f} (max "
                          f"{cfg.parity.max_accuracy_delta}); disagreeing sentences: {shown}")
    return result


def export_text(cfg: ExportText, data_dir: Path, teacher_path: Path, student_path: Path, out: Path) -> dict[str, dict]:
    """Write the three ONNX files into ``out``; return parity metrics per file."""
    torch.set_num_threads(cfg.threads)
    test = TextSplit.load(data_dir, "test")
    paths = {name: out / f"{name}.onnx" for name in MODELS}
    teacher, student = load_model(teacher_path), load_model(student_path)
    export_text_fp32(teacher, paths["teacher_fp32"], cfg.opset, test.texts)
    export_text_fp32(student, paths["student_fp32"], cfg.opset, test.texts)
    quantize_text_int8(paths["student_fp32"], paths["student_int8"])
    # the INT8 file is the FP32 student quantized after training: it answers to that model
    references = {"teacher_fp32": teacher, "student_fp32": student, "student_int8": student}
    labels = manifest(data_dir)["labels"]
    for name, model in references.items():
        attach_tokenizer(paths[name], model.tokenizer, labels)
    return {name: text_parity(name, predict(model, test.texts),
                              onnx_text_logits(paths[name], test.texts, threads=cfg.threads), test.y.numpy(), cfg,
                              test.texts)
            for name, model in references.items()}


def main() -> None:
    args, cfg = stage_args(__doc__, "--data", "--teacher", "--student", "--out", "--metrics")
    export = cfg.export.text
    from tasks.tracking import stage_run

    with stage_run("export_text", cfg, {"export.text": export}) as run:
        checks = export_text(export, args.data, args.teacher, args.student, args.out)
        metrics = {f"{name}.{k}": v for name, result in checks.items() for k, v in result.items()}
        write_json(args.metrics, metrics)
        run.log_metrics(metrics)
        run.log_artifact(args.metrics)
    for name, result in checks.items():
        print(f"{name}: class agrees on {result['top1_agreement']:.4%} of test sentences, accuracy delta "
              f"{result['accuracy_delta']:.4f}")


if __name__ == "__main__":
    run_cli(main)
