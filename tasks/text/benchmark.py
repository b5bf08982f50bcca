"""Benchmark of the text family in one run: the teacher, the student trained on the labels alone, the distilled
student, each student also as the INT8 file it ships as (onnxruntime dynamic INT8; the distilled one also as static
QDQ INT8, the alternative), over several student seeds, all measured as ONNX in
onnxruntime on the same splits (accuracy mean ± std over seeds; bytes and one-sentence latency of the first seed).

Reads what ``dvc repro train_teacher_text`` (or ``make run``) leaves in ``--root``: the processed data and the
teacher distill_text reads (``data/text/processed``, ``models/text/teacher.pt``). The students train with
``distill.text``'s recipe and the seed changed (student initialisation, transfer set, batch order); nothing here is
chosen: the test split is only reported.

    python -m tasks.text.benchmark [--seeds 0 1 2] [--kind bilstm|cnn] [--out reports/benchmarks/text.json]
"""
from __future__ import annotations

import argparse
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

from flows.benchmark import machine, target_rows, write_result
from flows.stage_graph import stage_paths
from tasks.artifacts import count_parameters, load_model
from tasks.config import load_config
from tasks.errors import run_cli
from tasks.io import require
from tasks.onnx_models import file_sizes
from tasks.text.distill import distill_text
from tasks.text.evaluate import sentence_latency
from tasks.text.onnx_graph import (
    attach_tokenizer,
    export_text_fp32,
    onnx_text_logits,
    quantize_text_int8,
    quantize_text_static,
)
from tasks.text.training import TextSplit, accuracy, manifest

TARGETS = (("kd_int8_drop_vs_teacher", "<=", 0.01, "KD INT8 student: test accuracy drop vs teacher"),
           ("kd_int8_gain_over_labels_only", ">=", 0.02, "KD INT8 minus labels-only INT8 student, test accuracy"),
           ("size_ratio_vs_teacher", ">=", 10.0, "teacher FP32 / KD INT8 student ONNX bytes"),
           ("speedup_p50_vs_teacher", ">=", 5.0, "one-sentence p50 speed-up vs teacher"))


def measure_file(path: Path, data: Path, ev) -> dict[str, float]:
    splits = {name: TextSplit.load(data, name) for name in ("val", "test")}
    scores = {f"{name}_accuracy": accuracy(onnx_text_logits(path, split.texts, threads=ev.threads), split.y.numpy())
              for name, split in splits.items()}
    return {**scores, **file_sizes(path), **sentence_latency(path, splits["test"].texts, ev)}


def students(root: Path, data: Path, teacher: Path, seed: int, kind: str, out: Path) -> dict[str, dict]:
    """The labels-only and the distilled student of one seed, each as FP32 and INT8 ONNX, measured."""
    cfg = load_config(root / "params.yaml")
    kd = cfg.distill.text.model_copy(update={"seed": seed,
                                             "student": cfg.distill.text.student.model_copy(update={"kind": kind})})
    labels, test = manifest(data)["labels"], TextSplit.load(data, "test")
    found = {}
    for name, distill in (("labels only", False), ("KD", True)):
        student, _, _, metrics = distill_text(kd, distill, data, teacher)
        fp32, int8 = out / f"{seed}_{distill}_fp32.onnx", out / f"{seed}_{distill}_int8.onnx"
        export_text_fp32(student, fp32, cfg.export.text.opset, test.texts)
        quantize_text_int8(fp32, int8)
        files = [(fp32, "FP32"), (int8, "INT8")]
        if distill:   # the alternative: static QDQ, calibrated on validation sentences
            static = quantize_text_static(fp32, out / f"{seed}_static.onnx", student.tokenizer,
                                          TextSplit.load(data, "val").texts)
            files.append((static, "INT8 static QDQ"))
        for path, precision in files:
            attach_tokenizer(path, student.tokenizer, labels)
            found[f"student {name} {precision}"] = {**measure_file(path, data, cfg.evaluate.text),
                                                    "parameters": metrics["parameters"]}
    return found


