"""One promotion at a time per registered model, across processes and machines: a Prefect global concurrency limit.

MLflow's registry has no compare-and-set: two runs that read "no champion", register and move the alias at the same
time leave a history in which both claim to have followed the same champion. Holding a one-slot Prefect limit
named after the model around read-champion → score → register → move-alias serialises them on the Prefect server
(the ephemeral one on a laptop, the shared one past it), which every run already talks to.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from tasks.errors import PipelineError


class RegistryBusy(PipelineError):
    """Another run held the model's promotion lock longer than ``tracking.registry_lock_timeout_seconds``."""


def lock_name(model: str) -> str:
    return "registry-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model)  # limit names may not hold / % & > <


def holder_file(name: str) -> Path:
    """Where this machine records which of its processes holds slot ``name``."""
    return Path(tempfile.gettempdir()) / "kdq-locks" / f"{name}.json"


def _started(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of /proc/<pid>/stat), or None when it is not running."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _orphaned(name: str) -> bool:
    """Whether slot ``name`` was taken by a process of this machine that is gone (killed while holding it)."""
    try:
        holder = json.loads(holder_file(name).read_text())
    except (OSError, ValueError):
        return False
    return holder.get("host") == socket.gethostname() and _started(int(holder.get("pid", 0))) != holder.get("started")


@contextmanager
def _slot(name: str, timeout_seconds: float, busy: str) -> Iterator[None]:
    """Hold the one slot of Prefect global concurrency limit ``name`` (created on first use); raise
    ``RegistryBusy(busy)`` when it stays taken for ``timeout_seconds``. A slot whose holder on this machine was
    killed is given back first: under an ephemeral Prefect server the holder's lease died with its process, so
    nothing else would ever free it."""
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:  # first use: create it; a concurrent creator may win that race, which is fine
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass
        else:
            if limit.active_slots and _orphaned(name):
                print(f"lock {name!r}: its holder on this machine is gone (killed while holding it); freeing it")
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
                holder_file(name).unlink(missing_ok=True)
    acquired = False
    try:
        with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True):
            acquired = True
            record = holder_file(name)
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                          "started": _started(os.getpid())}))
            try:
                yield
            finally:
                record.unlink(missing_ok=True)
    except TimeoutError as err:
        if acquired:  # raised by the work under the lock, not by waiting for it
            raise
        raise RegistryBusy(busy) from err


@contextmanager
def registry_lock(model: str, timeout_seconds: float) -> Iterator[None]:
    """Hold the one promotion slot of registered model ``model`` (created on first use)."""
    name = lock_name(model)
    with _slot(name, timeout_seconds, f"{model}: another promotion held the registry lock {name!r} for more than "
                                      f"{timeout_seconds:g} s (tracking.registry_lock_timeout_seconds); nothing was "
                                      "registered"):
        yield


def data_lock_name(root: Path, family: str) -> str:
    return f"data-{family}-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]}"


@contextmanager
def data_lock(root: Path, families: list[str], timeout_seconds: float) -> Iterator[None]:
    """Hold the data slot of each family of the project at ``root``: ingestion changes a family's raw snapshot only
    while no pipeline run of that project reads it, and the reverse (DVC hashes a stage's inputs after it ran: a
    batch added meanwhile would be recorded as trained on). Copies of a project (sweeps) have slots of their own."""
    with ExitStack() as stack:
        for family in sorted(families):
            name = data_lock_name(root, family)
            stack.enter_context(_slot(name, timeout_seconds, f"{root}: the {family} data was held by another run "
                                      f"(ingestion or a pipeline run, lock {name!r}) for more than {timeout_seconds:g} s "
                                      "(pipeline.data_lock_timeout_seconds); nothing was changed"))
        yield
