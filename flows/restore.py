"""Restore what a registered model version was trained on — its code, params and raw data — and re-run it.

    python -m flows.restore --family recsys --version 3 DEST             # restore into DEST, then run the family there
    python -m flows.restore --name NAME --version 3 DEST --no-run        # restore only

Everything comes from the version and its registering run: the code is the git commit the version records
(``git.commit``), checked out of this project's repository into DEST; ``params.yaml`` and ``dvc.lock`` are the
run's ``lineage/`` artifacts (params overridden at run time included), checked against the version's ``params.hash``
by DEST's own code; the raw data is the version of the family's snapshot stage (``snapshot_<family>``) that
``dvc.lock`` records (and the champion's weights a warm-started run began from, ``warm_start_<family>``), pulled
from DEST's default DVC remote, else this project's, else this project's DVC cache (a
family without a snapshot stage reads its pinned, checksum-verified sources). The re-run is DEST's own
``python -m flows.pipeline --family F --no-promote``, tracked in this project's store (``MLFLOW_TRACKING_URI``, else
its ``tracking.uri``, else its ``mlflow.db``): a re-run that builds the same INT8 file finds it already registered and
changes nothing; one that differs (another CPU, other threads) is registered as a challenger and never moves
``champion``. A refusal leaves DEST as it was found: the folder it created removed, an empty one left empty.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from configobj import ConfigObj  # DVC reads and writes its config files with it
from mlflow.exceptions import MlflowException

from flows.gating import LINEAGE, LINEAGE_FILES
from flows.registry import registered_model
from tasks.config import load_config
from tasks.errors import PipelineError, run_cli
from tasks.io import load_yaml, tools_env
from tasks.mlflow_store import client_for, is_server_call_error, redact, server_error, tracking_uri

NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
PARAMS_HASH = ("from tasks.config import load_config; from tasks.lineage import params_hash; "
               "print(params_hash(load_config('params.yaml')))")


def _run(args: list[str], cwd: Path, what: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        # DVC's reason: from its first "ERROR:" line on (the files it names and its hint follow it), in one line
        first = next((i for i, line in enumerate(said) if line.startswith("ERROR: ")), None)
        why = " ".join(said[first:])[:800] if first is not None else " ".join(said)[-800:]
        raise PipelineError(f"{what} failed in {cwd}: {why}")
    return done.stdout.strip()


def _env(dest: Path) -> dict[str, str]:
    return {**tools_env(), "PYTHONPATH": str(dest)}


def check_dest(dest: Path) -> None:
    """DEST is an empty folder or none yet (before: a file was a NotADirectoryError traceback)."""
    if dest.exists() and not dest.is_dir():
        raise PipelineError(f"{dest}: a file, not a folder; restore writes into an empty or new folder")
    if dest.exists() and any(dest.iterdir()):
        raise PipelineError(f"{dest}: not empty; restore writes into an empty or new folder")


@contextmanager
def as_found_on_failure(dest: Path) -> Iterator[None]:
    """DEST as this run found it when what runs inside fails (a refusal, Ctrl-C): the folder this run created removed
    (with the parents it created), a folder that was empty emptied again, any other left alone. Before: a refusal
    after the clone left DEST a full clone, and the same command again said "not empty"."""
    created = dest
    while not created.parent.exists():   # git clone creates DEST's missing parents too
        created = created.parent
    existed, was_empty = dest.exists(), dest.is_dir() and not any(dest.iterdir())
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(created, ignore_errors=True)
        elif was_empty:
            for child in list(dest.iterdir()):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        raise


def checkout_code(root: Path, commit: str, dest: Path) -> Path:
    """DEST as a clone of ``root``'s repository at ``commit`` (detached); return the project in it: DEST, or the
    folder of DEST that ``root`` is of its repository (a DVC project in a folder of a monorepo)."""
    check_dest(dest)
    top = _run(["git", "rev-parse", "--show-toplevel"], root, "git rev-parse")
    where = _run(["git", "rev-parse", "--show-prefix"], root, "git rev-parse")
    _run(["git", "clone", "--quiet", "--no-checkout", top, str(dest)], root, "git clone")
    try:
        _run(["git", "checkout", "--quiet", "--detach", commit], dest, f"git checkout {commit}")
    except PipelineError as err:
        raise PipelineError(f"commit {commit} is not in {root}'s history (was it pushed?): {err}") from err
    return dest / where if where else dest


def restore_lineage(client, version, dest: Path) -> None:
    """params.yaml and dvc.lock of the registering run into DEST."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(client.download_artifacts(version.run_id, LINEAGE, tmp))
        except Exception as err:  # noqa: BLE001 — any store's "not found"
            if is_server_call_error(err) and getattr(err, "error_code", None) != NOT_FOUND:
                raise server_error(err, f"tracking server {redact(client.tracking_uri)}",
                                   f"{version.name} version {version.version} was not restored") from None
            raise PipelineError(f"{version.name} version {version.version}: its run {version.run_id} holds no "
                                f"{LINEAGE}/ artifacts (registered before they were logged): {redact(str(err))}"
                                ) from None
        for name in LINEAGE_FILES:
            if (local / name).is_file():
                shutil.copy2(local / name, dest / name)
    missing = [name for name in LINEAGE_FILES if not (dest / name).is_file()]
    if missing:
        raise PipelineError(f"run {version.run_id}: {LINEAGE}/ lacks {', '.join(missing)}; without them the data "
                            "and params it was trained on are not known")


