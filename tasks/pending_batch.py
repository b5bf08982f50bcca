"""A batch joining a family's snapshot, on record until DVC has versioned it or it has left again.

``flows.batch_admission`` writes ``.<snapshot>.pending.json`` beside the snapshot folder before the batch is copied
in, and deletes it once ``dvc commit`` has recorded the new version (or the batch has left the snapshot again). A
process killed in between (SIGKILL, the out-of-memory killer, a power cut: no clean-up of its own ran) leaves it
behind, and the next snapshot stage (the first stage of every ``dvc repro``, pipeline run and ingestion) settles it:
the batch leaves the snapshot again unless dvc.lock records another version of the folder than before the batch
joined. Without this, a batch listed but never versioned was skipped as accepted by every later ingestion and
versioned by the next ``dvc repro`` with no report, its copy perhaps holding rows no check had read.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.io import write_atomic, write_json
from tasks.lineage import locked_outputs


def pending_path(snapshot: Path) -> Path:
    return snapshot.with_name(f".{snapshot.name}.pending.json")


def recorded(root: Path, snapshot: Path) -> dict[str, Any] | None:
    """What ``root``'s dvc.lock records of the folder ``snapshot`` now (read as it is: no DVC process writes it while
    a batch joins, nor while the snapshot stage runs)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return None
    key = Path(os.path.relpath(snapshot.absolute(), root.absolute())).as_posix()
    return locked_outputs(root, lock.read_text()).get(key)


@contextmanager
def joining(root: Path, snapshot: Path, manifest: Path, batch: str) -> Iterator[dict[str, Any] | None]:
    """Around adding ``batch`` to ``snapshot`` and versioning it: the record a killed process leaves behind; yields
    what dvc.lock records of the snapshot before the batch joins."""
    before = recorded(root, snapshot)
    write_json(pending_path(snapshot), {"batch": batch, "manifest": manifest.read_text(), "recorded": before})
    try:
        yield before
    finally:
        pending_path(snapshot).unlink(missing_ok=True)


def settle(root: Path, snapshot: Path, manifest: Path) -> str | None:
    """Undo the batch a killed ingestion left in ``snapshot`` unversioned; the line saying what was found, if any."""
    path = pending_path(snapshot)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    batch = Path(state["batch"]).name
    if recorded(root, snapshot) != state["recorded"]:
        line = f"batch {batch} was versioned by an ingestion killed before it wrote its report; it stays accepted"
    else:
        write_atomic(manifest, state["manifest"].encode())
        shutil.rmtree(snapshot / batch, ignore_errors=True)
        line = (f"batch {batch} was left in {snapshot} unversioned by an ingestion killed while DVC recorded it; it "
                "left the snapshot again, to be ingested anew")
    path.unlink()
    return line
