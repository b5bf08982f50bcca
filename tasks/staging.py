"""Atomic stage outputs: a stage writes each output into ``.staging/`` beside it, and every output moves into
place together only when the stage has finished without error.

A stage that fails or is killed therefore leaves its previous good outputs exactly as they were (dvc.yaml marks
the outputs ``persist`` so that DVC does not delete them before the run either), and no half-written file ever sits
where a later stage or ``dvc repro`` would take it as valid. Staged files keep their names, so what a stage logs to
MLflow from a staged path is named as the output.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from tasks.errors import PipelineError

STAGING = ".staging"
_ACTIVE: ContextVar[dict[Path, Path] | None] = ContextVar("staged_outputs", default=None)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def staged(final: Path) -> Path:
    """Where a stage writes ``final``: a fresh path in ``.staging/`` beside it inside ``atomic_outputs``, else
    ``final`` itself. Leftovers of an earlier, killed run are removed first."""
    outputs = _ACTIVE.get()
    if outputs is None:
        return final
    path = final.parent / STAGING / final.name
    _remove(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs[final] = path
    return path


def _commit(outputs: dict[Path, Path]) -> None:
    missing = [str(final) for final, path in outputs.items() if not path.exists()]
    if missing:
        raise PipelineError(f"the stage finished without writing {missing}; previous outputs kept")
    for final, path in outputs.items():
        if final.is_dir() and not final.is_symlink():  # a folder cannot be replaced in one step: swap, then drop
            old = path.with_name(path.name + ".old")
            _remove(old)
            os.replace(final, old)
            os.replace(path, final)
            shutil.rmtree(old)
        else:
            os.replace(path, final)
        _tidy(path.parent)


def _tidy(staging: Path) -> None:
    try:
        staging.rmdir()
    except OSError:  # not empty: another output of this folder is still staged
        pass


@contextmanager
def atomic_outputs() -> Iterator[None]:
    """Around a stage's main: the outputs given out by ``staged`` are moved into place on success, dropped on
    failure."""
    outputs: dict[Path, Path] = {}
    token = _ACTIVE.set(outputs)
    try:
        yield
    except BaseException:
        for path in outputs.values():
            _remove(path)
            _tidy(path.parent)
        raise
    else:
        _commit(outputs)
    finally:
        _ACTIVE.reset(token)