def check_params(dest: Path, expected: str | None) -> None:
    """The restored params resolve to the hash the version records (computed by DEST's own code)."""
    got = _run([sys.executable, "-c", PARAMS_HASH], dest, "hashing the restored params", _env(dest))
    if expected and got.splitlines()[-1] != expected:
        raise PipelineError(f"{dest / 'params.yaml'}: resolves to params.hash {got[:12]}…, the version records "
                            f"{expected[:12]}…")


def _remote_candidates(root: Path) -> list[dict[str, str] | None]:
    """Where the data can come from: DEST's default remote (None), this project's default remote with all its
    settings (of every level of its DVC config: an ``endpointurl`` set with ``dvc remote modify --local`` too, without
    which an S3 remote is AWS's), its cache."""
    found: list[dict[str, str] | None] = [None]
    try:
        listed = _run([sys.executable, "-m", "dvc", "config", "--list"], root, "dvc config --list", _env(root))
    except PipelineError:
        listed = ""
    config = dict(line.split("=", 1) for line in listed.splitlines() if "=" in line)   # relative URLs resolved
    prefix = f"remote.{config.get('core.remote')}."
    remote = {key.removeprefix(prefix): value for key, value in config.items() if key.startswith(prefix)}
    if "url" in remote:
        found.append(remote)
    found.append({"url": str((root / ".dvc" / "cache").resolve())})
    return found


def restore_data(root: Path, dest: Path, family: str) -> str:
    """Check out the family's snapshot as DEST's dvc.lock records it, and the weights a warm-started version began
    from (``warm_start_<family>``, when the graph has it: re-run, that stage would ask today's registry); return
    where the data came from."""
    from flows.stage_graph import NoStage, stage_paths

    stage = f"snapshot_{family}"
    try:
        stage_paths(dest, stage)
    except NoStage:
        return "pinned sources (no snapshot stage at that commit)"
    source = _pull(root, dest, stage, "the data version dvc.lock records")
    try:
        stage_paths(dest, f"warm_start_{family}")
    except NoStage:
        return source
    _pull(root, dest, f"warm_start_{family}", "the weights its training started from (pushed by the pipeline run "
          "that made them; a run without a default DVC remote keeps them in its machine's DVC cache only)")
    return source


def _use_remote(dest: Path, remote: dict[str, str]) -> None:
    """DEST's local DVC config (``.dvc/config.local``, readable by its owner only) names ``remote`` as
    ``restore-source``, replacing the settings of the remote tried before. Written to the file, not passed to
    ``dvc remote modify``: a secret on a command line is seen by every user of the machine (``ps``)."""
    path = dest / ".dvc" / "config.local"
    path.touch(mode=0o600)
    path.chmod(0o600)
    config = ConfigObj(str(path), encoding="utf-8")
    config['remote "restore-source"'] = dict(remote)
    config.write()


def _pull(root: Path, dest: Path, stage: str, what: str) -> str:
    """``dvc pull`` the stage's outputs into DEST from the first place that has them; return which."""
    if stage not in (load_yaml((dest / "dvc.lock").read_text()) or {}).get("stages", {}):
        raise PipelineError(f"{dest / 'dvc.lock'} (its run's {LINEAGE}/dvc.lock) records no {stage}: which outputs "
                            "to pull is not known; the version cannot be restored")
    dvc, env, errors = [sys.executable, "-m", "dvc"], _env(dest), []
    for remote in _remote_candidates(root):
        try:
            if remote is None:
                _run([*dvc, "pull", stage], dest, f"dvc pull {stage}", env)
                return "DEST's default DVC remote"
            url = remote["url"]
            _use_remote(dest, remote)
            _run([*dvc, "pull", "-r", "restore-source", stage], dest, f"dvc pull {stage} from {redact(url)}", env)
            return redact(url)   # named in messages: a URL's password masked
        except PipelineError as err:
            errors.append(str(err))
    raise PipelineError(f"{stage}: {what} is in no DVC remote or cache tried ({'; '.join(errors)})")


