"""``promote-model`` and ``rollback-champion`` (``python -m flows.promotion``): the flows that move a registry alias
to a given version by hand (a promotion or a rollback), recording who and why as tags on that version, under the
same promotion lock as the gate (``flows.gating``, which registers versions and moves ``champion`` when they pass).
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import flow

from flows.registry import (
    CHAMPION_BEFORE,
    RegistryError,
    check_registry,
    current_user,
    previous_tag,
    registered_model,
    rolled_back_tag,
)
from flows.registry_lock import registry_lock
from tasks.config import Config, load_config
from tasks.errors import PipelineError, run_cli
from tasks.mlflow_store import client_for, redact, registered_version, server_error


@flow(name="promote-model", log_prints=True)
def promote_model(name: str, version: str, alias: str = "champion", reason: str = "", who: str | None = None,
                  root: str = ".") -> dict[str, str]:
    """Point ``alias`` of registered model ``name`` at ``version`` (a promotion or a rollback), recording who/why."""
    client, uri, cfg = _registry(root)
    with registry_lock(name, cfg.tracking.registry_lock_timeout_seconds), _answered(uri, name, alias):
        return _move_alias(client, uri, name, version, alias, reason, who)


@flow(name="rollback-champion", log_prints=True)
def rollback_champion(name: str, reason: str = "", who: str | None = None, root: str = ".") -> dict[str, str]:
    """Point ``champion`` back at the version it pointed at before the current one (as recorded on that version)."""
    client, uri, cfg = _registry(root)
    with registry_lock(name, cfg.tracking.registry_lock_timeout_seconds), _answered(uri, name, "champion"):
        current = registered_version(client, name)
        if current is None:
            raise RegistryError(f"{name} has no champion in {redact(uri)}; nothing to roll back")
        if (before := _before(current)) is None:
            raise RegistryError(f"{name}@champion (version {current.version}) records no earlier champion "
                                f"(tags {previous_tag('champion')} / {CHAMPION_BEFORE}); nothing was changed")
        return _move_alias(client, uri, name, before, "champion",
                           reason or f"rollback from version {current.version}", who, rollback=True)


@contextmanager
def _answered(uri: str, name: str, alias: str) -> Iterator[None]:
    """A registry call that failed (a server that did not answer, a request refused) as one line naming the
    registry, not MLflow's traceback. The alias moves last, so it is where it was unless that very call failed (and
    _set_alias read it back where it was), and the same command again completes the move."""
    try:
        yield
    except MlflowException as err:
        raise server_error(err, f"the registry at {redact(uri)}", f"{name}@{alias} was not moved, or its move is "
                           "not fully recorded: run the same command again") from None


def _before(version: Any) -> str | None:
    """The champion ``version`` replaced, as a rollback reads it: ``champion.previous`` (a move by hand), else the
    champion the gate compared it with; None when it records none. (A version re-promoted by hand before 2026-12-06
    may name itself as champion.previous: not a predecessor.)"""
    return next((tag for tag in (version.tags.get(previous_tag("champion")), version.tags.get(CHAMPION_BEFORE))
                 if tag not in (None, "", "None", "none", str(version.version))), None)


def _earlier_champions(client: MlflowClient, name: str, current: Any) -> set[str]:
    """The champions before ``current``, as rollback after rollback would reach them (not ``current`` itself, which
    tags written before 2026-12-07 may lead back to)."""
    found, start = set(), str(current.version)
    while (before := _before(current)) is not None and before not in found and before != start:
        found.add(before)
        if (current := registered_version(client, name, before)) is None:   # deleted since: the chain ends there
            break
    return found


def _registry(root: str) -> tuple[MlflowClient, str, Config]:
    from tasks.mlflow_store import tracking_uri

    cfg = load_config(Path(root) / "params.yaml")
    uri = tracking_uri(cfg, Path(root).resolve())
    client = client_for(uri)
    check_registry(client, uri)
    return client, uri, cfg


def _move_alias(client: MlflowClient, uri: str, name: str, version: str, alias: str, reason: str,
                who: str | None, rollback: bool = False) -> dict[str, str]:
    """Point ``alias`` at ``version`` and tag it with who, why and when. ``<alias>.previous`` names the champion it
    replaced, what a rollback returns to — except after a rollback, or a move by hand to one of the champions before
    the current one (a rollback to a chosen version): the version moved back from is recorded as
    ``<alias>.rolled_back_from`` and the next rollback goes further back, not forth; and on a version that already
    held the alias (it keeps the one it replaced then). Another alias than champion records no version replaced."""
    version = _checked_target(name, version, alias)
    if registered_version(client, name, version) is None:   # (a server that failed raises: not "does not exist")
        raise RegistryError(f"{name} version {version} does not exist in {redact(uri)}; nothing was changed")
    champion = registered_version(client, name) if alias == "champion" else None
    previous = getattr(champion, "version", None)
    # back by hand to a champion before the current one: a rollback to a chosen version (not any older version: a
    # challenger registered before the champion never replaced it)
    back = rollback or (champion is not None and str(version) in _earlier_champions(client, name, champion))
    who = who or current_user()
    when = datetime.now(UTC).isoformat(timespec="seconds")
    tags = {f"{alias}.set_by": who, f"{alias}.reason": reason or "(none given)", f"{alias}.set_at": when}
    if previous is not None and back:
        tags[rolled_back_tag(alias)] = str(previous)
    elif previous is not None and str(previous) != str(version):
        tags[previous_tag(alias)] = str(previous)
    # the tags first, the alias last: a failure in between leaves the alias where it was, and the same command again
    # records the champion replaced (the alias moved first, a rerun found the version champion already and recorded
    # none, so a rollback skipped it)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    confirmed = _set_alias(client, uri, name, alias, version, previous, rollback)
    print(f"{name}@{alias} -> version {version} (was {previous}); by {who}: {reason or '(no reason given)'}"
          f"{confirmed}")
    return {"name": name, "alias": alias, "version": str(version), "previous": str(previous)}


def _checked_target(name: str, version: str, alias: str) -> str:
    """``version`` as a version number, once ``alias`` is one the registry accepts; a PipelineError before anything is
    written otherwise. The registry checks an alias only when it is set, after the tags: a refused "latest" or "v<N>"
    read back as a version (the newest, version N) and could pass for a move done, and the tags stayed on a version
    no command could ever move such an alias to."""
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved

    try:   # MLflow's own rules (its stores check them on a move): word characters and dashes, not latest or v<N>
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
    except MlflowException as err:
        raise PipelineError(f"--alias {alias!r}: {err.message.rstrip('.')}; nothing was changed in {name}") from None
    if not re.fullmatch(r"[0-9]+", str(version)) or int(version) < 1:
        raise PipelineError(f"--version {version!r}: not a version number (a positive integer); nothing was changed "
                            f"in {name}")
    return str(int(version))


def _set_alias(client: MlflowClient, uri: str, name: str, alias: str, version: str, previous: str | None,
               rollback: bool) -> str:
    """Point ``alias`` at ``version``: "" when the registry answered, a note when its answer was lost but the alias
    reads back at ``version``. A server may apply the move and its answer be lost (a read timeout), and a rollback
    run again then went one champion further back, from the new one; so a failed move is read back: done is done,
    not moved is an error (the same command again completes it), and unreadable is for the operator to check."""
    try:
        client.set_registered_model_alias(name, alias, version)
        return ""
    except MlflowException as err:
        try:
            now = registered_version(client, name, alias=alias)
        except MlflowException:
            raise server_error(err, f"the registry at {redact(uri)}", _unconfirmed(name, alias, version, previous,
                                                                                   rollback)) from None
        if now is not None and str(now.version) == str(version):
            return f" (the registry's answer was lost: {name}@{alias} read back at version {version}, the move is done)"
        raise   # not moved: where it was, and _answered says to run the same command again


def _unconfirmed(name: str, alias: str, version: str, previous: str | None, rollback: bool) -> str:
    """What to do after a move whose answer was lost and whose alias could not be read back either."""
    if not rollback:   # a move to a named version: the same command again moves it there, moved or not
        return (f"{name}@{alias} may have moved to version {version} (reading it back failed too): run the same "
                "command again")
    return (f"{name}@{alias} may have moved to version {version} (reading it back failed too): check where it is "
            f"(MLflow UI, or MlflowClient.get_model_version_by_alias) before rolling back again: at version {version} "
            f"the rollback is done, at version {previous} run the same command again")


def main() -> None:
    parser = argparse.ArgumentParser(description="Move a registry alias to a model version (promote or roll back).")
    parser.add_argument("--name", help="registered model (default: gate.<family>.registered_model)")
    parser.add_argument("--family", default=None, help="whose registered model, without --name (default: the "
                        "first of params.yaml's families)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--version")
    target.add_argument("--rollback", action="store_true", help="champion back to the version before the current one")
    parser.add_argument("--alias", default="champion", help="the alias --version moves (a rollback moves champion)")
    parser.add_argument("--reason", default="")
    parser.add_argument("--who", default=None)
    parser.add_argument("--root", default=".")
    args = parser.parse_args()
    if args.rollback and args.alias != "champion":   # it would move champion, not the alias named
        parser.error(f"--rollback moves champion only (it reads champion's history), not --alias {args.alias}: "
                     f"move {args.alias} with --version V --alias {args.alias}")
    name = args.name or registered_model(load_config(Path(args.root) / "params.yaml"), args.family)
    if args.rollback:
        rollback_champion(name, args.reason, args.who, args.root)
    else:
        _checked_target(name, args.version, args.alias)   # in one line, before a flow (and Prefect's log) starts
        promote_model(name, args.version, args.alias, args.reason, args.who, args.root)


if __name__ == "__main__":
    run_cli(main)
