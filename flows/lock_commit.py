"""``dvc.lock`` in git, as DVC intends: after a continuous-training run the lock that records the new data version,
and what was trained on it, is committed — so ``git log dvc.lock`` is the data's history and ``dvc params diff`` /
``dvc metrics diff`` compare runs across commits.

Only ``dvc.lock`` goes into the commit; anything else, staged or not, stays as it was. The user's git identity and
hooks apply; without an identity the commit is signed ``kdq-pipeline``. A project that keeps ``dvc.lock`` out of git
(``.gitignore``) or is no git work tree gets no commit.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

IDENTITY = ("-c", "user.name=kdq-pipeline", "-c", "user.email=kdq-pipeline@localhost")


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)


def commit_lock(root: Path, message: str) -> str | None:
    """Commit ``root/dvc.lock`` alone; the new commit, or None when there is nothing to commit (no work tree, no lock,
    an ignored lock, no change) or git refused (a hook: said on stderr, the lock stays as it is)."""
    lock = root / "dvc.lock"
    if not lock.is_file() or _git(root, "rev-parse", "--is-inside-work-tree").returncode != 0:
        return None
    if _git(root, "check-ignore", "--quiet", "dvc.lock").returncode == 0:
        return None
    if not _git(root, "status", "--porcelain", "--", "dvc.lock").stdout.strip():
        return None
    identity = [] if _git(root, "config", "user.email").stdout.strip() else list(IDENTITY)
    added = _git(root, "add", "--", "dvc.lock")
    done = added if added.returncode else _git(root, *identity, "commit", "--quiet", "-m", message, "--", "dvc.lock")
    if done.returncode != 0:
        print(f"warning: dvc.lock was not committed in {root}: {(done.stderr or done.stdout).strip()[-400:]}",
              file=sys.stderr)
        return None
    return _git(root, "rev-parse", "HEAD").stdout.strip()
