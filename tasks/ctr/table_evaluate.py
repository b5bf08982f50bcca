"""Stage ``evaluate_<family>`` of a table family, and its contract (``table_family``): the exported click-through
models measured in onnxruntime.

Inputs: ``<data>`` (the prepare stage's folder), ``<onnx>`` (the export stage's) and the PyTorch models (for
parameter counts). Output ``<metrics>``: per ONNX model the validation AUC and logloss (``val_*``: what a choice
between models may read), the test AUC and logloss (``test_*``: reported and gated, never chosen on), stored size,
and the latency of one request scoring ``request_rows`` test rows (p50 / p95 / p99) with its throughput in rows/s;
plus ratios against the teacher, and the SHA-256 of every ONNX file measured.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.artifacts import count_parameters, load_model
from tasks.config import stage_args
from tasks.ctr.ctr_onnx import MODELS
from tasks.ctr.ctr_training import CtrSplit
from tasks.ctr.scores import log_int8_curves, ratios, split_quality
from tasks.ctr.table import TEST_ROWS, VOCABULARY, encode_with
from tasks.ctr.table_config import EvaluateTable
from tasks.family import Family
from tasks.gate import GateSpec
from tasks.io import save_npy
from tasks.onnx_models import file_sizes, percentiles_ms, session, timed_runs


def request(data_dir: Path, rows: int) -> dict[str, np.ndarray]:
    """One request: the first ``rows`` test rows (fewer when the split holds fewer)."""
    test = CtrSplit.load(data_dir, "test")
    return {"fields": test.fields[:rows].numpy(), "genres": test.genres[:rows].numpy()}


def request_latency(path: Path, data_dir: Path, cfg: EvaluateTable) -> dict[str, float]:
    feeds = request(data_dir, cfg.request_rows)
    count = len(feeds["fields"])
    times = timed_runs(session(path, cfg.threads), feeds, cfg.warmup, cfg.repeats)
    return {**percentiles_ms(times, "latency"), "throughput_rows_per_s": float(count / np.median(times)),
            "request_rows": count}


def score_onnx(path: Path, data_dir: Path, cfg: EvaluateTable) -> dict[str, float]:
    """Test AUC / logloss and the request latency of one ONNX file (what the gate re-measures for a champion)."""
    return {**split_quality(path, data_dir, "test", cfg.threads), **request_latency(path, data_dir, cfg)}


def evaluate_table(cfg: EvaluateTable, data_dir: Path, onnx_dir: Path, models: dict[str, Path]) -> dict[str, dict]:
    return {name: {**split_quality(onnx_dir / f"{name}.onnx", data_dir, "val", cfg.threads),
                   **score_onnx(onnx_dir / f"{name}.onnx", data_dir, cfg), **file_sizes(onnx_dir / f"{name}.onnx"),
                   "parameters": count_parameters(load_model(models[name]))}
            for name in MODELS}


def describe_data(data_dir: Path) -> dict[str, Any]:
    """What a request means: the fields and the tag columns in input order (which values a model knows is its
    vocabulary's, registered with it: ``paired_data`` scores a champion of another one in its own encoding)."""
    vocab = json.loads((data_dir / VOCABULARY).read_text())
    return {"fields": [f["name"] for f in vocab["fields"]],
            "groups": [[g["name"], g["separator"]] for g in vocab["groups"]]}


def same_encoding(theirs: dict[str, Any], ours: dict[str, Any]) -> bool:
    """Whether two vocabularies encode every row alike (one written before numeric fields and ``na_values`` names
    no field's kind and no list: its fields are categorical, its list empty)."""
    def settled(vocab: dict[str, Any]) -> dict[str, Any]:
        return {**vocab, "na_values": vocab.get("na_values", []),
                "fields": [{"kind": "categorical", **f} for f in vocab["fields"]]}

    return settled(theirs) == settled(ours)


def paired_data(champion: Path, data: Path, scratch: Path, cfg: Any) -> tuple[Path, Path] | None:
    """The test rows of ``data`` encoded in the champion's registered vocabulary, beside ``data`` itself: a champion
    trained on an older version of the table (other values, other tags, so other rows and columns) scored on
    today's test rows as it would serve them (a value it never saw: its field's row 0). None when both vocabularies
    are the same."""
    theirs, ours = (json.loads(p.read_text()) for p in (champion / VOCABULARY, data / VOCABULARY))
    if same_encoding(theirs, ours):
        return None
    fields, genres = encode_with(pd.read_parquet(data / TEST_ROWS), theirs)
    paired = scratch / "champion"
    save_npy(paired / "test_fields.npy", fields)
    save_npy(paired / "test_genres.npy", genres)
    save_npy(paired / "test_y.npy", np.load(data / "test_y.npy"))
    print(f"champion scored in its own vocabulary ({sum(f['size'] for f in theirs['fields'])} rows, "
          f"{genres.shape[1]} tag columns) on the {len(fields)} test rows")
    return paired, data


def table_family(name: str, title: str) -> Family:
    """The contract of click-through family ``name`` on this kit: test AUC, the latency of one request of
    ``evaluate.<name>.request_rows`` rows, the vocabulary shipped with every registered model."""
    return Family(name, title, GateSpec("latency", "one-request"),
                  lambda path, data, cfg: score_onnx(path, data, cfg.block("evaluate", name)),
                  lambda path, data, cfg: request_latency(path, data, cfg.block("evaluate", name)),
                  lambda data: request(data, 1), describe_data=describe_data, model_files=(VOCABULARY,),
                  paired_data=paired_data)


def main(family: str) -> None:
    args, cfg = stage_args(__doc__, "--data", "--onnx", "--teacher", "--student-fp32", "--student", "--metrics")
    ev = cfg.block("evaluate", family)
    from tasks.tracking import stage_run

    with stage_run(f"evaluate_{family}", cfg, {f"evaluate.{family}": ev}) as run:
        models = {"teacher_fp32": args.teacher, "student_fp32": args.student_fp32, "student_int8": args.student}
        results = evaluate_table(ev, args.data, args.onnx, models)
        summary = ratios(results)
        run.publish_evaluation(args.metrics, results, summary, ev, args.onnx)
        log_int8_curves(run, args.onnx, args.data, ev.threads)
    for name, r in results.items():
        print(f"{name}: AUC val {r['val_auc']:.4f}, test {r['test_auc']:.4f}, {r['bytes']:,} bytes, "
              f"p50 {r['latency_p50_ms']:.3f} ms per {r['request_rows']} rows")
    print(", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
