"""A batch joining a family's snapshot, on record until DVC has versioned it or it has left again.

``flows.batch_admission`` writes ``.<snapshot>.pending.json`` beside the snapshot folder before the batch is copied
in, holds a lock on it while the batch joins, and deletes it once ``dvc commit`` has recorded the new version or the
batch has left the snapshot again. A process killed in between (SIGKILL, the out-of-memory killer, a power cut: no
clean-up of its own ran) leaves it behind, unlocked, and the next snapshot stage (the first stage of every
``dvc repro``, pipeline run and ingestion) settles it: the batch stays when the version dvc.lock records holds it,
and leaves the snapshot again otherwise. Without this, a batch listed but never versioned was skipped as accepted by
every later ingestion and versioned by the next ``dvc repro`` with no report, its copy perhaps holding rows no check
had read. A record whose lock is held is an ingestion still going on (a ``dvc repro`` beside it): left alone.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.io import UMASK, write_atomic
from tasks.lineage import locked_outputs


def pending_path(snapshot: Path) -> Path:
    return snapshot.with_name(f".{snapshot.name}.pending.json")


def recorded(root: Path, snapshot: Path) -> dict[str, Any] | None:
    """What ``root``'s dvc.lock records of the folder ``snapshot`` now (read as it is: no DVC process of this
    family writes it while a batch joins, nor while the snapshot stage runs)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    key = Path(os.path.relpath(snapshot.absolute(), root.absolute())).as_posix()
    return locked_outputs(root, lock.read_text()).get(key)


@contextmanager
def joining(root: Path, snapshot: Path, manifest: Path, batch: str
            ) -> Iterator[tuple[dict[str, Any] | None, Callable[[], None]]]:
    """Around adding ``batch`` to ``snapshot`` and versioning it: the record a killed process leaves behind, locked
    while this one lives. Yields what dvc.lock records of the snapshot before the batch joins, and ``done``, to call
    once the batch is versioned or has left again (not called, the record stays: the batch is settled later)."""
    path = pending_path(snapshot)
    state = {"batch": batch, "manifest": manifest.read_text(), "recorded": recorded(root, snapshot)}
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)   # held until this process ends or is done: the record is of a live one
        os.fchmod(fh.fileno(), 0o666 & ~UMASK)
        json.dump(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
        os.replace(tmp, path)   # whole or not at all

        def done() -> None:
            path.unlink(missing_ok=True)

        yield state["recorded"], done


def settle(root: Path, snapshot: Path, manifest: Path) -> str | None:
    """Undo the batch a killed ingestion left in ``snapshot`` unversioned; the line saying what was found, if any."""
    path = pending_path(snapshot)
    try:
        fh = open(path)   # noqa: SIM115 - closed by the with below (a missing record is no error)
    except FileNotFoundError:
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:   # its ingestion is alive (this stage runs beside it): its own to finish
            return None
        if os.fstat(fh.fileno()).st_nlink == 0:   # done since we opened it
            return None
        state = json.load(fh)
        batch = Path(state["batch"]).name
        held = [b["id"] for b in json.loads(state["manifest"]).get("batches", [])]
        if _versioned(root, snapshot, batch, state["recorded"]):
            line = f"batch {batch} was versioned by an ingestion killed before it wrote its report; it stays accepted"
        elif _listed(manifest) not in (held, [*held, batch]):   # another version checked out since: not this one's
            line = (f"batch {batch} was being ingested into {snapshot} by a process killed since, but the snapshot "
                    f"lists other batches now (another version checked out?): left as it is; check that {batch} is "
                    "where it should be")
        else:
            write_atomic(manifest, state["manifest"].encode())
            if batch not in held:   # (a batch held before the record was made is never removed)
                shutil.rmtree(snapshot / batch, ignore_errors=True)
            line = (f"batch {batch} was left in {snapshot} unversioned by an ingestion killed while DVC recorded "
                    "it; it left the snapshot again, to be ingested anew")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return line


def _listed(manifest: Path) -> list[str] | None:
    try:
        return [b["id"] for b in json.loads(manifest.read_text()).get("batches", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _versioned(root: Path, snapshot: Path, batch: str, before: dict[str, Any] | None) -> bool:
    """Whether the version of ``snapshot`` dvc.lock records holds ``batch``: by DVC's listing of that version when
    its cache has one, else by dvc.lock recording another version than before the batch joined."""
    from tasks.snapshot import recorded_version

    now = recorded_version(root, snapshot)
    if now is None:
        return False
    if now.get("batches") is not None:
        return batch in now["batches"]
    return {k: v for k, v in now.items() if k != "batches"} != before
