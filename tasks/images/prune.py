"""Stage ``prune_<family>``: distilled student -> pruned student, fine-tuned with the KD loss between steps.

Inputs: ``<data>`` splits, ``<teacher>``, ``<student>``. Outputs: ``<model>`` (unstructured: same shape with
zeros; structured: a rebuilt, physically narrower student), ``<metrics>`` (test accuracy, parameters, non-zero
parameters, per-layer sparsity), ``<plots>``. Left out of ``recipe.<family>``, it passes the student through.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.artifacts import (
    count_nonzero,
    count_parameters,
    fingerprint,
    load_model,
    model_meta,
    pass_through,
    publish_training,
    training_inputs,
)
from tasks.channel_pruning import ChannelGroups, channel_groups, prune_channels, shrink
from tasks.config import stage_args
from tasks.distillation import Distiller, distillation_loss, loss_config
from tasks.image_training import Split, evaluate, fit, model_shape
from tasks.images.arch_config import MobileArch
from tasks.images.config import DistillImages, PruneImages
from tasks.layer_widths import channel_widths
from tasks.pruning import attach_masks, bake, prune_unstructured, sparsity_report


def pruning_schedule(student: nn.Module, cfg: PruneImages, groups: ChannelGroups | None = None
                     ) -> Callable[[int], None]:
    """``before_epoch`` hook: at every ``epochs_per_step``-th epoch, prune to the next target of the cubic ramp
    (structured: the channels of ``groups``, ``tasks.channel_pruning.channel_groups`` of the student)."""

    def before_epoch(epoch: int) -> None:
        step = epoch // cfg.epochs_per_step + 1
        if epoch % cfg.epochs_per_step or step > cfg.steps:
            return
        sparsity = cfg.sparsity_after(step)
        if cfg.mode == "structured":
            prune_channels(groups, sparsity, cfg.min_channels)
        else:
            prune_unstructured(student, sparsity, cfg.scope)

    return before_epoch


def pruned_extra(model: nn.Module, cfg: PruneImages) -> dict[str, Any]:
    """What a pruned student's model file records beyond its architecture: a structurally pruned one's layer widths
    (it is narrower than its architecture builds it)."""
    return {"channels": channel_widths(model)} if cfg.mode == "structured" else {}


def prune_images(cfg: PruneImages, kd: DistillImages, distill: bool, data_dir: Path, teacher_path: Path,
                 student_path: Path, checkpoint: Path, on_epoch: Callable[[int, dict[str, float]], None] | None = None
                 ) -> tuple[nn.Module, MobileArch, list[dict[str, float]], dict[str, float]]:
    """Prune gradually with fine-tuning; return (pruned student, its architecture, history, metrics). A structurally
    pruned student is narrower than its architecture builds it: save it with ``pruned_extra``."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train, val, test = (Split.load(data_dir, s) for s in ("train", "val", "test"))
    teacher, student = load_model(teacher_path), load_model(student_path)
    attach_masks(student)
    example = train.inputs(slice(1))
    groups = channel_groups(student, example) if cfg.mode == "structured" else None
    loss = loss_config(kd, distill, cfg.label_smoothing)
    distiller = Distiller(student, teacher, loss, train.inputs(slice(2)))
    inputs = training_inputs(data_dir, teacher_path, student_path)
    before = count_parameters(student)
    layer_weights = {name: m.weight.numel() for name, m in student.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    history = fit(distiller, train, val, cfg, checkpoint, fingerprint([cfg, loss], inputs), on_epoch, distillation_loss,
                  before_epoch=pruning_schedule(student, cfg, groups))
    arch = model_meta(student_path)["arch"]
    model = shrink(student.eval(), example) if cfg.mode == "structured" else bake(student)
    sparsity = sparsity_report(model)  # of the model that ships: a structured one is narrower, not sparser
    metrics = {f"test_{k}": v for k, v in evaluate(model, test, cfg.eval_batch_size).items()}
    metrics.update({"parameters": count_parameters(model), "parameters_before": before,
                    "sparsity": sparsity["overall"], "nonzero_parameters": count_nonzero(model)})
    metrics.update({f"sparsity.{layer}": value for layer, value in sparsity.items() if layer != "overall"})
    # per layer, the weights the shipped model keeps: fewer channels (structured) or fewer non-zero (unstructured)
    kept = {name: float((m.weight != 0).sum()) / layer_weights[name] for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear)}
    metrics.update({f"kept.{layer}": value for layer, value in kept.items()})
    return model, arch, history, metrics


def main(family: str) -> None:
    args, cfg = stage_args(__doc__, "--data", "--teacher", "--student", "--checkpoint", "--model", "--metrics", "--plots")
    prune, recipe = cfg.block("prune", family), cfg.block("recipe", family)
    kd = cfg.block("distill", family).resolved(prune.device)   # the teacher beside this stage's student
    from tasks.tracking import stage_run

    # the distillation loss it trains with (the teacher's runtime resolved), as QAT logs it
    with stage_run(f"prune_{family}", cfg, {f"prune.{family}": prune, f"recipe.{family}": recipe,
                                         f"distill.{family}": kd}) as run:
        if "prune" not in recipe:
            pass_through(run, args, f"prune_{family}")
            return
        model, arch, history, metrics = prune_images(prune, kd, "distill" in recipe, args.data, args.teacher,
                                                     args.student, args.checkpoint,
                                                     lambda epoch, m: run.log_metrics(m, step=epoch + 1))
        publish_training(run, model, "mobile_student", arch, history, metrics, args, shape=model_shape(args.data),
                         **pruned_extra(model, prune))
        from tasks.figures import weights_kept

        kept = {k.removeprefix("kept."): v for k, v in metrics.items() if k.startswith("kept.")}
        run.log_figure(weights_kept(kept, f"{prune.mode} pruning: {metrics['parameters_before']:,} -> "
                                          f"{metrics['nonzero_parameters']:,} weights"), "weights_kept.png")
    print(f"pruned student test accuracy {metrics['test_accuracy']:.4f}: {metrics['parameters_before']:,} -> "
          f"{metrics['parameters']:,} parameters, {metrics['nonzero_parameters']:,} non-zero "
          f"(sparsity {metrics['sparsity']:.2f}, {prune.mode})")

