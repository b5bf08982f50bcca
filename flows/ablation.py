"""Ablation benchmark of an image family's compression recipe: which technique buys what.

For ``--family`` (by default the first family of params.yaml with an ``ablation`` block): trains every arm once per
seed of ``ablation.<family>.seeds`` with the stage functions of ``tasks/`` (the code ``dvc repro`` runs), on the
data and teacher the DVC graph produces (``dvc repro train_teacher_<family>`` first),
then measures each model as an ONNX file in onnxruntime on the validation split (what a choice may read) and the
test split (reported), after checking each file against its reference with the export stage's parity thresholds
(a float file against its PyTorch model, a QAT file against the fake-quantized model that was trained, a PTQ file
against its QDQ graph run as written); a file that fails stops the ablation. With ``ablation.<family>.low_bit``,
three more arms quantize the same students with 4-bit weights (INT4 in the ONNX file): PTQ, QAT without KD,
KD + QAT. Writes ``<out>/<family>.md`` and ``<out>/<family>.json`` (the family's HTML report shows the table) and
logs both, with per-arm metrics, to one MLflow run. Re-running resumes: every arm checkpoints each epoch under
``<out>/work/<family>`` and a finished arm is not trained again.

    python -m flows.ablation [--family F] [--root .] [--out reports/ablation] [--skip-repro]
"""
from __future__ import annotations

import argparse
import codecs
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from torch import nn

from flows.ablation_report import Measured, arms, check_targets, low_bit_arm, summarise, table
from flows.benchmark import machine
from flows.stage_graph import stage_paths
from tasks.artifacts import count_nonzero, count_parameters, load_model, qat_extra, save_model
from tasks.config import Config, load_config
from tasks.errors import ConfigError, PipelineError
from tasks.image_training import Split, model_shape
from tasks.images.config import QatImages, ablation_recipes
from tasks.images.distill import distill_images
from tasks.images.evaluate import latency
from tasks.images.export import parity, torch_logits
from tasks.images.prune import prune_images, pruned_extra
from tasks.images.qat import qat_images
from tasks.images.share import share_images
from tasks.io import tools_env, write_atomic, write_json
from tasks.onnx_models import export_fp32, export_int8, file_sizes, onnx_accuracy, onnx_logits, quantize_ptq


def inputs(root: Path, family: str) -> tuple[Path, Path]:
    """The processed data and the teacher every arm trains from (relative to ``root``): distill_<family>'s, as
    dvc.yaml names them."""
    where = stage_paths(root, f"distill_{family}")
    return where["data"], where["teacher"]


def measure(model: nn.Module, onnx_path: Path, val: Split, test: Split, cfg: Config, family: str,
            reference: np.ndarray, arm: str) -> Measured:
    """An arm's ONNX file on both splits, after checking it against ``reference`` (its PyTorch model's test
    logits, or for a PTQ file its QDQ graph run as written) with the export stage's parity thresholds; its speed
    as the evaluation stage measures it."""
    threads, ev = cfg.block("distill", family).threads, cfg.block("evaluate", family)
    logits = onnx_logits(onnx_path, test, threads=threads)
    checked = parity(arm, reference, logits, test.y.numpy(), cfg.block("export", family))
    sizes, speed = file_sizes(onnx_path), latency(onnx_path, test, ev)
    return Measured(float((logits.argmax(1) == test.y.numpy()).mean()), onnx_accuracy(onnx_path, val, threads),
                    count_parameters(model), count_nonzero(model), sizes["bytes"], sizes["gzip_bytes"],
                    checked["top1_agreement"], speed["latency_b1_p50_ms"],
                    speed[f"throughput_b{ev.throughput_batch}_ips"])


