"""dvc.lock is committed after a run, alone: the user's other changes stay uncommitted, an ignored lock or a folder
outside git gets no commit, and a machine without a git identity still records it."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flows.lock_commit import commit_lock
from tasks.errors import ConfigError, LockBusy
from tasks.lineage import dvc_repo_lock, git_state, lineage_tags, source_git_env


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A git work tree whose git knows no user (no global or system config)."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "--quiet")
    (repo / "params.yaml").write_text("a: 1\n")
    _git(repo, "add", "params.yaml")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "sources")
    return repo


def test_the_lock_alone_is_committed_with_the_pipelines_identity(repo):
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (repo / "params.yaml").write_text("a: 2\n")   # the user's edit, staged: not the pipeline's to commit
    _git(repo, "add", "params.yaml")
    commit = commit_lock(repo, "recsys: batches 0003 accepted")
    assert commit == _git(repo, "rev-parse", "HEAD")
    assert _git(repo, "show", "--name-only", "--format=%an|%s", "HEAD").splitlines() == [
        "kdq-pipeline|recsys: batches 0003 accepted", "", "dvc.lock"]
    assert _git(repo, "status", "--porcelain") == "M  params.yaml"   # still staged, still uncommitted
    assert commit_lock(repo, "again") is None   # nothing changed since
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {a: {}}\n")
    assert git_state(repo)["git.dirty"] == "true"   # the params edit; a changed lock alone is not code
    _git(repo, "reset", "--quiet", "--hard")
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {b: {}}\n")
    assert git_state(repo)["git.dirty"] == "false"


@pytest.mark.fault("runs", "a run's dvc.lock is committed while params.yaml or code it records is uncommitted",
                   "the lock is committed and a warning names the uncommitted files it records (before: silent; "
                   "`dvc params diff` against that commit showed nothing of values no commit held)")
def test_a_lock_recording_uncommitted_params_or_code_is_committed_with_a_warning_naming_them(repo, tmp_path, capsys):
    import hashlib

    def md5(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()

    (repo / ".gitignore").write_text("/models/\n/made.yaml\n")
    (repo / "train.py").write_text("print(1)\n")
    (repo / "params.yaml").write_bytes(b"# \xe9t\xe9 (Latin-1)\na: 1\nlr: 0.00005\n")
    (repo / "real.py").write_text("r = 1\n")
    (repo / "link.py").symlink_to("real.py")
    (repo / "made.yaml").write_text("c: 1\n")   # a params file git ignores (a stage writes it): DVC's, not named
    _git(repo, "add", "train.py", ".gitignore", "params.yaml", "real.py", "link.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "code")
    (repo / "models").mkdir()
    (repo / "models" / "m.pt").write_text("weights")
    (tmp_path / "outside.csv").write_text("x\n")   # a dependency outside the repository (a user's data folder)

    def stage(name: str, code: str, a: int, more: str = "", linked: str = "r = 1\n") -> str:
        deps = [("train.py", md5(code)), ("data/raw", "0" * 32 + ".dir"), ("models/m.pt", md5("weights")),
                (str(tmp_path / "outside.csv"), md5("x\n")), ("link.py", md5(linked))]
        return (f"  {name}:\n    cmd: python train.py\n    deps:\n"
                + "".join(f"    - path: {path}\n      hash: md5\n      md5: {digest}\n" for path, digest in deps)
                + more + f"    params:\n      params.yaml:\n        a: {a}\n        lr: 5e-05\n"   # as DVC writes it
                + "      made.yaml:\n        c: 1\n")

    # another family's stage, not run since the code and params it records were edited and committed: not this run's
    older = stage("train_other", "print(0)\n", 0)
    (repo / "dvc.lock").write_text(f"schema: '2.0'\nstages:\n{stage('train', 'print(1)' + chr(10), 1)}{older}")
    (repo / "params.yaml").write_text("a: 1\nlr: 0.00005\nb: 2\n")   # an edit of a key no stage records
    assert commit_lock(repo, "clean") is not None
    assert "warning" not in capsys.readouterr().err   # what it records is what HEAD holds

    (repo / "params.yaml").write_text("a: 2\nlr: 0.00005\n")   # the user's edits, one staged, none committed, one
    (repo / "train.py").write_text("print(2)\n")               # file never added
    _git(repo, "add", "train.py")
    (repo / "new_family.py").write_text("x = 1\n")
    (repo / "real.py").write_text("r = 2\n")   # read through a symlink git holds
    new = f"    - path: new_family.py\n      hash: md5\n      md5: {md5('x = 1' + chr(10))}\n"
    (repo / "dvc.lock").write_text(
        f"schema: '2.0'\nstages:\n{stage('train', 'print(2)' + chr(10), 2, new, 'r = 2' + chr(10))}{older}")
    commit = commit_lock(repo, "dirty")
    assert commit == _git(repo, "rev-parse", "HEAD")
    err = capsys.readouterr().err.strip()
    assert err == (f"warning: dvc.lock, committed in {repo} as {commit[:10]}, records uncommitted changes to "
                   "link.py, new_family.py, params.yaml, train.py: commit them too, or that commit does not reproduce "
                   "this run")
    assert _git(repo, "show", "--name-only", "--format=", "HEAD") == "dvc.lock"   # still the lock alone


def test_a_lock_of_a_dvc_project_in_a_folder_of_the_repository_names_its_own_uncommitted_files(repo, capsys):
    import hashlib

    project = repo / "proj"
    (project / "models").mkdir(parents=True)
    (project / ".gitignore").write_text("/models/\n")
    (project / "models" / "m.pt").write_text("weights")
    (project / "train.py").write_text("print(1)\n")
    _git(repo, "add", "proj")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "project")
    (project / "train.py").write_text("print(2)\n")
    deps = {"train.py": "print(2)\n", "models/m.pt": "weights"}
    (project / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train:\n    cmd: python train.py\n    deps:\n" + "".join(
        f"    - path: {path}\n      hash: md5\n      md5: {hashlib.md5(text.encode()).hexdigest()}\n"
        for path, text in deps.items()))
    commit = commit_lock(project, "in a folder")
    assert capsys.readouterr().err.strip() == (
        f"warning: dvc.lock, committed in {project} as {commit[:10]}, records uncommitted changes to train.py: commit "
        "them too, or that commit does not reproduce this run")   # the ignored output is DVC's, not named


def test_a_first_lock_is_committed_whatever_git_status_shows_of_untracked_files(repo):
    """Before: with ``status.showUntrackedFiles=no`` git status listed nothing for the new dvc.lock and it was never
    committed."""
    _git(repo, "config", "status.showUntrackedFiles", "no")
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert commit_lock(repo, "first lock") == _git(repo, "rev-parse", "HEAD")


@pytest.mark.fault("runs", "the user (or another family's run) commits while the pipeline's commit of dvc.lock runs "
                   "(its hooks take seconds)",
                   "the lock is read again and committed on top of that commit, whose changes stay in; a newer lock "
                   "it committed is kept (before: git refused to move HEAD past it and the lock's commit was dropped "
                   "with a warning)")
@pytest.mark.parametrize("newer_lock", [False, True])
def test_a_commit_made_while_the_lock_is_committed_stays_in(repo, newer_lock):
    (repo / "b.txt").write_text("before\n")
    _git(repo, "add", "b.txt")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "b")
    newer = "echo \"schema: '2.0'\" > dvc.lock && echo 'stages: {b: {}}' >> dvc.lock && git add dvc.lock && "
    hook = repo / ".git" / "hooks" / "pre-commit"   # someone commits while the hook runs, once
    hook.write_text("#!/bin/sh\n[ -e .git/raced ] && exit 0\ntouch .git/raced\nunset GIT_INDEX_FILE\n"
                    f"echo after > b.txt && git add b.txt && {newer if newer_lock else ''}"
                    "git -c user.name=u -c user.email=u@u commit --quiet --no-verify -m user\n")
    hook.chmod(0o755)
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    commit = commit_lock(repo, "recsys: trained")
    assert (repo / ".git" / "raced").exists() and _git(repo, "show", "HEAD:b.txt") == "after"
    if newer_lock:   # what it read is older than what the other commit holds: nothing of it is committed
        assert commit is None and _git(repo, "log", "--format=%s", "-2").splitlines() == ["user", "b"]
        assert _git(repo, "show", "HEAD:dvc.lock") == "schema: '2.0'\nstages: {b: {}}"
    else:
        assert commit == _git(repo, "rev-parse", "HEAD")
        assert _git(repo, "log", "--format=%s", "-3").splitlines() == ["recsys: trained", "user", "b"]
        assert _git(repo, "show", "--name-only", "--format=", "HEAD") == "dvc.lock"
    assert _git(repo, "status", "--porcelain") == ""


def test_an_ignored_lock_or_a_folder_outside_git_gets_no_commit(repo, tmp_path):
    (repo / ".gitignore").write_text("dvc.lock\n")
    (repo / "dvc.lock").write_text("stages: {}\n")
    head = _git(repo, "rev-parse", "HEAD")
    assert commit_lock(repo, "m") is None and _git(repo, "rev-parse", "HEAD") == head
    outside = tmp_path / "plain"
    outside.mkdir()
    (outside / "dvc.lock").write_text("stages: {}\n")
    assert commit_lock(outside, "m") is None


@pytest.mark.fault("runs", "a run commits dvc.lock while the user resolves a merge in the same work tree",
                   "no commit, said on stderr (before: git concluded the merge with HEAD's tree plus dvc.lock, the "
                   "other branch's changes lost); committed by the first run after the merge")


def test_no_commit_while_a_merge_or_a_cherry_pick_is_under_way(repo, capsys):
    """Before: ``git commit`` through the pipeline's own index still read ``MERGE_HEAD``, so a lock committed while
    the user was resolving a merge concluded it as a two-parent commit of HEAD's tree plus dvc.lock: the other
    branch recorded as merged, its changes lost. Now the lock waits (uncommitted, said on stderr) until the user
    has finished."""
    def user_commit(*args: str) -> None:
        _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", *args)

    (repo / "f").write_text("base\n")
    user_commit("add", "f")
    user_commit("commit", "--quiet", "-m", "f")
    _git(repo, "checkout", "--quiet", "-b", "other")
    (repo / "f").write_text("theirs\n")
    user_commit("commit", "--quiet", "-am", "theirs")
    _git(repo, "checkout", "--quiet", "-")
    (repo / "f").write_text("ours\n")
    user_commit("commit", "--quiet", "-am", "ours")
    merge = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "merge", "other"]
    assert subprocess.run(merge, cwd=repo, capture_output=True, check=False).returncode == 1   # a conflict
    head = _git(repo, "rev-parse", "HEAD")
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert commit_lock(repo, "vision: batch accepted") is None
    assert _git(repo, "rev-parse", "HEAD") == head and (repo / ".git/MERGE_HEAD").is_file()
    assert "a merge is under way" in capsys.readouterr().err
    _git(repo, "merge", "--abort")
    assert commit_lock(repo, "vision: batch accepted") == _git(repo, "rev-parse", "HEAD") != head


@pytest.mark.slow
def test_a_refused_commit_or_a_held_dvc_lock_leaves_the_lock_as_it_was(repo, monkeypatch, capsys):
    from flows import lock_commit
    from tests.conftest import dvc_lock

    (repo / "dvc.lock").write_text("stages: {}\n")
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'no commits today' >&2\nexit 1\n")
    hook.chmod(0o755)
    assert commit_lock(repo, "m") is None and "no commits today" in capsys.readouterr().err
    assert _git(repo, "status", "--porcelain", "--", "dvc.lock") == "?? dvc.lock"   # not left staged
    hook.unlink()
    held = dvc_lock(repo)   # a DVC command writing the lock now
    monkeypatch.setattr(lock_commit, "LOCK_WAIT_SECONDS", 0)
    try:
        assert commit_lock(repo, "m") is None and "repository lock" in capsys.readouterr().err
        # the gate's and a stage's read of dvc.lock: a later try may pass
        with pytest.raises(LockBusy, match=r"DVC's repository lock stayed held for 1 s") as busy, \
                dvc_repo_lock(repo, wait=1):
            pass
        assert busy.value.transient
    finally:
        held.close()
    (repo / "dvc.lock").write_text("stages: [unclosed\n")   # half-written
    assert commit_lock(repo, "m") is None and "does not parse" in capsys.readouterr().err
    (repo / "dvc.lock").write_text("stages: {}\n")
    assert commit_lock(repo, "m") is not None


@pytest.mark.slow
def test_the_lock_is_committed_where_dvc_install_put_dvcs_git_hooks(repo, monkeypatch):
    """DVC's pre-commit hook runs ``dvc status``, which takes DVC's repository lock: the commit was made holding that
    lock, so with the hooks installed every commit failed ("Unable to acquire lock") and dvc.lock was never
    committed."""
    import sys

    # the pipeline's interpreter is not on PATH (`.venv/bin/python -m flows.ingest`, a worker, CI): before, the hook's
    # `dvc` was not found and the lock not committed
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    for args in (["init", "--quiet"], ["install"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True, capture_output=True)
    assert "dvc git-hook pre-commit" in (repo / ".git" / "hooks" / "pre-commit").read_text()
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    commit = commit_lock(repo, "recsys: batches 0003 accepted")
    assert commit is not None and commit == _git(repo, "rev-parse", "HEAD")
    assert _git(repo, "show", "--name-only", "--format=%s", "HEAD").splitlines() == [
        "recsys: batches 0003 accepted", "", "dvc.lock"]
    assert _git(repo, "status", "--porcelain", "--", "dvc.lock") == ""


def test_a_dvc_project_in_a_folder_of_the_repository_commits_its_own_lock(repo):
    """``dvc init --subdir`` (a monorepo): the lock is the folder's, committed at its path, and the index agrees."""
    project = repo / "proj"
    project.mkdir()
    (project / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert commit_lock(project, "m") is not None
    assert _git(repo, "show", "--name-only", "--format=", "HEAD").splitlines() == ["proj/dvc.lock"]
    assert _git(repo, "status", "--porcelain") == ""


def test_a_dvc_project_in_a_folder_of_the_repository_is_restored_as_that_folder(repo, tmp_path):
    """Before: ``flows.restore`` cloned the project's folder, which in a monorepo is no repository ("repository
    '.../proj' does not exist"), while its lock was committed there. It clones the repository and restores the
    project as the same folder of the clone."""
    from flows.restore import checkout_code

    (repo / "proj").mkdir()
    (repo / "proj" / "params.yaml").write_text("b: 1\n")
    _git(repo, "add", "proj")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "project")
    commit = _git(repo, "rev-parse", "HEAD")
    (repo / "proj" / "params.yaml").write_text("b: 2\n")   # uncommitted: not restored
    project = checkout_code(repo / "proj", commit, tmp_path / "restored")
    assert project == tmp_path / "restored" / "proj" and (project / "params.yaml").read_text() == "b: 1\n"
    assert checkout_code(repo, commit, tmp_path / "whole") == tmp_path / "whole"


