"""Stage ``train_teacher_<family>``: processed images -> trained residual CNN teacher, or the pretrained
teacher of ``teacher.<family>.pretrained`` (an ONNX file, a TorchScript module, a ``torch.export`` program or a state
dict of ``arch``) imported and scored instead.

Inputs: ``<data>/{train,val,test}_{x,y}.npy`` (and the validation report, so it runs only on validated data),
``<warm-start>`` (``tasks.warm_start``'s plan: train from scratch, fine-tune the champion's teacher, or reuse it).
Outputs: ``<model>`` (``{"arch", "state_dict"}``, loadable with ``weights_only=True``), ``<metrics>`` (JSON),
``<plots>`` (per-epoch CSV). Checkpoints every epoch into ``<checkpoint>`` and resumes from it when re-run.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tasks.artifacts import count_parameters, fingerprint, publish_training, training_inputs
from tasks.config import stage_args
from tasks.family_config import WarmStart
from tasks.image_training import Split, evaluate, fit, memory_format, model_shape
from tasks.images.config import TrainTeacherImages
from tasks.images.models import ResNetTeacher
from tasks.imported_teacher import load_pretrained, publish_imported
from tasks.warm_plan import MODE, start_from, started_from, warm_tags


def train_teacher_images(cfg: TrainTeacherImages, data_dir: Path, checkpoint: Path,
                         on_epoch: Callable[[int, dict[str, float]], None] | None = None, *,
                         warm: Path | None = None, policy: WarmStart | None = None
                         ) -> tuple[ResNetTeacher, list[dict[str, float]], dict[str, float], str]:
    """Train the teacher on train (from where the plan in ``warm`` starts it), select nothing on test; return
    (model, history, test metrics, how it started: scratch, fine_tune or reuse)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train, val, test = (Split.load(data_dir, s) for s in ("train", "val", "test"))
    model = ResNetTeacher(cfg.arch, **train.model_shape()).to(memory_format=memory_format())
    mode, spec = start_from(warm, "teacher", model, cfg.arch, model_shape(data_dir), cfg, policy)
    inputs = training_inputs(data_dir) + started_from(warm)
    if mode == "reuse":   # trained nothing: its checkpoint folder (a DVC output) is created empty
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    history = [] if mode == "reuse" else fit(model, train, val, spec, checkpoint, fingerprint([spec], inputs),
                                             on_epoch)
    # The exported teacher runs in fp32, so that is what the reported metrics measure.
    test_metrics = {f"test_{k}": v for k, v in evaluate(model, test, cfg.eval_batch_size).items()}
    test_metrics["parameters"] = count_parameters(model)
    return model, history, test_metrics, mode


def import_teacher_images(cfg: TrainTeacherImages, data_dir: Path, family: str) -> tuple[nn.Module, dict[str, float]]:
    """The pretrained teacher of ``cfg.pretrained``, checksum verified, with its validation and test metrics."""
    spec = cfg.pretrained
    assert spec is not None
    torch.set_num_threads(cfg.threads)
    val, test = Split.load(data_dir, "val"), Split.load(data_dir, "test")
    model = load_pretrained(spec, f"teacher.{family}.pretrained", (val.inputs(slice(2)),),
                            logits_shape=[val.num_classes], feature_rank=4,
                            build=lambda: ResNetTeacher(cfg.arch, **val.model_shape()))
    metrics = {f"{name}_{k}": v for name, split in (("val", val), ("test", test))
               for k, v in evaluate(model, split, cfg.eval_batch_size).items()}
    metrics["parameters"] = count_parameters(model)
    return model, metrics


def main(family: str) -> None:
    args, cfg = stage_args(__doc__, "--data", "--checkpoint", "--model", "--metrics", "--plots",
                           optional=("--warm-start",))
    teacher = cfg.block("teacher", family)
    from tasks.tracking import stage_run

    params = {f"teacher.{family}": teacher, f"warm_start.{family}": cfg.block("warm_start", family)}
    with stage_run(f"train_teacher_{family}", cfg, params) as run:
        if (spec := teacher.pretrained) is not None:
            model, metrics = import_teacher_images(teacher, args.data, family)
            publish_imported(run, model, spec, metrics, args, "resnet_teacher", teacher.arch,
                             shape=model_shape(args.data))
        else:
            model, history, metrics, mode = train_teacher_images(
                teacher, args.data, args.checkpoint, lambda epoch, m: run.log_metrics(m, step=epoch + 1),
                warm=args.warm_start, policy=cfg.block("warm_start", family))
            run.set_tags(warm_tags(args.warm_start, "teacher", mode))
            publish_training(run, model, "resnet_teacher", teacher.arch, history, metrics, args,
                             shape=model_shape(args.data), **{MODE: mode})
    print(f"teacher test accuracy {metrics['test_accuracy']:.4f} ({metrics['parameters']:,} parameters)")

