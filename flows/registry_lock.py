"""One promotion at a time per registered model, across processes and machines: a Prefect global concurrency limit.

MLflow's registry has no compare-and-set: two runs that read "no champion", register and move the alias at the same
time leave a history in which both claim to have followed the same champion. Holding a one-slot Prefect limit
named after the model around read-champion → score → register → move-alias serialises them on the Prefect server
(the ephemeral one on a laptop, the shared one past it), which every run already talks to.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

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
def registry_lock(model: str, timeout_seconds: float) -> Iterator[None]:
    """Hold the one promotion slot of registered model ``model`` (created on first use)."""
    name = lock_name(model)
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
        raise RegistryBusy(f"{model}: another promotion held the registry lock {name!r} for more than "
                           f"{timeout_seconds:g} s (tracking.registry_lock_timeout_seconds); nothing was "
                           "registered") from err
