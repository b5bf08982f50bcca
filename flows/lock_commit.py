"""``dvc.lock`` in git, as DVC intends: after ingestion and after a continuous-training run the lock that records the
new data version, and what was trained on it, is committed — so ``git log dvc.lock`` is the data's history and
``dvc params diff`` / ``dvc metrics diff`` compare runs across commits.

Only ``dvc.lock`` goes into the commit; anything else, staged or not, stays as it was. Its content is read holding
DVC's repository lock (DVC rewrites ``dvc.lock`` in place: another family's run must not be writing it), and only a
lock that parses is committed; none while a merge, cherry-pick, revert or rebase is under way in the work tree
(git would conclude it with only dvc.lock changed). The user's git identity and hooks apply; without an identity
the commit is signed ``kdq-pipeline``. A project that keeps ``dvc.lock`` out of git (``.gitignore``) or is no git
work tree gets no commit. A lock that records params or code the commit does not hold (edited, not committed) is
committed with a warning naming those files.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from tasks.errors import PipelineError
from tasks.io import load_yaml, tools_env
from tasks.lineage import dvc_repo_lock, git_refusal

IDENTITY = ("-c", "user.name=kdq-pipeline", "-c", "user.email=kdq-pipeline@localhost")
LOCK_WAIT_SECONDS = 120
COMMIT_ATTEMPTS = 3   # a commit that raced another one is made again on top of it
RACED = "cannot lock ref 'HEAD'"   # git's words when HEAD moved under a commit


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)


def _warn(root: Path, why: str) -> None:
    print(f"warning: dvc.lock was not committed in {root}: {why}", file=sys.stderr)


def commit_lock(root: Path, message: str) -> str | None:
    """Commit ``root/dvc.lock`` alone; the new commit, or None when there is nothing to commit (no work tree, no lock,
    an ignored lock, no change) or it could not be (said on stderr; the lock stays as it was, unstaged).

    DVC's lock is held only while the lock's content is read into git's object store: the commit itself (and the
    user's hooks, such as the pre-commit ``dvc status`` that ``dvc install`` writes, which takes that lock too) runs
    after it is released, from that content."""
    if not (root / "dvc.lock").is_file():
        return None
    if _git(root, "rev-parse", "--is-inside-work-tree").returncode != 0:
        if (why := git_refusal(root)) is not None:   # else no work tree
            _warn(root, f"git refuses its repository ({why})")
        return None
    if _git(root, "check-ignore", "--quiet", "dvc.lock").returncode == 0:
        return None
    if (underway := _underway(root)) is not None:   # git commit would conclude it, dropping what it brings
        _warn(root, f"{underway} is under way in this work tree; it is committed by a later run once that is done")
        return None
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            with dvc_repo_lock(root, LOCK_WAIT_SECONDS):   # no DVC project: no DVC command writes this lock
                blob = _stored(root)
                head = _head(root)
        except PipelineError as err:
            _warn(root, str(err))
            return None
        if not blob:   # nothing new (another commit, racing this one, took the lock as it is now)
            return None
        commit, why = _commit(root, blob, message, head)
        # another commit landed since the lock was read (the user's hooks take seconds): git refuses to move HEAD
        # past it; the lock is read again (that commit may hold a newer one) and committed on top of it
        if commit is not None or RACED not in why or attempt == COMMIT_ATTEMPTS:
            break
        time.sleep(0.5 * attempt)
    if commit is None:
        _warn(root, why[-400:])
    elif unrecorded := _uncommitted_inputs(root, blob):
        print(f"warning: dvc.lock, committed in {root} as {commit[:10]}, records uncommitted changes to "
              f"{', '.join(unrecorded[:5])}{' ...' if len(unrecorded) > 5 else ''}: commit them too, or that commit "
              "does not reproduce this run", file=sys.stderr)
    return commit


def _uncommitted_inputs(root: Path, blob: str) -> list[str]:
    """The inputs the committed lock (``blob``) records that the commit (HEAD) does not hold as recorded: a file
    dependency whose content there is not the md5 the lock records (edited since, or not in git at all while git
    would track it), a params file whose values there differ from the lock's. Folders (data DVC versions), files git
    ignores (DVC outputs) and paths outside the repository are DVC's to version, not git's."""
    try:
        stages = (load_yaml(_git(root, "cat-file", "blob", blob).stdout) or {}).get("stages") or {}
        files = {d["path"]: d["md5"] for stage in stages.values() for d in stage.get("deps") or []
                 if isinstance(d.get("md5"), str) and not d["md5"].endswith(".dir")}
        params: dict[str, dict[str, Any]] = {}
        for stage in stages.values():
            for name, values in (stage.get("params") or {}).items():
                params.setdefault(name, {}).update(values or {})
    except (yaml.YAMLError, AttributeError, KeyError, TypeError):   # an odd lock: no warning rather than a failure
        return []
    top = Path(_git(root, "rev-parse", "--show-toplevel").stdout.strip()).resolve()
    in_repo = {path: (root / path).resolve().relative_to(top).as_posix() for path in {*files, *params}
               if "://" not in path and (root / path).resolve().is_relative_to(top)}
    committed = _committed_contents(root, list(in_repo.values()))
    ignored = set(_git(root, "check-ignore", "--", *[p for p in in_repo.values() if p not in committed]).stdout
                  .splitlines()) if len(committed) < len(in_repo) else set()
    differ = []
    for path, repo_path in in_repo.items():
        content = committed.get(repo_path)
        if content is None:
            if repo_path not in ignored:
                differ.append(path)
        elif path in params:
            try:
                held = load_yaml(content.decode()) or {}
            except (yaml.YAMLError, UnicodeDecodeError):
                held = {}
            if any(_dotted(held, key) != value for key, value in params[path].items()):
                differ.append(path)
        elif hashlib.md5(content).hexdigest() != files[path]:
            differ.append(path)
    return sorted(differ)


def _dotted(tree: Any, key: str) -> Any:
    """The value at a dotted params key (as dvc.lock names it), or a marker no value equals."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


