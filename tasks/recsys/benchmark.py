"""Benchmark of the recommender family in one run: our own LR and FM baselines trained now, next to the pipeline's
teacher and students measured back to back in onnxruntime, and RecBole's published ML-1M figures for orientation.

Reads what ``dvc repro evaluate_recsys`` (or ``make run``) leaves in ``--root``: the processed data and the ONNX
folder its evaluate stage reads (``data/recsys/processed``, ``models/recsys/onnx``). The baselines train with
``distill.recsys``'s recipe on labels alone and are exported to ONNX like the others, so every AUC in the table is
an onnxruntime AUC on the same test split.

    python -m tasks.recsys.benchmark [--out reports/benchmarks/recsys.json]
"""
from __future__ import annotations

import argparse
import tempfile
from datetime import date
from pathlib import Path

import torch

from flows.benchmark import machine, target_rows, write_result
from flows.stage_graph import stage_paths
from tasks.config import load_config
from tasks.ctr.config import RecArch
from tasks.ctr.ctr_onnx import MODELS, export_ctr_fp32
from tasks.ctr.ctr_training import fit_ctr, label_loss, load_ctr_data
from tasks.ctr.models import CtrModel
from tasks.ctr.scores import ratios, split_quality
from tasks.errors import run_cli
from tasks.io import require
from tasks.onnx_models import file_sizes
from tasks.recsys.evaluate import score_onnx

#: RecBole's context-aware benchmark on MovieLens-1M (test AUC), for orientation only: another data set.
RECBOLE_ML1M = {"LR": 0.8699, "FM": 0.8935, "DeepFM": 0.8997}
BASELINES = {"LR (ours)": RecArch(dim=1, fm=False), "FM (ours)": RecArch(dim=16, fm=True)}
TARGETS = (("test_auc_drop_vs_teacher", "<=", 0.005, "student INT8 AUC drop vs teacher"),
           ("size_ratio_vs_teacher", ">=", 8.0, "teacher FP32 / student INT8 ONNX size"),
           ("speedup_p50_vs_teacher", ">=", 3.0, "1,000-candidate request p50 speed-up vs teacher"))
#: the processed files it reads besides the splits (a missing split is named when loaded, before any training)
DATA_FILES = ("features.json", "users.npy", "items.npy", "items_genres.npy")


def train_baselines(root: Path, data: Path, out: Path) -> dict[str, Path]:
    cfg = load_config(root / "params.yaml").distill.recsys
    torch.set_num_threads(cfg.threads)
    train, val, _, shape = load_ctr_data(data)
    paths = {}
    for name, arch in BASELINES.items():
        torch.manual_seed(cfg.seed)
        model = CtrModel(arch, **shape)
        fit_ctr(model, label_loss, train, val, cfg)
        paths[name] = export_ctr_fp32(model, out / f"{name.split()[0].lower()}.onnx")
    return paths


def measure(root: Path, onnx_dir: Path, data: Path) -> dict:
    ev = load_config(root / "params.yaml").evaluate.recsys
    with tempfile.TemporaryDirectory() as tmp:
        paths = {**train_baselines(root, data, Path(tmp)), **{n: onnx_dir / f"{n}.onnx" for n in MODELS}}
        models = {name: {**split_quality(path, data, "val", ev.threads), **score_onnx(path, data, ev),
                         **file_sizes(path)} for name, path in paths.items()}
    return {"models": models, "ratios": ratios(models), "settings": ev.model_dump()}


def table(result: dict) -> str:
    ev = result["settings"]
    lines = [f"Recommender benchmark, {date.today()}, {machine()}; onnxruntime CPU, {ev['threads']} thread(s), "
             f"{ev['repeats']} requests of {ev['candidates']} candidates", "",
             "| model | val AUC | test AUC | test logloss | bytes | request p50 ms | request p95 ms | items/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in result["models"].items():
        lines.append(f"| {name} | {m['val_auc']:.4f} | {m['test_auc']:.4f} | {m['test_logloss']:.4f} | "
                     f"{m['bytes']:,} | {m['latency_p50_ms']:.3f} | "
                     f"{m['latency_p95_ms']:.3f} | {m['throughput_items_per_s']:,.0f} |")
    orientation = ", ".join(f"{k} {v}" for k, v in RECBOLE_ML1M.items())
    lines += ["", f"RecBole ML-1M test AUC, for orientation (another, larger data set): {orientation}", "",
              *target_rows(TARGETS, result["ratios"], 4)]
    return "\n".join(lines)


def check_inputs(onnx_dir: Path, data: Path) -> None:
    """What the benchmark reads is there, checked before the baselines train (minutes): one line naming what is
    missing and the stage that makes it."""
    require([data / name for name in DATA_FILES] + [onnx_dir / f"{name}.onnx" for name in MODELS],
            "make them with `dvc repro export_recsys` (it prepares the data too), or name their folders with --data "
            "and --onnx-dir")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--onnx-dir", type=Path, help="default: the ONNX folder evaluate_recsys reads, in --root")
    parser.add_argument("--data", type=Path, help="default: the processed data evaluate_recsys reads, in --root")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    where = stage_paths(args.root, "evaluate_recsys")
    onnx_dir, data = args.onnx_dir or args.root / where["onnx"], args.data or args.root / where["data"]
    check_inputs(onnx_dir, data)
    result = measure(args.root, onnx_dir, data)
    print(table(result))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    run_cli(main)
