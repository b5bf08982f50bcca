"""Stage ``distill_<family>``: frozen teacher + processed data -> distilled MobileNet-style student (FP32).

Inputs: ``<data>`` splits, ``<teacher>`` model file, ``<warm-start>`` (``tasks.warm_start``'s plan: the student
from scratch or fine-tuned from the champion's). Outputs: ``<model>`` (the student only; adapters are
training scaffolding), ``<metrics>`` (test accuracy, parameters, the teacher's accuracy on the same test split),
``<plots>`` (per-epoch CSV). Checkpoints every epoch into ``<checkpoint>`` and resumes from it.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tasks.artifacts import count_parameters, fingerprint, load_model, publish_training, training_inputs
from tasks.config import stage_args
from tasks.distillation import Distiller, distillation_loss, loss_config
from tasks.family_config import WarmStart
from tasks.image_training import Split, evaluate, fit, memory_format, model_shape
from tasks.images.config import DistillImages
from tasks.images.models import MobileStudent
from tasks.warm_plan import MODE, start_from, started_from, warm_tags


def distill_images(cfg: DistillImages, distill: bool, data_dir: Path, teacher_path: Path, checkpoint: Path,
                   on_epoch: Callable[[int, dict[str, float]], None] | None = None, *,
                   warm: Path | None = None, policy: WarmStart | None = None
                   ) -> tuple[MobileStudent, list[dict[str, float]], dict[str, float], str]:
    """Train the student against the frozen teacher (or on labels alone when ``distill`` is false)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train, val, test = (Split.load(data_dir, s) for s in ("train", "val", "test"))
    teacher = load_model(teacher_path).to(memory_format=memory_format())
    student = MobileStudent(cfg.student, **train.model_shape()).to(memory_format=memory_format())
    mode, spec = start_from(warm, "student", student, cfg.student, model_shape(data_dir), cfg, policy)
    loss = loss_config(spec, distill, spec.label_smoothing)
    distiller = Distiller(student, teacher, loss, train.inputs(slice(2)))
    inputs = training_inputs(data_dir, teacher_path) + started_from(warm)
    history = fit(distiller, train, val, spec, checkpoint, fingerprint([spec, loss], inputs), on_epoch,
                  distillation_loss)
    metrics = {f"test_{k}": v for k, v in evaluate(student, test, cfg.eval_batch_size).items()}
    metrics["teacher_test_accuracy"] = evaluate(teacher, test, cfg.eval_batch_size)["accuracy"]
    metrics["parameters"] = count_parameters(student)
    return student, history, metrics, mode


def main(family: str) -> None:
    args, cfg = stage_args(__doc__, "--data", "--teacher", "--checkpoint", "--model", "--metrics",
                           "--plots", optional=("--warm-start",))
    kd, distill = cfg.block("distill", family).resolved(), "distill" in cfg.block("recipe", family)
    from tasks.tracking import stage_run

    policy = cfg.block("warm_start", family)
    with stage_run(f"distill_{family}", cfg, {f"distill.{family}": kd, f"recipe.{family}": cfg.block("recipe", family),
                                           f"warm_start.{family}": policy}) as run:
        student, history, metrics, mode = distill_images(
            kd, distill, args.data, args.teacher, args.checkpoint, lambda epoch, m: run.log_metrics(m, step=epoch + 1),
            warm=args.warm_start, policy=policy)
        run.set_tags(warm_tags(args.warm_start, "student", mode))
        publish_training(run, student, "mobile_student", kd.student, history, metrics, args,
                         shape=model_shape(args.data), **{MODE: mode})
    print(f"student test accuracy {metrics['test_accuracy']:.4f} ({metrics['parameters']:,} parameters), "
          f"teacher {metrics['teacher_test_accuracy']:.4f}")

