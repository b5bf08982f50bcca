"""Model files and training records shared by the training stages.

A model file is ``{"kind", "arch", "state_dict"}`` written atomically with ``torch.save`` and read back with
``weights_only=True``: plain tensors and primitives, never pickled code.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import io
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel
from torch import nn

from tasks.config_types import ModelArch
from tasks.errors import CheckpointError
from tasks.io import file_digest, write_atomic, write_json

if TYPE_CHECKING:
    from tasks.images.config import QatImages

PROJECT = "tasks."   # a model file names its architecture class; only this project's code is imported for it


def arch_class(blob: dict[str, Any], path: Path) -> type[ModelArch]:
    """The architecture class a model file names (``arch_class``, ``"<module>:<class>"``). Imported when a file of it
    is loaded, with the model class it names, so a stage depends on (and DVC re-runs it for) its own family's code
    only; anything but a ``ModelArch`` of this project is refused."""
    where = blob.get("arch_class")
    if not isinstance(where, str) or where.count(":") != 1 or not where.startswith(PROJECT):
        raise CheckpointError(f"{path}: a model file of an older format or of another program (arch_class "
                              f"{where!r}); re-run the stage that writes it")
    module, name = where.split(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise CheckpointError(f"{path}: its architecture {where} is not in this code ({err}); re-run the stage that "
                              "writes it") from err
    if not (isinstance(cls, type) and issubclass(cls, ModelArch) and isinstance(getattr(cls, "MODEL", None), str)):
        raise CheckpointError(f"{path}: {where} is no model architecture; re-run the stage that writes it")
    return cls


def _class(where: str) -> Any:
    module, name = where.split(":")
    return getattr(importlib.import_module(module), name)


def count_parameters(model: nn.Module) -> int:
    if hasattr(model, "counts"):   # an ONNX teacher: its weights are the graph's, not torch parameters
        return model.counts()["parameters"]
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    if hasattr(model, "counts"):
        return model.counts()["nonzero"]
    return sum(int((p != 0).sum()) for p in model.parameters())


def save_model(model: nn.Module, kind: str, arch: ModelArch, path: Path, **extra: Any) -> None:
    """``kind`` names the model in messages; ``arch``'s class (its ``MODEL``) says what ``load_model`` builds.
    ``extra`` holds what rebuilding needs beyond the architecture: ``shape``, the constructor's arguments for
    the data (an image model's classes and input shape: ``Split.model_shape``; a CTR model's table sizes),
    ``channels`` for a structurally pruned model (``tasks.channel_pruning.channel_widths``: its layers are narrower
    than ``arch`` builds them), ``activation_bits`` and ``float_modules`` for FX QAT (see ``qat_extra``), or
    ``qat_form``: the settings of the model's own QAT form (its ``qat_form(**settings)`` rebuilds it)."""
    buffer = io.BytesIO()
    torch.save({"kind": kind, "arch_class": f"{type(arch).__module__}:{type(arch).__qualname__}",
                "arch": arch.model_dump(), "state_dict": model.state_dict(), **extra}, buffer)
    write_atomic(path, buffer.getvalue())


def qat_extra(cfg: QatImages) -> dict[str, Any]:
    """What rebuilding a student trained with ``cfg`` needs beyond its architecture."""
    return {"activation_bits": cfg.activation_bits, "weight_bits": cfg.weight_bits,
            "float_modules": list(cfg.float_modules)}


def derived_extra(meta: dict[str, Any]) -> dict[str, Any]:
    """What a model trained from a model file (``meta``: its ``model_meta``; a QAT student of a pruned one) records
    to be rebuilt like it: the layer widths of a structurally pruned model."""
    return {"channels": meta["channels"]} if meta.get("channels") else {}


def _read(path: Path) -> dict[str, Any]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        blob["kind"], blob["arch"], blob["state_dict"]
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path}: not a model file of this pipeline ({err}); re-run the stage that writes it") from err
    return blob


def model_meta(path: Path) -> dict[str, Any]:
    """A model file's description without its weights: ``kind``, ``arch`` (validated) and any extras."""
    blob = _read(path)
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    meta["arch"] = arch_class(blob, path).model_validate(blob["arch"])
    return meta


def load_model(path: Path) -> nn.Module:
    """Rebuild a model saved by ``save_model``, in eval mode."""
    blob = _read(path)
    arch_cls = arch_class(blob, path)
    model_cls = _class(arch_cls.MODEL)
    if "onnx" in blob:
        return model_cls(arch_cls.model_validate(blob["arch"]), blob["onnx"].numpy().tobytes()).eval()
    model = model_cls(arch_cls.model_validate(blob["arch"]), **blob.get("shape", {}))
    if blob.get("channels"):   # structurally pruned: narrower layers than its architecture builds
        from tasks.layer_widths import conform

        try:
            conform(model, blob["channels"])
        except ValueError as err:
            raise CheckpointError(f"{path}: its layer widths do not fit the {blob['kind']} it describes ({err}); "
                                  "re-run the stage that writes it") from err
    if blob.get("activation_bits"):  # a QAT student: rebuild the same fake-quantized graph, then load into it
        prepare_qat = importlib.import_module("tasks.quantization").prepare_qat
        model = prepare_qat(model, blob["activation_bits"], torch.zeros(1, *model.input_shape),
                            blob.get("float_modules", []), blob.get("weight_bits", 8))
    elif blob.get("qat_form"):  # a model with a QAT form of its own (not FX's): its class rebuilds it
        if not (isinstance(blob["qat_form"], dict) and hasattr(model, "qat_form")):
            raise CheckpointError(f"{path}: a QAT form its {blob['kind']} has no way to rebuild; re-run the stage "
                                  "that writes it")
        model = model.qat_form(**blob["qat_form"])
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as err:   # weights of another shape than the file's own architecture and data shape say
        first = str(err).splitlines()[1:2] or [str(err)[:200]]
        raise CheckpointError(f"{path}: its weights do not fit the {blob['kind']} it describes ({first[0].strip()}); "
                              "re-run the stage that writes it") from err
    return model.eval()


