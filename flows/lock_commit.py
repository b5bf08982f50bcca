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

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from tasks.config import param_at
from tasks.errors import PipelineError
from tasks.io import file_digest, load_yaml, tools_env
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
    """The inputs the committed lock (``blob``) records as they are in the work tree but that the commit (HEAD) does
    not hold so: a file dependency git finds modified, staged or untracked whose work-tree content has an md5 the lock
    records; a params file git finds so whose work-tree values of a key the lock records are the recorded ones and
    differ from HEAD's. Entries recording something else (another family's stages, not run since) say nothing of
    this run; folders (data DVC versions), files git ignores (DVC outputs), paths outside the repository and entries
    hashed otherwise than ``md5`` (DVC 2's ``md5-dos2unix``) are left out. (Not named: content edited again between
    the run and this commit, which the lock records and neither HEAD nor the work tree holds.)"""
    try:
        stages = (_yaml12(_git(root, "cat-file", "blob", blob).stdout) or {}).get("stages") or {}
        files = {(d["path"], d["md5"]) for stage in stages.values() for d in stage.get("deps") or []
                 if d.get("hash") == "md5" and isinstance(d.get("md5"), str) and not d["md5"].endswith(".dir")}
        recorded = [(name, values) for stage in stages.values() for name, values in (stage.get("params") or {}).items()]
    except Exception:  # noqa: BLE001 - an odd lock: no warning rather than a failed commit
        return []
    top = Path(_git(root, "rev-parse", "--show-toplevel").stdout.strip()).resolve()
    here = root.resolve()
    in_repo = {}   # a lock path -> git's names of it (top-relative: a symlink's own, and the file it points to)
    for path in {path for path, _ in files} | {name for name, _ in recorded}:
        if "://" in path or "\n" in path:
            continue
        names = [full.relative_to(top).as_posix() for full in (Path(os.path.normpath(here / path)),
                                                                 (here / path).resolve()) if full.is_relative_to(top)]
        if names:
            in_repo[path] = names
    differ = []
    for path in _git_changed(top, in_repo):
        if (root / path).is_file() and (path, file_digest(root / path, "md5")) in files:
            differ.append(path)
        elif any(name == path for name, _ in recorded) and (root / path).is_file():
            held = subprocess.run(["git", "show", f"HEAD:{in_repo[path][0]}"], cwd=root, capture_output=True,
                                  check=False)
            now = _yaml12((root / path).read_text(errors="replace"))
            then = _yaml12(held.stdout.decode(errors="replace")) if held.returncode == 0 else {}
            if isinstance(now, dict) and isinstance(then, dict) and any(   # (no YAML mapping: not judged)
                    param_at(now, key) == value and param_at(then, key) != value
                    for name, values in recorded if name == path for key, value in values.items()):
                differ.append(path)
    return sorted(differ)


def _yaml12(text: str) -> Any:
    """``text`` read as DVC reads YAML (1.2: ``5e-05`` is a float, as DVC writes it in dvc.lock); None when it does
    not parse."""
    from dvc.utils.serialize import loads_yaml

    try:
        return loads_yaml(text) or {}
    except Exception:  # noqa: BLE001 - DVC's parse errors have no common base it exports
        return None


def _git_changed(top: Path, paths: dict[str, list[str]]) -> list[str]:
    """Which of ``paths`` (a name -> its paths relative to the repository's ``top``) git finds modified, staged or
    untracked (not ignored) under one of its paths; none when git cannot say. No optional lock: git status would
    otherwise rewrite the index under the user's own git commands."""
    if not paths:
        return []
    names = sorted({name for found in paths.values() for name in found})
    done = subprocess.run(["git", "--no-optional-locks", "--literal-pathspecs", "status", "--porcelain", "-z",
                           "--untracked-files=all", "--", *names], cwd=top, capture_output=True, check=False)
    if done.returncode != 0:
        return []
    changed, skip = set(), False
    for entry in done.stdout.decode(errors="surrogateescape").split("\0"):
        if skip or len(entry) < 4:   # a rename's or copy's source path; the end
            skip = False
            continue
        skip = "R" in entry[:2] or "C" in entry[:2]
        changed.add(entry[3:])   # relative to the repository's top
    return [path for path, found in paths.items() if changed.intersection(found)]


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
    if not _git(root, "--no-optional-locks", "status", "--porcelain", "--untracked-files=normal", "--",
                "dvc.lock").stdout.strip():
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
