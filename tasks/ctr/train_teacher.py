"""Stage ``train_teacher_<family>``: processed click-through data -> DeepFM teacher, or the pretrained teacher of
``teacher.<family>.pretrained`` (an ONNX file, a TorchScript module, a ``torch.export`` program or a state dict of
``arch``) imported and scored instead.

Inputs: ``<data>`` (the prepare stage's folder; the validation report, so it runs only on validated data),
``<warm-start>`` (``tasks.warm_start``'s plan: train from scratch, fine-tune the champion's teacher, or reuse it).
Outputs: ``<model>`` (``{"kind", "arch", "shape", "state_dict"}``, loadable with ``weights_only=True``),
``<metrics>`` (test AUC, logloss, parameters), ``<plots>`` (per-epoch CSV). Training takes seconds, so it keeps the
best epoch by validation AUC instead of checkpointing.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tasks.artifacts import count_parameters, publish_training
from tasks.config import stage_args
from tasks.ctr.config import TrainTeacherCtr, warm_start_policy
from tasks.ctr.ctr_training import CtrSplit, evaluate_ctr, fit_ctr, label_loss, load_ctr_data
from tasks.ctr.models import CtrModel
from tasks.family_config import WarmStart
from tasks.imported_teacher import TeacherImportError, load_pretrained, publish_imported
from tasks.onnx_teacher import OnnxTeacher
from tasks.warm_plan import MODE, start_from, warm_tags


def train_ctr_teacher(cfg: TrainTeacherCtr, data_dir: Path,
                         on_epoch: Callable[[int, dict[str, float]], None] | None = None, *,
                         warm: Path | None = None, policy: WarmStart | None = None
                         ) -> tuple[CtrModel, dict[str, int], list[dict[str, float]], dict[str, float], str]:
    """Train the teacher on train (from where the plan in ``warm`` starts it), select its epoch on val; return
    (model, shape, history, test metrics, how it started: scratch, fine_tune or reuse)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train, val, test, shape = load_ctr_data(data_dir)
    model = CtrModel(cfg.arch, **shape)
    mode, spec = start_from(warm, "teacher", model, cfg.arch, shape, cfg, policy)
    history = [] if mode == "reuse" else fit_ctr(model, label_loss, train, val, spec, on_epoch,
                                                 from_start=mode == "fine_tune")
    metrics = {f"test_{k}": v for k, v in evaluate_ctr(model, test, cfg.eval_batch_size).items()}
    return model, shape, history, {**metrics, "parameters": count_parameters(model)}, mode


def import_ctr_teacher(cfg: TrainTeacherCtr, data_dir: Path, where: str
                          ) -> tuple[nn.Module, dict[str, int], dict[str, float]]:
    """The pretrained teacher of ``cfg.pretrained``, checksum verified: (model, shape, validation and test metrics)."""
    spec = cfg.pretrained
    assert spec is not None
    torch.set_num_threads(cfg.threads)
    train, val, test, shape = load_ctr_data(data_dir)
    model = load_pretrained(spec, where, val.batch(slice(0, 2))[:2], logits_shape=[],
                            feature_rank=3, build=lambda: CtrModel(cfg.arch, **shape))
    if isinstance(model, OnnxTeacher):   # a state dict was loaded into a model of the data's own shape
        check_fits_data(model, shape, (train, val, test), f"{where}: {spec.path}")
    metrics = {f"{name}_{k}": v for name, split in (("val", val), ("test", test))
               for k, v in evaluate_ctr(model, split, cfg.eval_batch_size).items()}
    return model, shape, {**metrics, "parameters": count_parameters(model)}


def check_fits_data(teacher: OnnxTeacher, shape: dict[str, int], splits: tuple[CtrSplit, ...], where: str) -> None:
    """Refuse (naming ``where``) an imported teacher made for other data: one whose field vectors are not one per
    field and multi-hot group (the student's, which distillation aligns them with: another count would broadcast), or
    whose embedding tables stop short of the data's ids (onnxruntime would fail mid-distillation, on a training row
    the import never scored)."""
    vectors = shape["fields"] + len(shape.get("groups", [None]))
    if teacher.arch.feature_shapes and teacher.arch.feature_shapes[0][0] != vectors:
        raise TeacherImportError(f"{where}: feature {teacher.arch.features[0]!r} has shape "
                                 f"{['N', *teacher.arch.feature_shapes[0]]}; the data's field vectors are "
                                 f"[N, {vectors}, dim] (its fields and multi-hot groups): a teacher made for other "
                                 "data")
    fields = torch.cat([split.fields for split in splits])
    genres = torch.cat([split.genres for split in splits])
    extremes = (torch.stack([fields.amin(0), fields.amax(0)]), torch.stack([genres.amin(0), genres.amax(0)]))
    try:
        teacher(*extremes)
    except Exception as err:  # onnxruntime's own error types
        raise TeacherImportError(f"{where}: onnxruntime cannot run it on the data's largest ids "
                                 f"{extremes[0][1].tolist()} (vocabulary {shape['vocabulary']}): a teacher made for "
                                 f"other data? ({str(err).splitlines()[0]})") from err


def main(family: str) -> None:
    args, cfg = stage_args(__doc__, "--data", "--model", "--metrics", "--plots",
                           optional=("--warm-start",))
    teacher, policy = cfg.block("teacher", family), warm_start_policy(cfg, family)
    from tasks.tracking import stage_run

    params = {f"teacher.{family}": teacher, **({f"warm_start.{family}": policy} if policy else {})}
    with stage_run(f"train_teacher_{family}", cfg, params) as run:
        if (spec := teacher.pretrained) is not None:
            model, shape, metrics = import_ctr_teacher(teacher, args.data, f"teacher.{family}.pretrained")
            publish_imported(run, model, spec, metrics, args, "ctr", teacher.arch, shape=shape)
        else:
            model, shape, history, metrics, mode = train_ctr_teacher(
                teacher, args.data, lambda epoch, m: run.log_metrics(m, step=epoch + 1), warm=args.warm_start,
                policy=policy)
            run.set_tags(warm_tags(args.warm_start, "teacher", mode))
            publish_training(run, model, "ctr", teacher.arch, history, metrics, args, shape=shape, **{MODE: mode})
    print(f"teacher test AUC {metrics['test_auc']:.4f}, logloss {metrics['test_logloss']:.4f} "
          f"({metrics['parameters']:,} parameters)")