def restore(root: Path, family: str, name: str, version_id: str, dest: Path, run: bool) -> int:
    check_dest(dest)
    cfg = load_config(root / "params.yaml")
    uri = tracking_uri(cfg, root)
    client, version, commit = _restorable(uri, name, version_id)
    with tempfile.TemporaryDirectory() as lineage, as_found_on_failure(dest):
        # the run's lineage/ first: a version registered without it is refused before anything is cloned
        restore_lineage(client, version, Path(lineage))
        dest = checkout_code(root, commit, dest)   # the project's folder of the clone
        for file in LINEAGE_FILES:
            shutil.copy2(Path(lineage) / file, dest / file)
        check_params(dest, version.tags.get("params.hash"))
        source = restore_data(root, dest, family)
    if version.tags.get("git.dirty") == "true":
        print(f"warning: version {version_id} was trained from uncommitted changes on top of {commit[:12]}; "
              "only the commit is restored", file=sys.stderr)
    print(f"restored {name} version {version_id} into {dest}: code {commit[:12]}, params and dvc.lock of run "
          f"{version.run_id}, data from {source}")
    if not run:
        return 0
    return rerun(dest, family, uri)


def _restorable(uri: str, name: str, version_id: str) -> tuple[Any, Any, str]:
    """A client of the store at ``uri``, version ``version_id`` of ``name`` in it and the commit it records; a
    PipelineError when it is not there or records no commit it can be restored from."""
    database = uri.removeprefix("sqlite:///").split("?", 1)[0]   # (a URL's query: SQLAlchemy's options)
    if uri.startswith("sqlite:///") and not Path(database).is_file():   # opening it would create an empty store
        raise PipelineError(f"no tracking store at {redact(uri)}: {database} does not exist; set MLFLOW_TRACKING_URI "
                            f"or tracking.uri to the store {name} version {version_id} was registered in")
    client = client_for(uri)
    try:
        version = client.get_model_version(name, version_id)
    except MlflowException as err:
        if err.error_code != NOT_FOUND:   # a server that did not answer, refused credentials, a malformed version
            raise server_error(err, f"registry {redact(uri)}", f"{name} version {version_id} was not restored"
                               ) from None
        raise PipelineError(f"--version {version_id}: {name} has no such version in {redact(uri)} "
                            f"({err.error_code})") from None
    commit = version.tags.get("git.commit", "none")
    if commit == "none":
        raise PipelineError(f"{name} version {version_id} records no git commit: it cannot be restored")
    project = version.tags.get("sweep.source_commit", commit)
    if project != commit:   # registered by a sweep before its lineage named the project's commit and data
        raise PipelineError(f"{name} version {version_id}: git.commit {commit[:12]} is its sweep recipe's scratch "
                            f"copy's (the project was at {project[:12]}) and its run's dvc.lock records no data "
                            "version: it cannot be restored; re-run the sweep to register one that can")
    return client, version, commit


def rerun(dest: Path, family: str, uri: str) -> int:
    """DEST's pipeline for ``family``, tracked and registered at ``uri`` (the project's store: DEST's own would be
    a new one, where the version it rebuilds is not); its exit code."""
    # a rebuild never moves champion: built elsewhere (other CPU, other threads) it may differ from what was gated
    return subprocess.run([sys.executable, "-m", "flows.pipeline", "--family", family, "--no-promote"], cwd=dest,
                          env={**_env(dest), "MLFLOW_TRACKING_URI": uri}, check=False).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("dest", type=Path, help="an empty or new folder")
    parser.add_argument("--version", required=True)
    parser.add_argument("--name", help="registered model (default: gate.<family>.registered_model)")
    parser.add_argument("--family", help="whose registered model, without --name")
    parser.add_argument("--no-run", action="store_true", help="restore only; do not re-run the pipeline")
    parser.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args()
    root = args.root.resolve()
    cfg = load_config(root / "params.yaml")
    model = registered_model(cfg, args.family)   # an unknown --family refused, with --name too
    name = args.name or model
    family = args.family or next((f for f in cfg.families if cfg.block("gate", f).registered_model == name), None)
    if family is None:
        raise PipelineError(f"--name {name}: no family of params.yaml registers it; name it with --family")
    sys.exit(restore(root, family, name, args.version, args.dest.resolve(), not args.no_run))

if __name__ == "__main__":
    run_cli(main)
