"""The warm-start plan as the training stages read it (written by ``tasks.warm_start``): which weights a model starts
from — none, the champion's to fine-tune, or the champion's to reuse as they are — and the training knobs of a
fine-tuning run."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from tasks.family_config import FineTune, WarmStart

if TYPE_CHECKING:   # torch is imported where weights are read: flows.gating reads this module's names only
    import torch

PLAN, ARTIFACTS = "plan.json", "warm_start"   # ARTIFACTS: the registering run's folder of what the next run reads
FILES = {"teacher": "teacher.pt", "student": "student.pt"}
MODE = "warm_start"   # key of a model file: how its training started (scratch, fine_tune, reuse)
T = TypeVar("T", bound=BaseModel)


def read_plan(folder: Path) -> dict[str, Any]:
    return json.loads((folder / PLAN).read_text())


def warm_state(folder: Path, role: str, arch: BaseModel, shape: dict[str, Any]
               ) -> tuple[str, dict[str, torch.Tensor] | None]:
    """(how the plan trains ``role``, the weights it starts from: None from scratch). A champion's model of another
    architecture or data shape than this run's (params changed since it was trained) is not started from."""
    import torch

    plan = read_plan(folder)
    mode = plan[role]
    if mode not in ("fine_tune", "reuse"):
        return "scratch", None
    blob = torch.load(folder / FILES[role], map_location="cpu", weights_only=True)
    if not _same_arch(arch, blob.get("arch")) or blob.get("shape") != shape:
        print(f"note: the champion's {role} has another architecture or data shape than params and data give now; "
              f"the {role} trains from scratch", file=sys.stderr)
        return "scratch", None
    how = "the champion's, as it is" if mode == "reuse" else "fine-tuned from the champion's"
    print(f"{role}: {how} (version {plan['champion']})")
    return mode, blob["state_dict"]


def _same_arch(arch: BaseModel, recorded: Any) -> bool:
    from pydantic import ValidationError

    try:
        return type(arch).model_validate(recorded) == arch
    except ValidationError:   # a field since renamed or removed: another architecture
        return False


def fine_tuned(spec: T, tune: FineTune, epochs: int) -> T:
    """``spec`` (a stage's training knobs) for a warm-started run: ``epochs``, the peak LR times ``lr_scale``."""
    raw = spec.model_dump(by_alias=True)
    lr = spec.optimizer.lr * tune.lr_scale  # type: ignore[attr-defined]
    raw.update(epochs=epochs, optimizer={**raw["optimizer"], "lr": lr})
    return type(spec).model_validate(raw)


def start_from(warm: Path | None, role: str, model: torch.nn.Module, arch: BaseModel, shape: dict[str, Any],
               spec: T, policy: WarmStart | None) -> tuple[str, T]:
    """Load the weights the plan in ``warm`` starts ``role`` from into ``model``; return (scratch | fine_tune | reuse,
    the training knobs to train it with: ``spec``, or its fine-tuning form)."""
    if warm is None or policy is None:
        return "scratch", spec
    mode, state = warm_state(warm, role, arch, shape)
    if state is not None:
        model.load_state_dict(state)
    if mode == "fine_tune":
        tune = policy.fine_tune
        spec = fine_tuned(spec, tune, tune.teacher_epochs if role == "teacher" else tune.student_epochs)
    return mode, spec


def started_from(warm: Path | None) -> list[Path]:
    """The files of ``warm`` a training run's fingerprint covers (a checkpoint is not resumed across plans)."""
    return sorted(p for p in warm.iterdir() if p.is_file()) if warm is not None and warm.is_dir() else []


def warm_tags(warm: Path | None, role: str, mode: str) -> dict[str, str]:
    """MLflow tags of a training stage's run: how ``role`` started, and from which champion version."""
    champion = read_plan(warm).get("champion") if mode != "scratch" and warm is not None else None
    return {f"warm_start.{role}": mode, f"warm_start.{role}_champion": str(champion or "none")}
