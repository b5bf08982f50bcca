"""Stage ``share_vision``: QAT student -> weight-shared student (k centroids per layer), KD fine-tuned.

Deep Compression's order (prune -> quantize -> share): it runs after QAT, with fake quantization active and its
ranges and batch-norm statistics fixed, so what is fine-tuned is what deploys. Inputs: ``<data>``, ``<teacher>``,
``<student>``. Outputs: ``<model>``, ``<metrics>`` (test accuracy, float32 / index+codebook / Huffman bytes),
``<plots>``. Left out of ``recipe.vision``, it passes the student through.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.ao.nn.intrinsic.qat import freeze_bn_stats
from torch.ao.quantization import disable_observer

from tasks.artifacts import fingerprint, load_model, model_meta, pass_through, publish_training, training_inputs
from tasks.config import DistillVision, ShareVision, stage_args
from tasks.distillation import Distiller, distillation_loss, loss_config
from tasks.errors import run_cli
from tasks.quantization import QatModel, convert_int8
from tasks.training import Split, evaluate, fit, to_input
from tasks.vision_models import count_nonzero, count_parameters
from tasks.weight_sharing import bake, share_weights, storage_report


def fix_quantization(model: nn.Module) -> None:
    """Keep QAT's learned ranges and folded batch-norm statistics while the centroids move."""
    model.apply(disable_observer)
    model.apply(freeze_bn_stats)


def share_vision(cfg: ShareVision, kd: DistillVision, distill: bool, data_dir: Path, teacher_path: Path,
                 student_path: Path, checkpoint: Path, on_epoch: Callable[[int, dict[str, float]], None] | None = None
                 ) -> tuple[nn.Module, list[dict[str, float]], dict[str, float]]:
    """Cluster every layer's weights and fine-tune the centroids; return (model, history, metrics)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.backends.quantized.engine = "x86"
    train, val, test = (Split.load(data_dir, s) for s in ("train", "val", "test"))
    teacher, model = load_model(teacher_path), load_model(student_path)
    layers = share_weights(model, cfg.clusters)
    loss = loss_config(kd, distill, cfg.label_smoothing)
    distiller = Distiller(model, teacher, loss, to_input(train.x[:2]))
    inputs = training_inputs(data_dir, teacher_path, student_path)
    history = fit(distiller, train, val, cfg, checkpoint, fingerprint([cfg, loss], inputs), on_epoch,
                  distillation_loss, before_epoch=lambda _epoch: fix_quantization(model))
    codes = bake(model)
    metrics = {"test_accuracy": evaluate(model, test, cfg.eval_batch_size)["accuracy"], "shared_layers": layers,
               "clusters": cfg.clusters, "parameters": count_parameters(model),
               "nonzero_parameters": count_nonzero(model), **storage_report(model, codes)}
    if isinstance(model, QatModel):
        metrics["test_accuracy_int8"] = evaluate(convert_int8(model), test, cfg.eval_batch_size)["accuracy"]
    return model.eval(), history, metrics


def main() -> None:
    args, cfg = stage_args(__doc__, "--data", "--teacher", "--student", "--checkpoint", "--model", "--metrics", "--plots")
    share, kd, recipe = cfg.share.vision, cfg.distill.vision, cfg.recipe.vision
    from tasks.tracking import stage_run

    with stage_run("share_vision", cfg, {"share.vision": share, "recipe.vision": recipe}) as run:
        if "share" not in recipe:
            pass_through(run, args, "share_vision")
            return
        model, history, metrics = share_vision(share, kd, "distill" in recipe, args.data, args.teacher,
                                               args.student, args.checkpoint,
                                               lambda epoch, m: run.log_metrics(m, step=epoch + 1))
        meta = model_meta(args.student)
        kind, arch = meta.pop("kind"), meta.pop("arch")
        # what rebuilding the input needed (a QAT student's bits and float modules) the output needs too
        publish_training(run, model, kind, arch, history, metrics, args, **meta)
    print(f"weight-shared student ({share.clusters} clusters/layer): test accuracy {metrics['test_accuracy']:.4f}; "
          f"{metrics['float32_bytes']:,.0f} B float32 -> {metrics['index_codebook_bytes']:,.0f} B index+codebook "
          f"-> {metrics['huffman_bytes']:,.0f} B Huffman")


if __name__ == "__main__":
    run_cli(main)
