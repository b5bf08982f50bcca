"""One promotion at a time per registered model, across processes and machines: a Prefect global concurrency limit.

MLflow's registry has no compare-and-set: two runs that read "no champion", register and move the alias at the same
time leave a history in which both claim to have followed the same champion. Holding a one-slot Prefect limit
named after the model around read-champion → score → register → move-alias serialises them on the Prefect server
(the ephemeral one on a laptop, the shared one past it), which every run already talks to.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from tasks.errors import PipelineError


class RegistryBusy(PipelineError):
    """Another run held the model's promotion lock longer than ``tracking.registry_lock_timeout_seconds``."""


def lock_name(model: str) -> str:
    return "registry-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model)  # limit names may not hold / % & > <


@contextmanager
def _slot(name: str, timeout_seconds: float, busy: str) -> Iterator[None]:
    """Hold the one slot of Prefect global concurrency limit ``name`` (created on first use); raise
    ``RegistryBusy(busy)`` when it stays taken for ``timeout_seconds``."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:  # first use: create it; a concurrent creator may win that race, which is fine
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass
    acquired = False
    try:
        with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True):
            acquired = True
            yield
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