def code_digest(package: Path | None = None) -> str:
    """SHA-256 over the Python files of ``package`` (the project's ``tasks``), names and bytes; hidden files (an
    editor's lock file ``.#x.py``) and what is no regular file are left out. All of them, not the modules a stage
    happens to have imported yet: that set depends on what ran before in the process (the ablation trains its arms
    in one), and a checkpoint of the same code must always find itself again. An edit anywhere in ``tasks/`` therefore
    restarts an interrupted training."""
    root = package or Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root)
        if any(part.startswith(".") for part in name.parts) or not path.is_file():
            continue
        try:
            digest.update(name.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
        except FileNotFoundError:   # gone since it was listed (a checkout under way): not code any more
            continue
    return digest.hexdigest()


def fingerprint(configs: list[BaseModel], inputs: list[Path]) -> str:
    """What a checkpoint must have been trained with to be resumed: these configs, these exact input files and the
    same code (``code_digest``: DVC re-runs a stage whose code changed, and a finished checkpoint resumed then would
    hand back the old code's weights as the new run's).
    Knobs at their defaults are left out, so a knob added later (whose default trains as before) keeps checkpoints
    resumable, and so is the device (a checkpoint resumes on another one)."""
    digest = hashlib.sha256(code_digest().encode())
    for cfg in configs:
        digest.update(cfg.model_dump_json(exclude_defaults=True, exclude={"device"}).encode())
    for path in inputs:
        digest.update(file_digest(path).encode())
    return digest.hexdigest()


def training_inputs(data_dir: Path, *models: Path) -> list[Path]:
    """The files an image training run depends on, for its checkpoint fingerprint: upstream models, the train/val
    arrays and the manifest (its pixel statistics normalise every input)."""
    return [*models, *(data_dir / f"{name}.npy" for name in ("train_x", "train_y", "val_x", "val_y")),
            data_dir / "manifest.json"]


def history_csv(history: list[dict[str, float]]) -> str:
    if not history:   # nothing trained (an imported teacher): DVC still gets its plots file
        return "epoch\n"
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["epoch", *history[0]])
    writer.writeheader()
    writer.writerows({"epoch": i + 1, **row} for i, row in enumerate(history))
    return out.getvalue()


def logged_metrics(history: list[dict[str, float]], metrics: dict[str, float]) -> dict[str, float]:
    """What a training stage logs to MLflow without a step: ``metrics``, a score named like a per-epoch curve
    (``val_accuracy``) as ``best_<name>``, and the kept weights' ``best_epoch`` and ``best_val_*``
    (``tasks.training.History``). MLflow's run value of a metric is its highest step's: the curve's own name would
    show the last epoch, or, logged again at step 0, put a bogus first point on the curve."""
    curves = set(history[0]) if history else set()
    kept_epoch = getattr(history, "kept_epoch", None) if history else None
    best = {} if kept_epoch is None else {"best_epoch": kept_epoch,
                                          **{f"best_{k}": v for k, v in history.kept.items()}}
    return best | {f"best_{k}" if k in curves else k: v for k, v in metrics.items()}


def publish_training(run: Any, model: nn.Module, kind: str, arch: ModelArch, history: list[dict[str, float]],
                     metrics: dict[str, float], paths: argparse.Namespace, **extra: Any) -> None:
    """Write a training stage's outputs (``paths.model``, ``.metrics``, ``.plots``) and log them to ``run``."""
    save_model(model, kind, arch, paths.model, **extra)
    write_json(paths.metrics, metrics)
    write_atomic(paths.plots, history_csv(history).encode())
    run.log_metrics(logged_metrics(history, metrics))
    if history and getattr(history, "kept_epoch", None) == 0:   # a warm start's weights that no epoch beat
        run.set_tag("training.kept", "start")
    run.log_text(f"{model}\n\nparameters: {metrics['parameters']:,}\n", "model_summary.txt")
    for path in (paths.model, paths.metrics, paths.plots):
        run.log_artifact(path)
    from tasks.figures import learning_curves

    if (figure := learning_curves(history, f"{Path(paths.model).stem}: train vs validation")) is not None:
        run.log_figure(figure, "learning_curves.png")


def empty_checkpoint(paths: argparse.Namespace) -> None:
    """A stage that trained nothing creates its checkpoint folder (a DVC output) empty: DVC fails a stage whose
    declared output is missing."""
    if getattr(paths, "checkpoint", None) is not None:
        paths.checkpoint.parent.mkdir(parents=True, exist_ok=True)


def pass_through(run: Any, paths: argparse.Namespace, stage: str) -> None:
    """A compression stage left out of the recipe: its output is its input, so the graph stays coherent (its
    checkpoint folder, if it has one, created empty)."""
    try:
        student = paths.student.read_bytes()
    except OSError as err:   # (a stage run before the one that writes its input: one line, not a traceback)
        raise CheckpointError(f"{paths.student}: cannot be read ({err.strerror or err}); re-run the stage that "
                              "writes it") from err
    write_atomic(paths.model, student)
    empty_checkpoint(paths)
    write_json(paths.metrics, {"pass_through": 1})
    write_atomic(paths.plots, b"epoch\n")
    run.set_tag("stage.pass_through", "true")
    print(f"{stage}: not in the family's recipe, the student is passed through unchanged")
