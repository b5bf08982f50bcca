"""One holder at a time, across processes and machines: a one-slot Prefect global concurrency limit.

MLflow's registry has no compare-and-set: two runs that read "no champion", register and move the alias at the same
time leave a history in which both claim to have followed the same champion. Holding a one-slot Prefect limit
named after the model around read-champion → score → register → move-alias serialises them on the Prefect server
(the ephemeral one on a laptop, the shared one past it), which every run already talks to. A family's data of a
project is held the same way (``data_lock``): by ingestion, a pipeline run, gating alone (``--gate-only``) or a sweep.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from uuid import UUID

from prefect import get_client
from prefect.client.base import ServerType
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency._events import emit_concurrency_acquisition_events, emit_concurrency_release_events
from prefect.concurrency._leases import maintain_concurrency_lease
from prefect.concurrency._sync import acquire_concurrency_slots_with_lease, release_concurrency_slots_with_lease
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, PrefectHTTPStatusError
from prefect.settings import get_current_settings

from tasks.errors import PipelineError


class RegistryBusy(PipelineError):
    """Another run held the model's promotion lock longer than ``tracking.registry_lock_timeout_seconds``."""


def lock_name(model: str) -> str:
    return "registry-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model)  # limit names may not hold / % & > <


def lock_folder() -> Path:
    """This user's lock records and guards on this machine: a folder per user, owner-only (another user's run could
    neither write in a folder the first user made nor be let give back this user's slots). Per user loses nothing:
    a record serves only to give back a slot of a dead holder of this machine, and another user's dead holder is
    either on an ephemeral server of its own, whose database (in its PREFECT_HOME) this user's runs do not share, or
    on a shared server, whose repossessor frees its lease on expiry (``LEASE_SECONDS``)."""
    return Path(tempfile.gettempdir()) / f"kdq-locks-{os.getuid()}"


def holder_file(name: str, server: str) -> Path:
    """Where this machine records which of its processes holds slot ``name`` of ``server`` (``_server``)."""
    return lock_folder() / f"{name}-{hashlib.sha256(server.encode()).hexdigest()[:12]}.json"


@contextmanager
def _lock_files(path: Path) -> Iterator[None]:
    """An OSError on a lock file (``path``) as one line naming it: a folder to fix, not a failure to retry."""
    try:
        yield
    except OSError as err:
        raise PipelineError(f"{path}: this user's lock files cannot be written ({err.strerror or err}); make "
                            f"{lock_folder()} a folder of yours, or set TMPDIR to another temp dir") from err


def _own_folder(folder: Path) -> None:
    """Make ``folder`` owner-only; refuse one another user made (its records could name leases for us to free)."""
    with _lock_files(folder):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = folder.lstat().st_uid
    if owner != os.getuid():
        raise PipelineError(f"{folder}: this user's lock folder belongs to user {owner}; remove it, or set TMPDIR "
                            "to another temp dir")


def _started(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of /proc/<pid>/stat), or None when it is not running."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


# A slot is held by a lease that the holder acquires, renews and releases with the parts
# prefect.concurrency.sync.concurrency is made of (and emits the same events), so that it knows and records its lease:
# a killed holder's slot is then given back by that lease, and a server's repossessor that comes to the dead lease
# later finds nothing more to free. The holder renews the lease while it lives; a server with the repossessor
# service (`prefect server start`) frees it this long after the last renewal.
LEASE_SECONDS = 300.0
GIVE_BACK_EVERY = 15.0   # s: a run waiting for a slot looks this often whether its holder was killed meanwhile


def _server(server_type: ServerType, api_url: object) -> str:
    """Which slot counts a client reads and writes: its server's API, or for a server of its own (ephemeral, started
    by the process) the database every such server of this machine with the same database file shares."""
    if server_type != ServerType.EPHEMERAL:
        return str(api_url)
    url = get_current_settings().server.database.connection_url
    database = _database_identity(url.get_secret_value() if url else "")
    return "ephemeral:" + hashlib.sha256(database.encode()).hexdigest()[:16]


def _database_identity(url: str) -> str:
    """``url`` as the name of one database: a relative SQLite file (a relative PREFECT_HOME gives one) is named as
    the absolute URL of the same file is written, so processes in two folders name two databases and a process
    naming the file absolutely names the same one; an in-memory database is the process's own. Any other URL (an
    absolute file, PostgreSQL) is its own name, as written."""
    # (imported here: only an ephemeral server's lock pays for it, ~0.3 s)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return url
    if parsed.get_backend_name() != "sqlite":
        return url
    database = parsed.database or ""
    uri = parsed.query.get("uri") == "true"   # (SQLite URI mode: "file:" names the file; without it, it is a name)
    path = database.removeprefix("file:") if uri else database
    if path in ("", ":memory:") or (uri and parsed.query.get("mode") == "memory"):
        return f"{url} (process {os.getpid()})"
    if not os.path.isabs(path):   # (made absolute as SQLite opens it: against the working directory, no ~ expanded)
        absolute = database[:len(database) - len(path)] + os.path.abspath(path)
        return parsed.set(database=absolute).render_as_string(hide_password=False)
    return url