_ABSENT = object()


def _committed_contents(root: Path, paths: list[str]) -> dict[str, bytes]:
    """The content HEAD holds of each of ``paths`` (repository-relative; git's filters not applied: git 2.39's
    ``--batch --filters`` refuses ``HEAD:<path>``); the paths HEAD does not hold are left out. One ``git cat-file``
    for all of them."""
    if not paths:
        return {}
    done = subprocess.run(["git", "cat-file", "--batch"], cwd=root, capture_output=True, check=False,
                          input="".join(f"HEAD:{path}\n" for path in paths).encode())
    out, at, found = done.stdout, 0, {}
    for path in paths:
        end = out.find(b"\n", at)
        if end < 0:
            break
        header = out[at:end].split()
        at = end + 1
        if len(header) == 3 and header[1] == b"blob":
            size = int(header[2])
            found[path] = out[at:at + size]
            at += size + 1
    return found


#: what a commit in the work tree would conclude (``git commit`` reads them, whatever index it is given)
UNDERWAY = {"MERGE_HEAD": "a merge", "CHERRY_PICK_HEAD": "a cherry-pick", "REVERT_HEAD": "a revert",
            "rebase-merge": "a rebase", "rebase-apply": "a rebase or git am"}


def _underway(root: Path) -> str | None:
    """The git operation under way in ``root``'s work tree (a merge with conflicts to resolve, ...), or None."""
    found = _git(root, "rev-parse", *(arg for name in UNDERWAY for arg in ("--git-path", name))).stdout.splitlines()
    return next((what for path, what in zip(found, UNDERWAY.values()) if path and (root / path).exists()), None)


def _stored(root: Path) -> str | None:
    """The object id of ``dvc.lock``'s content, written to git's object store; None when it has not changed since
    the last commit or does not parse (said on stderr)."""
    # untracked files listed whatever status.showUntrackedFiles says (with "no", a first lock was never committed)
    if not _git(root, "status", "--porcelain", "--untracked-files=normal", "--", "dvc.lock").stdout.strip():
        return None
    content = (root / "dvc.lock").read_bytes()
    try:
        load_yaml(content.decode())   # libyaml: 0.14 s, not 1.4 s, for 40 stages
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        _warn(root, f"it does not parse ({err})")
        return None
    done = subprocess.run(["git", "hash-object", "-w", "--path=dvc.lock", "--stdin"], cwd=root, input=content,
                          capture_output=True, check=False)   # --path: the file's .gitattributes filters apply
    if done.returncode != 0:
        _warn(root, done.stderr.decode(errors="replace").strip()[-400:])
        return None
    return done.stdout.decode().strip()


def _head(root: Path) -> str | None:
    return _git(root, "rev-parse", "--verify", "--quiet", "HEAD").stdout.strip() or None


def _commit(root: Path, blob: str, message: str, head: str | None) -> tuple[str | None, str]:
    """(a commit on ``head`` — HEAD when the lock was read — with ``dvc.lock`` replaced by ``blob``, or None and why
    not: ``RACED`` when HEAD moved since), made through an index of its own (what the user has staged stays staged,
    and out of it); the user's index then holds ``dvc.lock`` as committed."""
    identity = [] if _git(root, "config", "user.email").stdout.strip() else list(IDENTITY)
    where = _git(root, "rev-parse", "--show-prefix").stdout.strip()   # a DVC project in a folder of the repo
    with tempfile.TemporaryDirectory() as scratch:
        # LC_ALL=C: git's own words, whatever the user's locale, for RACED
        # and this interpreter's tools first on PATH: the `dvc` of the hooks `dvc install` puts in .git/hooks
        env = {**tools_env(), "GIT_INDEX_FILE": str(Path(scratch) / "index"), "LC_ALL": "C"}
        steps = [["read-tree", head or "--empty"],
                 ["update-index", "--add", "--cacheinfo", f"100644,{blob},{where}dvc.lock"],
                 [*identity, "commit", "--quiet", "-m", message]]
        for step in steps:
            # the commit still on ``head``? (git commit itself refuses a HEAD that moves once it has started)
            if step is steps[-1] and _head(root) != head:
                return None, f"{RACED}: HEAD moved since the lock was read"
            done = subprocess.run(["git", *step], cwd=root, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                return None, (done.stderr or done.stdout).strip() or f"git {step[0]} failed"
    _git(root, "reset", "--quiet", "--", "dvc.lock")   # the index entry: the committed lock, as git status shows it
    return _git(root, "rev-parse", "HEAD").stdout.strip(), ""
