"""Stage ``train_teacher_text``: processed sentences -> the text teacher: a pretrained encoder
(``teacher.text.encoder``, e.g. all-MiniLM-L6-v2) fine-tuned with a new classification head, or a Transformer
trained from scratch on the data's own word vocabulary (``teacher.text.arch``).

Inputs: ``<data>`` (prepare_text's folder; the validation report, so it runs only on validated data).
Outputs: ``<model>`` (``{"kind", "arch", "shape", "state_dict"}``, its tokenizer's vocabulary in ``shape``;
loadable with ``weights_only=True``), ``<metrics>`` (validation and test accuracy, parameters), ``<plots>``
(per-epoch CSV). The best epoch by validation accuracy is kept.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tasks.artifacts import count_parameters, publish_training
from tasks.config import stage_args
from tasks.errors import run_cli
from tasks.text.config import TrainTeacherText
from tasks.text.models import TextTransformer
from tasks.text.training import (
    Encoded,
    TextSplit,
    TrainingRows,
    evaluate_text,
    fit_text,
    label_loss,
    manifest,
    student_shape,
)


def split_metrics(model: nn.Module, data_dir: Path, batch_size: int) -> dict[str, float]:
    """``val_accuracy``, ``val_loss``, ``test_accuracy``, ``test_loss`` and the parameter count of ``model``."""
    metrics = {f"{name}_{k}": v for name in ("val", "test")
               for k, v in evaluate_text(model, TextSplit.load(data_dir, name), batch_size).items()}
    return {**metrics, "parameters": count_parameters(model)}


def build_teacher(cfg: TrainTeacherText, data_dir: Path) -> tuple[nn.Module, str, dict, str]:
    """(untrained model, its kind, its ``shape`` for the model file, where its weights came from)."""
    if cfg.encoder is not None:
        from tasks.text.encoder import pretrained_classifier

        model, source = pretrained_classifier(cfg.encoder, len(manifest(data_dir)["labels"]), cfg.seed)
        shape = {"vocabulary": model.tokenizer.vocabulary, "max_tokens": cfg.encoder.max_tokens,
                 "classes": model.head.out_features}
        return model, "text_bert", shape, f"{cfg.encoder.name} from {source}"
    shape = student_shape(data_dir)
    return TextTransformer(cfg.arch, **shape), "text_transformer", shape, "trained from scratch"


def train_teacher_text(cfg: TrainTeacherText, data_dir: Path,
                       on_epoch: Callable[[int, dict[str, float]], None] | None = None
                       ) -> tuple[nn.Module, str, dict, list[dict[str, float]], dict[str, float], str]:
    """Train (or fine-tune) the teacher on train, select its epoch on val; return (model, kind, shape, history,
    metrics, origin)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, kind, shape, origin = build_teacher(cfg, data_dir)
    train = TextSplit.load(data_dir, "train")
    rows = TrainingRows(train, Encoded.of(model, train.texts))
    history = fit_text(model, label_loss, rows, TextSplit.load(data_dir, "val"), cfg, on_epoch, cfg.bf16)
    return model, kind, shape, history, split_metrics(model, data_dir, cfg.eval_batch_size), origin


def main() -> None:
    args, cfg = stage_args(__doc__, "--data", "--model", "--metrics", "--plots")
    teacher = cfg.teacher.text
    from tasks.tracking import stage_run

    with stage_run("train_teacher_text", cfg, {"teacher.text": teacher}) as run:
        model, kind, shape, history, metrics, origin = train_teacher_text(
            teacher, args.data, lambda epoch, m: run.log_metrics(m, step=epoch + 1))
        run.set_tag("teacher.origin", origin)
        publish_training(run, model, kind, model.arch, history, metrics, args, shape=shape)
    print(f"teacher ({origin}) accuracy val {metrics['val_accuracy']:.4f}, test {metrics['test_accuracy']:.4f} "
          f"({metrics['parameters']:,} parameters)")


if __name__ == "__main__":
    run_cli(main)