def measure(root: Path, data: Path, teacher: Path, seeds: list[int], kind: str) -> dict:
    cfg = load_config(root / "params.yaml")
    ev = cfg.evaluate.text
    runs: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(teacher)
        path = export_text_fp32(model, Path(tmp) / "teacher.onnx", cfg.export.text.opset,
                                TextSplit.load(data, "test").texts)
        attach_tokenizer(path, model.tokenizer, manifest(data)["labels"])
        teacher_row = {**measure_file(path, data, ev), "parameters": count_parameters(model)}
        for seed in seeds:
            runs.append(students(root, data, teacher, seed, kind, Path(tmp)))
            print(f"seed {seed}: " + ", ".join(f"{k} {v['test_accuracy']:.4f}" for k, v in runs[-1].items()),
                  flush=True)
    models = {"teacher FP32": {**teacher_row, "seeds": 1}}
    for name in runs[0]:
        rows = [run[name] for run in runs]
        models[name] = {**rows[0], "seeds": len(rows),
                        **{f"{s}_accuracy": float(np.mean([r[f"{s}_accuracy"] for r in rows])) for s in ("val", "test")},
                        **{f"{s}_accuracy_std": float(np.std([r[f"{s}_accuracy"] for r in rows], ddof=1)) if len(rows) > 1
                           else 0.0 for s in ("val", "test")}}
    t, kd, ce = models["teacher FP32"], models["student KD INT8"], models["student labels only INT8"]
    ratios = {"kd_int8_drop_vs_teacher": t["test_accuracy"] - kd["test_accuracy"],
              "kd_int8_gain_over_labels_only": kd["test_accuracy"] - ce["test_accuracy"],
              "size_ratio_vs_teacher": t["bytes"] / kd["bytes"],
              "speedup_p50_vs_teacher": t["sentence_p50_ms"] / kd["sentence_p50_ms"]}
    return {"models": models, "ratios": ratios, "seeds": seeds, "student_kind": kind,
            "settings": ev.model_dump(), "teacher": cfg.teacher.text.model_dump(mode="json")}


def table(result: dict) -> str:
    ev = result["settings"]
    lines = [f"Text benchmark, {date.today()}, {machine()}; onnxruntime CPU, {ev['threads']} thread(s), "
             f"{ev['repeats']} one-sentence requests; students: {result['student_kind']}, seeds {result['seeds']}", "",
             "| model | parameters | val accuracy | test accuracy | bytes | sentence p50 ms | sentence p95 ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in result["models"].items():
        spread = lambda s: f" ± {m[f'{s}_accuracy_std']:.4f}" if m["seeds"] > 1 else ""
        lines.append(f"| {name} | {m['parameters']:,} | {m['val_accuracy']:.4f}{spread('val')} | "
                     f"{m['test_accuracy']:.4f}{spread('test')} | {m['bytes']:,} | {m['sentence_p50_ms']:.3f} | "
                     f"{m['sentence_p95_ms']:.3f} |")
    lines += ["", "Anchors on this data set (Pang & Lee sentence polarity): Kim's CNN ~81.5 %, BERT-base ~87 %.", "",
              *target_rows(TARGETS, result["ratios"], 4)]
    return "\n".join(lines)


def check_inputs(data: Path, teacher: Path) -> None:
    """What the benchmark reads is there, checked before any student trains: one line naming what is missing and
    the stage that makes it."""
    require([data / "manifest.json", data / "sentences.csv", teacher], "make them with `dvc repro "
            "train_teacher_text` (it prepares the data too), or name them with --data and --teacher")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--data", type=Path, help="default: the processed data distill_text reads, in --root")
    parser.add_argument("--teacher", type=Path, help="default: the teacher distill_text reads, in --root")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kind", choices=["bilstm", "cnn"], default="bilstm")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:   # a repeated seed is no independent run
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: distinct seeds of 0 or more (each a run of its own, "
                     "the spread over them reported)")
    where = stage_paths(args.root, "distill_text")
    data, teacher = args.data or args.root / where["data"], args.teacher or args.root / where["teacher"]
    check_inputs(data, teacher)
    result = measure(args.root, data, teacher, args.seeds, args.kind)
    print(table(result))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    run_cli(main)
