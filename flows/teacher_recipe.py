"""Benchmark: an image family's teacher recipe arms on one schedule, to be chosen on validation accuracy.

Trains ``teacher.<family>`` on its processed data (``--data``, by default what its teacher stage reads: run ``dvc
repro prepare_<family>`` first) for ``--epochs`` epochs per arm: ``params`` (the recipe as params give it) and
``erasing`` (plus random erasing with probability ``--erasing``). Each arm keeps a moving average of its weights
(``--ema``, a decay) beside the live ones, which its checkpoint holds, so one training run scores both. Every model
is scored on validation plain and with flip test-time averaging (``arch.flip_average``; only for a family whose
augmentation flips images: a mirror must keep the label), the test accuracy printed beside it for reference only —
a choice reads the validation column. Arms resume from their checkpoints under ``--work`` (the seconds column
is this invocation's: a finished arm resumed takes none). Prints a markdown table;
``--out`` writes JSON too.

    python -m flows.teacher_recipe --family vision --epochs 10 [--arm params --arm erasing] [--threads 1]
        [--out recipe.json]
"""
from __future__ import annotations

import argparse
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from flows.benchmark import machine, write_result
from flows.stage_graph import stage_paths
from tasks.config import load_config
from tasks.errors import ConfigError, run_cli
from tasks.image_training import Split, evaluate
from tasks.images.config import TrainTeacherImages
from tasks.images.models import ResNetTeacher
from tasks.images.train_teacher import train_teacher_images

ARMS = ("params", "erasing")


def arm_recipe(teacher: TrainTeacherImages, arm: str, epochs: int, erasing: float, ema: float) -> TrainTeacherImages:
    """``teacher`` for ``epochs`` with a moving average of decay ``ema``, and for ``erasing`` random erasing; checked
    as params.yaml's recipes are (a ConfigError naming the flags)."""
    augmentation = teacher.augmentation.model_dump()
    if arm == "erasing":
        augmentation["erasing"] = {"probability": erasing}
    try:
        return TrainTeacherImages.model_validate({**teacher.model_dump(), "epochs": epochs, "ema": {"decay": ema},
                                                  "augmentation": augmentation})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"--epochs {epochs} --ema {ema} --erasing {erasing}: {problems}") from None


def score_arm(cfg: TrainTeacherImages, data: Path, checkpoint: Path) -> dict[str, Any]:
    """Train (or resume) one arm; validation and test accuracy of its live and averaged weights, each plain and
    with flip test-time averaging where the recipe flips images."""
    start = time.perf_counter()
    averaged, history, _, _ = train_teacher_images(cfg, data, checkpoint)
    seconds = time.perf_counter() - start
    val, test = Split.load(data, "val"), Split.load(data, "test")
    live = ResNetTeacher(cfg.arch, **val.model_shape())
    live.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    scores = {}
    for weights, model in (("live", live), ("moving average", averaged)):
        for tta in (False, True) if cfg.augmentation.horizontal_flip else (False,):
            model.flip_average = tta
            scores[(weights, tta)] = {split: evaluate(model, data_split, cfg.eval_batch_size)["accuracy"]
                                      for split, data_split in (("val", val), ("test", test))}
    return {"seconds": seconds, "history": history, "scores": scores}


def table(results: dict[str, dict[str, Any]], family: str, epochs: int, threads: int) -> str:
    lines = [f"Teacher recipe arms ({family}), {date.today()}, {machine()}; {epochs} epochs, {threads} thread(s)",
             "", "| arm | weights | flip TTA | val accuracy | test accuracy (reference) | s (this run) |",
             "|---|---|---|---:|---:|---:|"]
    for arm, result in results.items():
        for (weights, tta), acc in result["scores"].items():
            lines.append(f"| {arm} | {weights} | {'yes' if tta else 'no'} | {acc['val']:.4f} | {acc['test']:.4f} | "
                         f"{result['seconds']:.0f} |")
    best_arm, (weights, tta) = max(((a, k) for a, r in results.items() for k in r["scores"]),
                                   key=lambda ak: results[ak[0]]["scores"][ak[1]]["val"])
    lines += ["", f"best on validation: {best_arm}, {weights} weights, flip TTA {'on' if tta else 'off'}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, help="an image family of params.yaml")
    parser.add_argument("--epochs", type=int, required=True, help="the schedule of every arm")
    parser.add_argument("--arm", action="append", choices=ARMS, help="repeatable; default: every arm")
    parser.add_argument("--erasing", type=float, default=0.5, help="random erasing's probability (arm erasing)")
    parser.add_argument("--ema", type=float, default=0.998, help="the moving average's decay per step")
    parser.add_argument("--threads", type=int, help="torch threads (default: teacher.<family>.threads)")
    parser.add_argument("--data", type=Path, help="its processed data (default: what train_teacher_<family> reads)")
    parser.add_argument("--work", type=Path, default=Path("reports/teacher_recipe/work"), help="checkpoints")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args()
    cfg = load_config(args.params)
    teacher = cfg.block("teacher", args.family) if args.family in cfg.families else None
    if not isinstance(teacher, TrainTeacherImages):
        raise ConfigError(f"{args.params}: --family {args.family} is no image family (families: "
                          f"{', '.join(cfg.families)})")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: at least 1 (or leave it out: teacher.{args.family}.threads)")
        teacher = teacher.model_copy(update={"threads": args.threads})
    data = args.data or args.params.parent / stage_paths(args.params.parent, f"train_teacher_{args.family}")["data"]
    # every arm's recipe checked before any trains: a bad flag is refused at once, not after the first arm trained
    recipes = {arm: arm_recipe(teacher, arm, args.epochs, args.erasing, args.ema) for arm in args.arm or ARMS}
    results = {arm: score_arm(recipe, data, args.work / args.family / arm / "last.pt")
               for arm, recipe in recipes.items()}
    print(table(results, args.family, args.epochs, teacher.threads))
    if args.out:
        write_result(args.out, {"family": args.family, "epochs": args.epochs, "ema": args.ema,
                                "erasing": args.erasing, "arms": {
                                    arm: {"seconds": r["seconds"], "history": r["history"],
                                          "scores": [{"weights": w, "flip_tta": t, **acc}
                                                     for (w, t), acc in r["scores"].items()]}
                                    for arm, r in results.items()}})


if __name__ == "__main__":
    run_cli(main)