@pytest.mark.slow
@pytest.mark.fault("runs", "a project whose DVC config sets core.hardlink_lock (NFS) while a DVC process holds its "
                   "lock",
                   "the gate's, a stage's and the lock commit's reads of dvc.lock wait for DVC's own kind of lock "
                   "(before: they took a file lock DVC's hardlink lock does not see, and read while it wrote)")
def test_reads_of_dvc_lock_take_the_kind_of_lock_the_projects_dvc_config_names(repo):
    from dvc.lock import LockError
    from dvc.repo import Repo

    (repo / ".dvc").mkdir()
    (repo / ".dvc" / "config").write_text("[core]\n    hardlink_lock = true\n")
    with Repo(str(repo)) as dvc:   # a DVC command of the project, holding its lock as DVC makes it
        dvc.lock.lock()
        try:
            with pytest.raises(LockBusy, match="repository lock stayed held"), dvc_repo_lock(repo, wait=1):
                pass
        finally:
            dvc.lock.unlock()
    with dvc_repo_lock(repo, wait=1), Repo(str(repo)) as dvc, \
            pytest.raises(LockError, match="Unable to acquire lock"):   # given back: ours taken, and DVC sees it
        dvc.lock.lock()
    (repo / ".dvc" / "config").write_text("[core]\n    hardlink_lock = maybe\n")   # DVC refuses it too
    with pytest.raises(ConfigError, match=r"\.dvc: DVC's config does not load"), dvc_repo_lock(repo, wait=1):
        pass


