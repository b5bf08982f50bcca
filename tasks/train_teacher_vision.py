"""Stage ``train_teacher_vision``: processed Fashion-MNIST -> trained residual CNN teacher.

Inputs: ``<data>/{train,val,test}_{x,y}.npy`` (and the validation report, so it runs only on validated data).
Outputs: ``<model>`` (``{"arch", "state_dict"}``, loadable with ``weights_only=True``), ``<metrics>`` (JSON),
``<plots>`` (per-epoch CSV). Checkpoints every epoch into ``<checkpoint>`` and resumes from it when re-run.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import torch

from tasks.config import TrainTeacherVision, load_config
from tasks.errors import run_cli
from tasks.io import file_digest, write_atomic, write_json
from tasks.training import FitSpec, Split, evaluate, fit
from tasks.vision_models import ResNetTeacher, count_parameters


def fingerprint(cfg: TrainTeacherVision, data_dir: Path) -> str:
    """What a checkpoint must have been trained on to be resumed: these params and these exact arrays."""
    digest = hashlib.sha256(cfg.model_dump_json().encode())
    for name in ("train_x", "train_y", "val_x", "val_y"):
        digest.update(file_digest(data_dir / f"{name}.npy").encode())
    return digest.hexdigest()


def train_teacher_vision(cfg: TrainTeacherVision, data_dir: Path, checkpoint: Path,
                         on_epoch: Callable[[int, dict[str, float]], None] | None = None
                         ) -> tuple[ResNetTeacher, list[dict[str, float]], dict[str, float]]:
    """Train the teacher on train, select nothing on test; return (model, history, test metrics)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train, val, test = (Split.load(data_dir, s) for s in ("train", "val", "test"))
    model = ResNetTeacher(cfg.arch).to(memory_format=torch.channels_last)
    spec = FitSpec(cfg.epochs, cfg.batch_size, cfg.optimizer, cfg.schedule, cfg.augmentation,
                   cfg.label_smoothing, cfg.seed, cfg.bf16, cfg.eval_batch_size)
    history = fit(model, train, val, spec, checkpoint, fingerprint(cfg, data_dir), on_epoch)
    # The exported teacher runs in fp32, so that is what the reported metrics measure.
    test_metrics = {f"test_{k}": v for k, v in evaluate(model, test, cfg.eval_batch_size).items()}
    test_metrics["parameters"] = count_parameters(model)
    return model, history, test_metrics


def save_teacher(model: ResNetTeacher, cfg: TrainTeacherVision, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"arch": cfg.arch.model_dump(), "state_dict": model.state_dict()}, buffer)
    write_atomic(path, buffer.getvalue())


def load_teacher(path: Path) -> ResNetTeacher:
    from tasks.config import ResNetArch

    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = ResNetTeacher(ResNetArch.model_validate(blob["arch"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def history_csv(history: list[dict[str, float]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["epoch", *history[0]])
    writer.writeheader()
    writer.writerows({"epoch": i + 1, **row} for i, row in enumerate(history))
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    for flag in ("--data", "--checkpoint", "--model", "--metrics", "--plots"):
        parser.add_argument(flag, type=Path, required=True)
    args = parser.parse_args()
    cfg = load_config(args.params)
    teacher = cfg.teacher.vision
    from tasks.tracking import stage_run

    with stage_run("train_teacher_vision", cfg, {"teacher.vision": teacher}) as run:
        model, history, metrics = train_teacher_vision(
            teacher, args.data, args.checkpoint, lambda epoch, m: run.log_metrics(m, step=epoch + 1))
        save_teacher(model, teacher, args.model)
        write_json(args.metrics, metrics)
        write_atomic(args.plots, history_csv(history).encode())
        run.log_metrics(metrics)
        run.log_text(f"{model}\n\nparameters: {metrics['parameters']:,}\n", "model_summary.txt")
        for path in (args.model, args.metrics, args.plots):
            run.log_artifact(path)
    print(f"teacher test accuracy {metrics['test_accuracy']:.4f} ({metrics['parameters']:,} parameters)")


if __name__ == "__main__":
    run_cli(main)
