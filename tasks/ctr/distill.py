"""Stage ``distill_<family>``: frozen DeepFM teacher + processed data -> narrow DeepFM (or FM) student, FP32.

Inputs: ``<data>``, ``<teacher>``, ``<warm-start>`` (``tasks.warm_start``'s plan: the student from scratch or
fine-tuned from the champion's). Outputs: ``<model>`` (the student only; the feature adapter is training
scaffolding), ``<metrics>`` (test AUC and logloss, parameters, the teacher's AUC on the same test split),
``<plots>``. Without ``distill`` in ``recipe.<family>`` the student learns from the labels alone (the baseline).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tasks.artifacts import count_parameters, load_model, publish_training
from tasks.config import stage_args
from tasks.ctr.config import DistillCtr, warm_start_policy
from tasks.ctr.ctr_training import ctr_trainer, evaluate_ctr, fit_ctr, load_ctr_data
from tasks.ctr.models import CtrModel
from tasks.family_config import WarmStart
from tasks.warm_plan import MODE, start_from, warm_tags


def distill_ctr(cfg: DistillCtr, distill: bool, data_dir: Path, teacher_path: Path,
                   on_epoch: Callable[[int, dict[str, float]], None] | None = None, *,
                   warm: Path | None = None, policy: WarmStart | None = None
                   ) -> tuple[CtrModel, dict[str, int], list[dict[str, float]], dict[str, float], str]:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train, val, test, shape = load_ctr_data(data_dir)
    teacher = load_model(teacher_path)
    student = CtrModel(cfg.student, **shape)
    mode, spec = start_from(warm, "student", student, cfg.student, shape, cfg, policy)
    history = fit_ctr(*ctr_trainer(student, teacher, spec if distill else None), train, val, spec, on_epoch,
                      from_start=mode == "fine_tune")
    metrics = {f"test_{k}": v for k, v in evaluate_ctr(student, test, cfg.eval_batch_size).items()}
    metrics["teacher_test_auc"] = evaluate_ctr(teacher, test, cfg.eval_batch_size)["auc"]
    return student, shape, history, {**metrics, "parameters": count_parameters(student)}, mode


def main(family: str) -> None:
    args, cfg = stage_args(__doc__, "--data", "--teacher", "--model", "--metrics", "--plots",
                           optional=("--warm-start",))
    kd, recipe = cfg.block("distill", family), cfg.block("recipe", family)
    from tasks.tracking import stage_run

    policy = warm_start_policy(cfg, family)
    params = {f"distill.{family}": kd, f"recipe.{family}": recipe,
              **({f"warm_start.{family}": policy} if policy else {})}
    with stage_run(f"distill_{family}", cfg, params) as run:
        student, shape, history, metrics, mode = distill_ctr(
            kd, "distill" in recipe, args.data, args.teacher, lambda epoch, m: run.log_metrics(m, step=epoch + 1),
            warm=args.warm_start, policy=policy)
        run.set_tags(warm_tags(args.warm_start, "student", mode))
        publish_training(run, student, "ctr", kd.student, history, metrics, args, shape=shape, **{MODE: mode})
    print(f"student test AUC {metrics['test_auc']:.4f} ({metrics['parameters']:,} parameters), "
          f"teacher {metrics['teacher_test_auc']:.4f}")