def test_runs_in_a_scratch_copy_record_its_projects_git_state_and_no_other_folders_runs_do(repo, tmp_path, config,
                                                                                          monkeypatch):
    """A sweep recipe's stage runs: the project's commit and dirty state, the copy's own commit beside (before:
    the copy's alone, in no history of the project). A process elsewhere that inherits the entry records its own."""
    copy = tmp_path / "copy"
    copy.mkdir()
    _git(copy, "init", "--quiet")
    _git(copy, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "--allow-empty", "-m", "scratch")
    project = {**git_state(repo), "git.dirty": "true"}
    monkeypatch.setenv(*next(iter(source_git_env(copy, project).items())))
    tags = lineage_tags(None, config, copy)
    assert {k: tags[k] for k in project} == project and tags["git.scratch_commit"] == git_state(copy)["git.commit"]
    assert tags["mlflow.source.git.commit"] == project["git.commit"] != tags["git.scratch_commit"]
    assert {k: v for k, v in lineage_tags(None, config, repo).items() if k.startswith(("git.", "mlflow."))} == \
        git_state(repo)   # the project itself (any other folder): its own state, no scratch commit


@pytest.mark.fault("runs", "the pipeline container runs as another user than the bind-mounted checkout's owner (git: "
                   "\"dubious ownership\")",
                   "git's refusal is said on stderr by the lineage tags and the lock commit (before: silently "
                   "`git.commit: none`, so restore refused every version, and no dvc.lock commit)")
def test_a_repository_git_refuses_is_said_not_taken_for_no_repository(repo, monkeypatch, capsys):
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    monkeypatch.setenv("GIT_TEST_ASSUME_DIFFERENT_OWNER", "1")   # git's own switch: the owner is someone else
    assert git_state(repo) == {"git.commit": "none", "git.dirty": "unknown"}
    assert "dubious ownership" in capsys.readouterr().err
    assert commit_lock(repo, "m") is None
    err = capsys.readouterr().err
    assert "dubious ownership" in err and len(err.strip().splitlines()) == 1
    monkeypatch.delenv("GIT_TEST_ASSUME_DIFFERENT_OWNER")
    plain = repo.parent / "plain"   # no repository at all: nothing to say
    plain.mkdir()
    (plain / "dvc.lock").write_text("stages: {}\n")
    assert git_state(plain)["git.commit"] == "none" and commit_lock(plain, "m") is None
    assert capsys.readouterr().err == ""
