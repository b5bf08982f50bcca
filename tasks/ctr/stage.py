"""The command line every click-through compression stage (``prune``, ``qat``, ``share``) shares."""
from __future__ import annotations

from typing import Any

from tasks.artifacts import pass_through, publish_training


def ctr_compression_stage(family: str, stage: str, doc: str, train: Any, summary: Any) -> None:
    """Stage ``<stage>_<family>``: its params logged, passed through when ``stage`` is not in ``recipe.<family>``,
    else ``train(cfg, args, on_epoch) -> (student, shape, history, metrics)`` and the outputs published;
    ``summary(metrics)`` is printed."""
    from tasks.config import stage_args
    from tasks.tracking import stage_run

    args, cfg = stage_args(doc, "--data", "--teacher", "--student", "--model", "--metrics", "--plots")
    name, recipe = f"{stage}_{family}", cfg.block("recipe", family)
    params = {f"{stage}.{family}": cfg.block(stage, family), f"distill.{family}": cfg.block("distill", family),
              f"recipe.{family}": recipe}
    with stage_run(name, cfg, params) as run:
        if stage not in recipe:
            pass_through(run, args, name)
            return
        student, shape, history, metrics = train(cfg, args, lambda epoch, m: run.log_metrics(m, step=epoch + 1))
        publish_training(run, student, "ctr", student.arch, history, metrics, args, shape=shape,
                         qat_form=student.qat_settings)
    print(summary(metrics))
