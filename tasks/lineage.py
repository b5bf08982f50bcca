"""Lineage tags for MLflow runs: git commit and dirty flag, DVC hashes of a stage's inputs, params hash."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.errors import ConfigError, LockBusy
from tasks.io import content_digest, file_digest, load_yaml

DVC_LOCK_WAIT_SECONDS = 120
#: set for the stage processes of a scratch copy (a sweep's recipe): the git state of the project it was copied from,
#: which their runs record in place of the copy's own commit (in no history of the project); ``source_git_env``
SOURCE_GIT_ENV = "KDQ_SOURCE_GIT"


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_refusal(root: Path) -> str | None:
    """git's reason for refusing the repository ``root`` is in (a checkout another user owns: "dubious ownership"),
    or None when git accepts it or ``root`` is in no repository."""
    try:
        done = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=root, capture_output=True, text=True,
                              timeout=30, check=False, env={**os.environ, "LC_ALL": "C"})   # git's own English
    except (OSError, subprocess.SubprocessError):
        return None
    why = next(iter(done.stderr.strip().splitlines()), "").removeprefix("fatal: ")
    if done.returncode == 0 or "not a git repository" in why:
        return None
    return why or f"git rev-parse exited {done.returncode}"


def git_state(root: Path = Path(".")) -> dict[str, str]:
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        if (why := git_refusal(root)) is not None:   # else no repository, or one with no commit yet
            print(f"warning: {root}: git refuses its repository ({why}); the run records git.commit none and "
                  "cannot be restored", file=sys.stderr)
        return {"git.commit": "none", "git.dirty": "unknown"}
    # dvc.lock records data and results, not code: it changes with every run and is committed after it
    # (flows.lock_commit), and each registered version keeps the one it was made with
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ":(exclude)dvc.lock")
    return {"git.commit": commit, "mlflow.source.git.commit": commit, "git.dirty": str(bool(dirty)).lower()}


def source_git_env(copy: Path, source: dict[str, str]) -> dict[str, str]:
    """The environment entry that makes runs in ``copy`` record ``source`` (``git_state`` of the project it was
    copied from): it names the copy, so a process elsewhere that inherits it records its own state."""
    return {SOURCE_GIT_ENV: json.dumps({"copy": str(copy.resolve()), "state": source})}


def _copied_from(root: Path) -> dict[str, str] | None:
    recorded = os.environ.get(SOURCE_GIT_ENV)
    if not recorded:
        return None
    entry = json.loads(recorded)
    return entry["state"] if Path(entry["copy"]) == root.resolve() else None


def params_hash(cfg: Any) -> str:
    """``params.hash``, one meaning on every run and registered version: the SHA-256 of the whole resolved params
    (``cfg``, the profile applied), whatever part of them a run logs as its params."""
    return hashlib.sha256(json.dumps(cfg.model_dump(by_alias=True), sort_keys=True, default=str).encode()).hexdigest()


def data_params(cfg: Any, family: str, root: Path = Path(".")) -> str:
    """The SHA-256 of ``data.<family>``: the params that decide which rows are training, validation and test (two
    models split by different ones may each have trained on the other's test rows). Fields the data block's class,
    or the class of a block inside it (or of the blocks a list of it holds), lists in ``LOCATION`` (where the pinned
    files are found, what a published set is expected to hold) or ``ENCODING`` (how a row is encoded, never which
    split it is in: the gate scores a champion of another encoding in its own) decide no row and are left out:
    moving the data, or a release adding such a field, keeps a champion comparable. So are the fields it lists in
    ``ADDED`` (added in a later release) while they hold the value that reads the data as before: a champion
    registered before them stays comparable until one is used. A block's ``ROWS``, the version of the rules its
    prepare stage makes rows by, is hashed beside its fields: a champion of other rules is split otherwise. A field a
    block lists in ``CONTENT`` names a file or
    folder (relative to ``root``) whose content decides the rows: its content's SHA-256
    (``tasks.io.content_digest``) is hashed in its place, so the same data moved keeps a champion comparable and
    data edited in place does not (read when this runs: an edit no stage has read yet counts already; one gone counts
    as unknown, equal to no recorded digest)."""
    block = cfg.block("data", family)
    dumped = _row_params(block, _left_out(block, ("LOCATION", "ENCODING")))
    if (rows := getattr(type(block), "ROWS", None)) is not None:   # the code's row rules changed: other rows
        dumped["rows"] = rows
    for keys, value in _contents(block):
        if (found := content_digest(root / value)) is None:   # gone since its data was read: no champion compares
            print(f"note: data.{family}.{'.'.join(keys)}: {root / value} is no file or folder now; its content, a "
                  "split param, is unknown: no version is compared with this one on today's test rows",
                  file=sys.stderr)
        inner = dumped
        for key in keys[:-1]:
            inner = inner[key]
        inner[keys[-1]] = {"sha256": found} if found else {"unknown": os.urandom(16).hex()}   # equal to none
    return _digest(dumped)


def same_split(recorded: str | None, cfg: Any, family: str, root: Path = Path("."), today: str | None = None) -> bool:
    """Whether ``recorded`` (a champion's ``data_params``) is today's, or the one the same params gave before: with
    ``ENCODING`` fields hashed (recorded until 2026-12-06), with only the data block's own ``LOCATION`` fields left
    out (recorded 2026-12-04 to 2026-12-06), or the whole block's hash (recorded until 2026-12-04: every field of the
    block as it was then, by alias). A block of then lacked the ``LOCATION`` fields added since (where the files are
    found, what a published set holds), which decide no row whatever they hold: the whole block's hash counts with
    any of them left out, never with another field left out or changed. Those earlier forms hashed a ``CONTENT``
    field's path, which says nothing of the rows, and no ``ROWS``: while either is set, only today's counts.
    ``today``: ``data_params`` of these params, when the caller has it (hashing a folder's content again is I/O)."""
    block = cfg.block("data", family)
    if recorded == (today or data_params(cfg, family, root)):
        return True
    if _contents(block) or getattr(type(block), "ROWS", None) is not None:   # (the earlier forms had no rules' version)
        return False
    top = set(getattr(type(block), "LOCATION", ()))
    return recorded in (_digest(_row_params(block, _left_out(block, ("LOCATION",)))),
                        _digest(_row_params(block, top)), *_whole_block_digests(block, sorted(top)))


def _whole_block_digests(block: Any, location: list[str]) -> Iterator[str]:
    """The whole-block hash (the first ``data_params``) of ``block`` lacking each set of its ``location`` fields:
    which of them a block of then lacked (releases added them one by one) no class records."""
    for size in range(len(location) + 1):
        for lacked in itertools.combinations(location, size):
            yield _digest(block.model_dump(by_alias=True, exclude=set(lacked)))


def content_paths(cfg: Any, kind: str = "CONTENT") -> list[str]:
    """Every file or folder a family's data block names as ``CONTENT`` (a user's corpus, an image folder), or as
    ``kind``: ``INPUTS`` names the files the stages read that decide no split (a user's table, a folder of the
    published files: where they are is a ``LOCATION``), which a copy of the project needs all the same."""
    return [value for family in cfg.families for _, value in _contents(cfg.block("data", family), kind=kind)]


def _contents(block: Any, keys: tuple[str, ...] = (), kind: str = "CONTENT") -> list[tuple[tuple[str, ...], str]]:
    """(keys in the dumped block, value) of every ``kind`` field that is set, in ``block`` and the blocks inside
    it."""
    from pydantic import BaseModel

    found = []
    for name, field in type(block).model_fields.items():
        inner, key = getattr(block, name), field.alias or name
        if name in getattr(type(block), kind, ()) and inner is not None:
            found.append(((*keys, key), inner))
        elif isinstance(inner, BaseModel):
            found.extend(_contents(inner, (*keys, key), kind))
    return found


def _row_params(block: Any, exclude: Any) -> dict[str, Any]:
    dumped = block.model_dump(by_alias=True, exclude=exclude)
    for key, before in getattr(type(block), "ADDED", {}).items():
        if dumped.get(key) == before:
            del dumped[key]
    return dumped


def _left_out(block: Any, kinds: tuple[str, ...]) -> dict[str, Any]:
    """The fields ``block``, the blocks inside it and the blocks its lists hold list in the ClassVars ``kinds``
    (``LOCATION``, ``ENCODING``), as pydantic's nested ``exclude``."""
    from pydantic import BaseModel

    exclude: dict[str, Any] = {name: True for kind in kinds for name in getattr(type(block), kind, ())}
    for name in type(block).model_fields:
        inner = getattr(block, name)
        if name in exclude:
            continue
        if isinstance(inner, BaseModel) and (found := _left_out(inner, kinds)):
            exclude[name] = found
        elif isinstance(inner, list) and inner and isinstance(inner[0], BaseModel) and (
                found := _left_out(inner[0], kinds)):   # a list holds blocks of one class
            exclude[name] = {"__all__": found}
    return exclude


def _digest(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


@contextmanager
def dvc_repo_lock(root: Path, wait: float = DVC_LOCK_WAIT_SECONDS) -> Iterator[None]:
    """Hold DVC's repository lock of ``root`` (nothing to hold without ``.dvc/``): DVC rewrites dvc.lock in place,
    truncating it first, while it holds that lock — and releases it while a stage's command runs, so a stage of one
    family reads dvc.lock while another family's DVC process may be writing it. The lock is of the kind DVC takes
    there: a hard-link lock where the project's DVC config sets ``core.hardlink_lock`` (NFS), else a file lock."""
    from dvc.config import Config
    from dvc.exceptions import DvcException
    from dvc.lock import LockError, make_lock

    if not (root / ".dvc").is_dir():
        yield
        return
    tmp = root / ".dvc" / "tmp"
    tmp.mkdir(exist_ok=True)
    try:
        hardlink = Config(dvc_dir=str(root / ".dvc"))["core"].get("hardlink_lock", False)
    except DvcException as err:   # DVC's own commands refuse the same config
        raise ConfigError(f"{root / '.dvc'}: DVC's config does not load: {err}") from None
    lock = make_lock(str(tmp / "lock"), tmp_dir=str(tmp), hardlink_lock=hardlink)
    deadline = time.monotonic() + wait
    while True:
        try:
            lock.lock()
            break
        except LockError as err:
            if time.monotonic() > deadline:
                raise LockBusy(f"{tmp / 'lock'}: DVC's repository lock stayed held for {wait:.0f} s by another DVC "
                               "process of the project (a push, a repro); try again when it is done") from err
            time.sleep(0.5)
    try:
        yield
    finally:
        lock.unlock()


def dvc_lock_text(root: Path = Path(".")) -> str | None:
    """dvc.lock as DVC last wrote it, whole (read holding DVC's lock); None when there is none."""
    with dvc_repo_lock(root):
        return (root / "dvc.lock").read_text() if (root / "dvc.lock").is_file() else None


def locked_outputs(root: Path = Path("."), text: str | None = None) -> dict[str, dict[str, Any]]:
    """Every stage output dvc.lock records, with DVC's hash (``md5``) and its ``size`` and ``nfiles`` (``text``:
    dvc.lock's content, when the caller has read it with ``dvc_lock_text``)."""
    text = dvc_lock_text(root) if text is None else text
    if text is None:
        return {}
    return {o["path"]: {"md5": o.get("md5", ""), **{k: o[k] for k in ("size", "nfiles") if k in o}}
            for entry in (load_yaml(text) or {}).get("stages", {}).values()
            for o in entry.get("outs", [])}


def remade_since(stage: str, lock_text: str | None) -> list[str]:
    """The inputs of ``stage``, and of every stage it depends on, that dvc.lock (``lock_text``) records with another
    hash than the stage making them last wrote: that stage ran again after (a new batch prepared whose validation
    then failed, a teacher retrained and not distilled from), so ``stage``'s outputs are not what its inputs give."""
    stages = (load_yaml(lock_text) or {}).get("stages", {}) if lock_text else {}
    made = {o["path"]: (name, o.get("md5")) for name, entry in stages.items() for o in entry.get("outs", [])}
    todo, seen, remade = [stage], set(), []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for dep in stages.get(name, {}).get("deps", []):
            if dep["path"] in made:
                producer, md5 = made[dep["path"]]
                if dep.get("md5") != md5:
                    remade.append(f"{dep['path']} (by {producer}, after {name} read it)")
                todo.append(producer)
    return sorted(remade)


def dvc_inputs(stage: str, root: Path = Path("."), lock_text: str | None = None) -> dict[str, dict[str, Any]]:
    """Each dep of ``stage`` with DVC's hash (``md5``): from dvc.lock (``lock_text``: its content, read already) for
    outputs of other stages (with their ``size`` and ``nfiles``), else the file's md5."""
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.exists():
        return {}
    spec = (load_yaml(dvc_yaml.read_text()) or {}).get("stages", {}).get(stage, {})
    if not spec.get("deps"):   # no stage of the graph (a gate's run): nothing to look up
        return {}
    locked = locked_outputs(root, lock_text)
    found = {}
    for dep in spec.get("deps", []):
        if dep in locked:
            found[dep] = locked[dep]
        elif (root / dep).is_file():
            found[dep] = {"md5": file_digest(root / dep, "md5"), "size": (root / dep).stat().st_size}
    return found


def dvc_input_hashes(stage: str, root: Path = Path("."), lock_text: str | None = None) -> dict[str, str]:
    """DVC's hash of each dep of ``stage``: from dvc.lock for outputs of other stages, else the file's md5."""
    return {dep: found["md5"] for dep, found in dvc_inputs(stage, root, lock_text).items()}


DATA_ROOT = "data"   # a stage's inputs under it are data sets: MLflow dataset inputs of its run
#: What a run does with the data it reads (MLflow's ``mlflow.data.context``), by the kind of stage: a stage's name
#: without its family suffix. Any other stage trains on it.
DATA_CONTEXT = {"validate": "validation", "export": "evaluation", "evaluate": "evaluation"}


def data_context(stage: str) -> str:
    return DATA_CONTEXT.get(stage.rsplit("_", 1)[0], "training")


def dataset_inputs(found: dict[str, dict[str, Any]], root: Path, context: str) -> list[Any]:
    """MLflow dataset inputs for the paths of ``found`` (path -> DVC's md5, size, nfiles) under ``DATA_ROOT``:
    name = the path, digest = DVC's hash, source = the folder, profile = its size and file count."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    return [DatasetInput(Dataset(name=path, digest=entry["md5"], source_type="local",
                                 source=json.dumps({"uri": str((root / path).resolve())}),
                                 profile=json.dumps({k: entry[k] for k in ("size", "nfiles") if k in entry})),
                         tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
            for path, entry in found.items() if Path(path).parts[0] == DATA_ROOT and entry["md5"]]


def lineage_tags(stage: str | None, cfg: Any, root: Path = Path("."),
                 inputs: dict[str, dict[str, Any]] | None = None) -> dict[str, str]:
    """git state (in a scratch copy, its project's: ``SOURCE_GIT_ENV``), ``params.hash`` of ``cfg`` and, for a
    stage, DVC's hash of each of its inputs (``inputs``: what ``dvc_inputs`` returned for it, when the caller has read
    them already)."""
    tags = {**git_state(root), "params.hash": params_hash(cfg)}
    if (source := _copied_from(root)) is not None:   # a scratch copy: the project's state, the copy's commit beside
        tags = {**{k: v for k, v in tags.items() if k != "mlflow.source.git.commit"},
                "git.scratch_commit": tags["git.commit"], **source}
    if stage is not None:
        found = dvc_inputs(stage, root) if inputs is None else inputs
        tags.update({f"dvc.dep.{path}": entry["md5"] for path, entry in found.items()})
    return tags
