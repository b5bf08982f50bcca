"""Atomic stage outputs: a stage writes each output into ``.staging/`` beside it, and every output moves into
place together only when the stage has finished without error.

A stage that fails or is killed therefore leaves its previous good outputs exactly as they were (dvc.yaml marks
the outputs ``persist`` so that DVC does not delete them before the run either), and no half-written file ever sits
where a later stage or ``dvc repro`` would take it as valid. Staged files keep their names, so what a stage logs to
MLflow from a staged path is named as the output.

The moves into place are one commit: before the first move, the planned moves are recorded in a manifest
(``./.staging/commit-<hash>.json``, relative to the working directory, the project root), deleted after the last.
A manifest left by a stage killed in between is rolled forward when the next stage starts: every output is staged
complete before the manifest is written, so the new outputs are the ones to keep, and a mix of old and new outputs
(or a folder missing in the middle of its swap) is never seen by a stage.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from tasks.errors import PipelineError

STAGING = ".staging"
_ACTIVE: ContextVar[dict[Path, Path] | None] = ContextVar("staged_outputs", default=None)
_AFTER: ContextVar[list[Callable[[bool], None]] | None] = ContextVar("after_commit", default=None)


def after_commit(done: Callable[[bool], None]) -> bool:
    """Call ``done(True)`` once the stage's outputs are in place, ``done(False)`` when they could not be put there
    (the stage fails); False, calling nothing, when no ``atomic_outputs`` is active (the caller does it now)."""
    waiting = _AFTER.get()
    if waiting is None:
        return False
    waiting.append(done)
    return True


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


def _move(final: Path, path: Path) -> None:
    """Move staged ``path`` to ``final``. Idempotent, so that a commit killed at any step is finished by calling it
    again: whatever is already in place is left, and the old folder of a swap is dropped."""
    old = path.with_name(path.name + ".old")
    if path.exists() or path.is_symlink():
        if final.is_dir() and not final.is_symlink():  # a folder cannot be replaced in one step: swap, then drop
            _remove(old)
            os.replace(final, old)
        os.replace(path, final)
    _remove(old)


def _sync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (they survive a kill anyway; this is for a power loss)."""
    if not folder.is_dir():  # a staging folder another commit's tidy-up already removed: nothing left to sync
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish(manifest: Path, moves: dict[Path, Path]) -> None:
    """Do the recorded moves, make them durable, then drop the manifest and the emptied staging folders."""
    for final, path in moves.items():
        _move(final, path)
    for folder in {final.parent for final in moves} | {path.parent for path in moves.values()}:
        _sync_dir(folder)
    manifest.unlink()
    for path in moves.values():
        _tidy(path.parent)
    _tidy(manifest.parent)


def _commit(outputs: dict[Path, Path]) -> None:
    missing = [str(final) for final, path in outputs.items() if not path.exists()]
    if missing:
        raise PipelineError(f"the stage finished without writing {missing}; previous outputs kept")
    if not outputs:
        return
    key = hashlib.sha256("\n".join(sorted(map(str, outputs))).encode()).hexdigest()
    manifest = Path(STAGING) / f"commit-{key}.json"
    tmp = manifest.with_suffix(".tmp")
    with _create(tmp) as fh:
        # held until the moves are done (the kernel drops it if we are killed): recovery skips a live commit
        fcntl.flock(fh, fcntl.LOCK_EX)
        json.dump({str(final): str(path) for final, path in outputs.items()}, fh)
        fh.flush()
        os.fsync(fh.fileno())
        os.replace(tmp, manifest)  # written whole or not at all: a kill before this leaves the old outputs
        _sync_dir(manifest.parent)
        _finish(manifest, outputs)


def _create(path: Path):
    """``path`` opened for writing, its folder created first."""
    path.parent.mkdir(exist_ok=True)
    try:
        return open(path, "w")
    except FileNotFoundError:  # another stage's recovery removed the (then empty) folder in between: once more
        path.parent.mkdir(exist_ok=True)
        return open(path, "w")


def _recover() -> None:
    """Roll forward every commit that a killed stage left half done in this working directory."""
    for manifest in sorted(Path(STAGING).glob("commit-*.json")):
        try:
            fh = open(manifest)
        except FileNotFoundError:  # its stage finished (and deleted it) since we listed it
            continue
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a stage in another process is committing right now
                continue
            if os.fstat(fh.fileno()).st_nlink == 0:  # that stage finished (and deleted it) since we listed it
                continue
            moves = {Path(final): Path(path) for final, path in json.load(fh).items()}
            _finish(manifest, moves)
    _tidy(Path(STAGING))  # also left empty by a stage killed just after deleting its manifest


def _tidy(staging: Path) -> None:
    try:
        staging.rmdir()
    except OSError:  # not empty (another output of this folder is still staged) or already gone
        pass


@contextmanager
def atomic_outputs() -> Iterator[None]:
    """Around a stage's main: first finish any commit a killed stage left; then the outputs given out by ``staged``
    are moved into place on success, dropped on failure."""
    _recover()
    outputs: dict[Path, Path] = {}
    waiting: list[Callable[[bool], None]] = []
    token, after = _ACTIVE.set(outputs), _AFTER.set(waiting)
    try:
        yield
    except BaseException:
        try:
            for path in outputs.values():
                _remove(path)
                _tidy(path.parent)
        finally:
            _tell(waiting, False)   # (a run ended well, then the stage failed after it: its outputs are not kept)
        raise
    else:
        try:
            _commit(outputs)
        except BaseException:
            _tell(waiting, False)
            raise
        _tell(waiting, True, strict=True)
    finally:
        _ACTIVE.reset(token)
        _AFTER.reset(after)


def _tell(waiting: list[Callable[[bool], None]], committed: bool, strict: bool = False) -> None:
    """Call every waiting ``done(committed)``, each whatever the others do; ``strict``: then raise the first error
    (a run that could not be marked FINISHED fails the stage, as it would have inside it)."""
    errors = []
    for done in waiting:
        try:
            done(committed)
        except Exception as err:  # noqa: BLE001 - the others are told all the same
            errors.append(err)
    if errors and strict:
        raise errors[0]
    for err in errors:   # the stage's own failure is what it reports
        print(f"warning: {err}", file=sys.stderr)