def _dead_holder(record: Path) -> dict | None:
    """The holder ``record`` names when it was a process of this machine that is gone (killed while holding the
    slot), else None (a live holder; no record; a record that does not read)."""
    try:
        holder = json.loads(record.read_text())
        pid = int(holder.get("pid", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return holder if holder.get("host") == socket.gethostname() and _started(pid) != holder.get("started") else None


def _drop_record(record: Path, lease: object) -> None:
    """Delete ``record`` if it still names ``lease`` (not a later holder's)."""
    try:
        if json.loads(record.read_text()).get("lease") == lease:
            record.unlink(missing_ok=True)
    except (OSError, ValueError, AttributeError):
        pass


@contextmanager
def _machine_guard(record: Path) -> Iterator[None]:
    """One process of this machine at a time writes, deletes or acts on ``record`` (a few quick steps each)."""
    path = record.with_suffix(".guard")
    _own_folder(path.parent)
    with ExitStack() as stack:
        with _lock_files(path):
            fh = stack.enter_context(open(path, "a"))
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _known_lease(client, holder: dict) -> UUID | None:
    """The dead holder's lease when the server still holds it (renewing it tells), else None."""
    try:
        lease = UUID(str(holder.get("lease")))
        client.renew_concurrency_lease(lease, lease_duration=60)
    except ValueError:   # a damaged record: it names no lease
        return None
    except PrefectHTTPStatusError as err:
        if err.response.status_code not in (404, 410):   # gone: freed on expiry, or never this server's
            raise
        return None
    return lease


def _give_back(client, name: str, record: Path) -> None:
    """Give back slot ``name`` when its holder on this machine (recorded in ``record``, the file of this client's
    server) was killed while holding it: by the lease it recorded, when the server still holds it (the server frees
    that lease's slot; its repossessor, coming to the lease later, finds nothing). A lease the server does not hold
    was freed on expiry already (nothing to give back), or was held by the dead holder's own ephemeral server, where
    no repossessor runs and whose slot count outlives it in the database this machine's ephemeral servers share: one
    slot is given back.
    Not given back: a slot held by a lease a restarted server forgot (Prefect keeps leases in memory by default),
    or by a holder killed before it recorded itself — RegistryBusy's message says how to free one by hand."""
    with _machine_guard(record):
        holder = _dead_holder(record)
        if holder is None:
            return
        lease = _known_lease(client, holder)
        with _lock_files(record):
            record.unlink(missing_ok=True)   # before the slot is free (a next holder's record stays), under the guard
        if lease is not None:
            print(f"lock {name!r}: its holder on this machine is gone (killed while holding it); freeing its lease")
            client.release_concurrency_slots_with_lease(lease)
        elif holder.get("ephemeral"):
            print(f"lock {name!r}: its holder on this machine is gone with its ephemeral server; freeing its slot")
            try:
                held = time.time() - float(holder.get("since"))
            except (TypeError, ValueError):
                held = 0.0
            client.release_concurrency_slots([name], slots=1, occupancy_seconds=max(held, 0.001))   # must be > 0


@contextmanager
def _slot(name: str, timeout_seconds: float, busy: str) -> Iterator[None]:
    """Hold the one slot of Prefect global concurrency limit ``name`` (created on first use); raise
    ``RegistryBusy(busy)`` when it stays taken for ``timeout_seconds``. A slot whose holder on this machine was
    killed is given back (``_give_back``): first, and every ``GIVE_BACK_EVERY`` seconds while waiting."""
    with get_client(sync_client=True) as client:   # (an ephemeral server starts here: not in the wait)
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:  # first use: create it; a concurrent creator may win that race, which is fine
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass
        ephemeral = client.server_type == ServerType.EPHEMERAL
        record = holder_file(name, _server(client.server_type, client.api_url))
        deadline = time.monotonic() + timeout_seconds
        while True:
            _give_back(client, name, record)
            try:
                acquired = acquire_concurrency_slots_with_lease(
                    [name], 1, timeout_seconds=max(min(GIVE_BACK_EVERY, deadline - time.monotonic()), 0.001),
                    lease_duration=LEASE_SECONDS, strict=True)
                break
            except TimeoutError as err:
                if time.monotonic() >= deadline:
                    raise RegistryBusy(f"{busy} (if no run holds it any more: `prefect gcl update {name} "
                                       "--active-slots 0` frees it)") from err
    events = emit_concurrency_acquisition_events(acquired.limits, 1)
    lease = str(acquired.lease_id)
    try:
        with maintain_concurrency_lease(acquired.lease_id, LEASE_SECONDS, raise_on_lease_renewal_failure=True):
            with _machine_guard(record), _lock_files(record):
                record.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                              "started": _started(os.getpid()), "lease": lease, "since": time.time(),
                                              "ephemeral": ephemeral}))   # the file's name says which server
            try:
                yield
            finally:
                with _machine_guard(record):
                    _drop_record(record, lease)
    finally:
        release_concurrency_slots_with_lease(acquired.lease_id)
        emit_concurrency_release_events(acquired.limits, 1, events)


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
    while no pipeline run (or gate, or sweep) of that project reads it, and the reverse (DVC hashes a stage's inputs after it ran: a
    batch added meanwhile would be recorded as trained on). Copies of a project (sweeps) have slots of their own."""
    with ExitStack() as stack:
        for family in sorted(set(families)):   # a family named twice: one slot (a second request waited for the first)
            name = data_lock_name(root, family)
            stack.enter_context(_slot(name, timeout_seconds, f"{root}: the {family} data was held by another run "
                                      f"(ingestion or a pipeline run, lock {name!r}) for more than {timeout_seconds:g} s "
                                      "(pipeline.data_lock_timeout_seconds); nothing was changed"))
        yield