def run_seed(cfg: Config, family: str, seed: int, root: Path, work: Path) -> dict[str, Measured]:
    """Train and measure every student arm for one seed; ``work`` holds its checkpoints and models."""
    r = ablation_recipes(cfg, seed, family)
    kd, qat, spec = r["distill"], r["qat"], cfg.block("ablation", family)
    data, teacher = (root / path for path in inputs(root, family))
    ckpt = work / "checkpoints"
    files = {name: work / f"{name}.pt" for name in ("ce", "kd", "pruned", "qat_kd")}
    models: dict[str, tuple[nn.Module, Path]] = {}
    shape = model_shape(data)

    ce = distill_images(kd, False, data, teacher, ckpt / "ce.pt")[0]
    kd_student = distill_images(kd, True, data, teacher, ckpt / "kd.pt")[0]
    for name, model in (("ce", ce), ("kd", kd_student)):
        save_model(model, "mobile_student", kd.student, files[name], shape=shape)
    qat_ce = qat_images(qat, kd, False, data, teacher, files["ce"], ckpt / "qat_ce.pt")[0]
    qat_kd = qat_images(qat, kd, True, data, teacher, files["kd"], ckpt / "qat_kd.pt")[0]
    save_model(qat_kd, "mobile_student", kd.student, files["qat_kd"], **qat_extra(qat), shape=shape)
    pruned, arch = prune_images(r["prune"], kd, True, data, teacher, files["kd"], ckpt / "prune.pt")[:2]
    save_model(pruned, "mobile_student", arch, files["pruned"], shape=shape, **pruned_extra(pruned, r["prune"]))
    qat_pruned = qat_images(qat, kd, True, data, teacher, files["pruned"], ckpt / "qat_pruned.pt")[0]
    shared = share_images(r["share"], kd, True, data, teacher, files["qat_kd"], ckpt / "share.pt",
                          cfg.block("export", family), qat)[0]
    low = spec.low_bit
    if low is not None:   # the same students, quantized with low.weight_bits-bit weights
        qat_low = QatImages.model_validate({**qat.model_dump(), "weight_bits": low.weight_bits})
        tag = f"w{low.weight_bits}"
        low_ce = qat_images(qat_low, kd, False, data, teacher, files["ce"], ckpt / f"qat_ce_{tag}.pt")[0]
        low_kd = qat_images(qat_low, kd, True, data, teacher, files["kd"], ckpt / f"qat_kd_{tag}.pt")[0]

    val, test = Split.load(data, "val"), Split.load(data, "test")
    calibration = val.sample(spec.calibration_size)
    ce_onnx, kd_onnx = export_fp32(ce, work / "ce.onnx"), export_fp32(kd_student, work / "kd.onnx")
    models["student CE-only"] = ce, ce_onnx
    models["student KD"] = kd_student, kd_onnx
    models["CE-only + PTQ"] = ce, quantize_ptq(ce_onnx, calibration, work / "ce_ptq.onnx", qat)
    models["KD + PTQ"] = kd_student, quantize_ptq(kd_onnx, calibration, work / "kd_ptq.onnx", qat)
    models["QAT without KD"] = qat_ce, export_int8(qat_ce, work / "qat_ce.onnx")
    models["KD + QAT"] = qat_kd, export_int8(qat_kd, work / "qat_kd.onnx")
    models["KD + QAT + pruning"] = qat_pruned, export_int8(qat_pruned, work / "qat_pruned.onnx")
    models["KD + QAT + weight sharing"] = shared, export_int8(shared, work / "shared.onnx")
    if low is not None:
        models[low_bit_arm("CE-only + PTQ", low.weight_bits)] = ce, quantize_ptq(
            ce_onnx, calibration, work / f"ce_ptq_{tag}.onnx", qat_low)
        models[low_bit_arm("QAT without KD", low.weight_bits)] = low_ce, export_int8(low_ce, work / f"qat_ce_{tag}.onnx")
        models[low_bit_arm("KD + QAT", low.weight_bits)] = low_kd, export_int8(low_kd, work / f"qat_kd_{tag}.onnx")

    def reference(arm: str, model: nn.Module, path: Path) -> np.ndarray:  # as the export stage checks its files
        if arm.endswith("+ PTQ"):  # onnxruntime's own quantization: its QDQ graph run as written
            return onnx_logits(path, test, threads=kd.threads, optimized=False)
        return torch_logits(model, test)   # a float model, or the fake-quantized model QAT trained

    return {arm: measure(model, path, val, test, cfg, family, reference(arm, model, path), arm)
            for arm, (model, path) in models.items()}


def ablated_family(cfg: Config, family: str | None) -> str:
    """``family``, or the first family of params.yaml with an ablation block; a family without one is named."""
    blocks = [name for name in cfg.families if getattr(cfg.ablation, name, None) is not None]
    family = family or (blocks[0] if blocks else "")
    if family not in blocks:
        raise ConfigError(f"params.yaml: no ablation.{family or '<family>'} block (families with one: "
                          f"{', '.join(blocks) or 'none'})")
    return family


