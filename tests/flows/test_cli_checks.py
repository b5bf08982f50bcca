"""Benchmark commands refuse a bad flag or a missing input in one line before the work starts (a replay or a
teacher arm takes tens of minutes), not after the first part of it."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from flows.benchmark import PROJECT_RUN_ENV
from tasks.errors import ConfigError, PipelineError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.fault("params", "the replay benchmark given a policy twice, fewer than one batch, or a --keep folder "
                   "an earlier replay worked in",
                   "one line naming the flag, exit 2, before any replay (before: a repeated policy refused after the "
                   "first policy's ~40-minute replay, --batches 0 replayed nothing and -2 all but the last two, a "
                   "re-used --keep a FileExistsError traceback)")
@pytest.mark.parametrize(("flags", "refused"), [
    (["--policy", "scratch", "--policy", "fine_tune", "--policy", "scratch,teacher_every=1"],
     r"^--policy scratch: given twice"),
    (["--batches", "0"], r"^--batches 0: replay at least 1 batch"),
    (["--batches", "-2"], r"^--batches -2: replay at least 1 batch"),
    (["--keep", "{keep}"], r"^--keep .*/keep: not a new folder"),
], ids=["policy-twice", "no-batch", "negative-batches", "keep-reused"])
def test_the_replay_benchmark_refuses_bad_flags_before_replaying(flags, refused, tmp_path, monkeypatch):
    """Before: a repeated policy refused after the first one replayed, --batches 0 or -2 taken as a slice, a
    re-used --keep a FileExistsError traceback: each after a replay started."""
    from flows import replay_benchmark

    for name in PROJECT_RUN_ENV:   # restored afterwards: the command drops them from its environment
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "keep" / "policy-0").mkdir(parents=True)
    monkeypatch.setattr(replay_benchmark, "replay_benchmark", lambda *a, **k: pytest.fail("replayed before checking"))
    monkeypatch.setattr(sys, "argv", ["replay_benchmark", "--family", "recsys",
                                      *(f.format(keep=tmp_path / "keep") for f in flags)])
    with pytest.raises(PipelineError, match=refused):
        replay_benchmark.main()


@pytest.mark.fault("params", "the teacher recipe benchmark given an out-of-range --erasing or --threads 0",
                   "a ConfigError naming the flag before any arm trains (before: --erasing refused only after the "
                   "first arm trained, --threads 0 silently the default)")
@pytest.mark.parametrize(("flags", "refused"), [
    (["--erasing", "1.5"], r"^--epochs 1 --ema 0\.998 --erasing 1\.5: augmentation\.erasing\.probability"),
    (["--threads", "0"], r"^--threads 0: at least 1"),
], ids=["erasing", "threads"])
def test_the_teacher_recipe_refuses_bad_flags_before_any_arm_trains(flags, refused, tmp_path, monkeypatch):
    """Before: the erasing arm's recipe was built after the params arm trained; --threads 0 meant the default."""
    from flows import teacher_recipe

    monkeypatch.setattr(teacher_recipe, "score_arm", lambda *a: pytest.fail("an arm trained before every was checked"))
    monkeypatch.setattr(sys, "argv", ["teacher_recipe", "--family", "vision", "--epochs", "1", *flags,
                                      "--params", str(ROOT / "params.yaml"), "--work", str(tmp_path)])
    with pytest.raises(ConfigError, match=refused):
        teacher_recipe.main()


@pytest.mark.fault("data", "the speed-up benchmark run before the family's export (no ONNX files, no data)",
                   "one line naming the missing files and `dvc repro export_<family>` (before: a FileNotFoundError "
                   "traceback from the recommender's catalog)")
def test_the_speedup_benchmark_names_missing_exported_files(tmp_path):
    """Before: the recommender's catalog read users.npy first, a FileNotFoundError traceback."""
    from flows.speedup_benchmark import measure

    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    with pytest.raises(PipelineError, match=rf"^{tmp_path}/models/recsys/onnx/student_int8\.onnx, .*"
                                            rf"{tmp_path}/data/recsys/processed: no such file or folder; make them "
                                            r"with `dvc repro export_recsys`$"):
        measure(tmp_path, "recsys", 1)
