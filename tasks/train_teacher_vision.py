"""Stage ``train_teacher_vision``: processed Fashion-MNIST -> trained residual CNN teacher.

Inputs: ``<data>/{train,val,test}_{x,y}.npy`` (and the validation report, so it runs only on validated data).
Outputs: ``<model>`` (``{"arch", "state_dict"}``, loadable with ``weights_only=True``), ``<metrics>`` (JSON),
``<plots>`` (per-epoch CSV). Checkpoints every epoch into ``<checkpoint>`` and resumes from it when re-run.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tasks.artifacts import count_parameters, fingerprint, publish_training, training_inputs
from tasks.config import TrainTeacherVision, stage_args
from tasks.errors import run_cli
from tasks.training import Split, evaluate, fit, memory_format
from tasks.vision_models import ResNetTeacher


def train_teacher_vision(cfg: TrainTeacherVision, data_dir: Path, checkpoint: Path,
                         on_epoch: Callable[[int, dict[str, float]], None] | None = None
                         ) -> tuple[ResNetTeacher, list[dict[str, float]], dict[str, float]]:
    """Train the teacher on train, select nothing on test; return (model, history, test metrics)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train, val, test = (Split.load(data_dir, s) for s in ("train", "val", "test"))
    model = ResNetTeacher(cfg.arch).to(memory_format=memory_format())
    inputs = training_inputs(data_dir)
    history = fit(model, train, val, cfg, checkpoint, fingerprint([cfg], inputs), on_epoch)
    # The exported teacher runs in fp32, so that is what the reported metrics measure.
    test_metrics = {f"test_{k}": v for k, v in evaluate(model, test, cfg.eval_batch_size).items()}
    test_metrics["parameters"] = count_parameters(model)
    return model, history, test_metrics


def main() -> None:
    args, cfg = stage_args(__doc__, "--data", "--checkpoint", "--model", "--metrics", "--plots")
    teacher = cfg.teacher.vision
    from tasks.tracking import stage_run

    with stage_run("train_teacher_vision", cfg, {"teacher.vision": teacher}) as run:
        model, history, metrics = train_teacher_vision(
            teacher, args.data, args.checkpoint, lambda epoch, m: run.log_metrics(m, step=epoch + 1))
        publish_training(run, model, "resnet_teacher", teacher.arch, history, metrics, args)
    print(f"teacher test accuracy {metrics['test_accuracy']:.4f} ({metrics['parameters']:,} parameters)")


if __name__ == "__main__":
    run_cli(main)