def repro_teacher(root: Path, family: str) -> None:
    """``dvc repro train_teacher_<family>`` in ``root``, its output shown as it runs; a failure is a PipelineError
    naming the stage, DVC's exit code and its last ERROR line (before: a CalledProcessError traceback)."""
    stage, tail = f"train_teacher_{family}", ""
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace")
    # the stages' `python` is this interpreter, as in a pipeline run (else whichever one comes first on PATH)
    with subprocess.Popen([sys.executable, "-m", "dvc", "repro", stage], cwd=root, env=tools_env(),
                          stderr=subprocess.PIPE) as proc:
        while chunk := proc.stderr.read1(1 << 16):   # passed on as it comes (progress bars too); the end kept
            text = decode.decode(chunk)
            sys.stderr.write(text)
            sys.stderr.flush()
            tail = (tail + text)[-8192:]
    if proc.returncode:
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        said = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "")
        raise PipelineError(f"dvc repro {stage} failed (exit {proc.returncode}) in {root}"
                            + (f": {said[:400]}" if said else ""))


def ablation(root: Path, out: Path, family: str | None = None, repro: bool = True) -> dict:
    """Run the whole ablation of ``family`` in ``root``; return the JSON document it writes."""
    cfg = load_config(root / "params.yaml")
    family = ablated_family(cfg, family)
    spec = cfg.block("ablation", family)
    if repro:  # the data and teacher of the one graph; DVC decides whether anything needs to run
        repro_teacher(root, family)
    start = time.perf_counter()
    per_seed = {seed: run_seed(cfg, family, seed, root, out / "work" / family / f"seed{seed}") for seed in spec.seeds}
    data, teacher_file = inputs(root, family)
    teacher = load_model(root / teacher_file)
    val, test = Split.load(root / data, "val"), Split.load(root / data, "test")
    teacher_m = measure(teacher, export_fp32(teacher, out / "work" / family / "teacher.onnx"), val, test, cfg, family,
                        torch_logits(teacher, test), "teacher")
    rows = summarise(per_seed, teacher_m, arms(spec))
    checks = check_targets(rows, spec)
    wall = time.perf_counter() - start
    doc = {"date": str(date.today()), "machine": machine(), "family": family, "profile": cfg.profile,
           "wall_seconds": wall, "seeds": spec.seeds, "rows": [{"arm": arm, **row} for arm, row in rows.items()],
           "targets": checks,
           "recipes": {k: v.model_dump() for k, v in ablation_recipes(cfg, spec.seeds[0], family).items()}}
    markdown = table(rows, checks, cfg, family, wall)
    write_json(out / f"{family}.json", doc)
    write_atomic(out / f"{family}.md", (markdown + "\n").encode())
    _log(cfg, family, root, out, rows, checks)
    print(markdown)
    return doc


def _log(cfg: Config, family: str, root: Path, out: Path, rows: dict[str, dict], checks: list[dict]) -> None:
    from tasks.tracking import pipeline_run

    spec = cfg.block("ablation", family)
    with pipeline_run(cfg, f"ablation-{family}", root, launcher="ablation") as run:
        # what every arm trained on (MLflow's dataset inputs)
        run.log_data([str(inputs(root, family)[0])], root, "training")
        run.log_params({"family": family, "seeds": spec.seeds, "calibration_size": spec.calibration_size,
                        **{f"ablation.{k}": v for k, v in spec.model_dump().items()
                           if k in ("distill", "prune", "qat", "share")}})
        slug = {arm: arm.lower().replace(" + ", "_").replace(" ", "_").replace("-", "_") for arm in rows}
        run.log_metrics({f"{slug[a]}.accuracy_{k}": r[k] for a, r in rows.items() for k in ("mean", "std")})
        run.log_metrics({f"{slug[a]}.gzip_bytes": r["gzip_bytes"] for a, r in rows.items()})
        run.set_tags({f"target.{c['key']}": "met" if c["met"] else "missed" for c in checks})
        for name in (f"{family}.md", f"{family}.json"):
            run.log_artifact(out / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", help="an image family with an ablation block (default: the first one)")
    parser.add_argument("--root", type=Path, default=Path("."), help="project root (params.yaml, dvc.yaml)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: <root>/reports/ablation (a relative --out is from the current folder)")
    parser.add_argument("--skip-repro", action="store_true", help="use the data and teacher already on disk")
    args = parser.parse_args()
    root = args.root.resolve()
    out = (args.out or root / "reports" / "ablation").resolve()   # a relative --out: from where it was typed
    os.chdir(root)
    ablation(root, out, args.family, repro=not args.skip_repro)


if __name__ == "__main__":
    from tasks.errors import run_cli

    run_cli(main)
