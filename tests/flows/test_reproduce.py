"""``reproduce``: one ``dvc repro --single-item`` per stage, telling whether the stage ran, on a real DVC repo."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.dvc_stage import reproduce


def _repo(root: Path, lines: int) -> dict[str, str]:
    root.mkdir()
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    (root / "dvc.yaml").write_text(
        "stages:\n  talk:\n"
        f"    cmd: python -c \"import sys; [print('epoch', i) for i in range({lines})]; open('out.txt', 'w').write('x')\"\n"
        "    outs: [out.txt]\n")
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1"}   # (as the project's .dvc/config says: no report daemon left by each command)


@pytest.mark.slow
@pytest.mark.parametrize(("code", "deterministic"), [(2, True), (24, False), (255, False)])
def test_only_a_stage_exiting_with_the_user_error_code_is_never_retried(tmp_path, code, deterministic):
    """Before: "exited with 24" (or 255: a killed interpreter's) contains "exited with 2", the code of bad input:
    such a stage was never retried."""
    from flows.dvc_stage import StageFailed

    env = _repo(tmp_path / "repo", lines=1)
    (tmp_path / "repo" / "dvc.yaml").write_text(f"stages:\n  talk:\n    cmd: python -c \"raise SystemExit({code})\"\n")
    with pytest.raises(StageFailed) as failed:
        reproduce("talk", tmp_path / "repo", env, log=False)
    assert failed.value.deterministic is deterministic


@pytest.mark.slow
def test_a_stage_that_prints_more_than_the_kept_tail_is_still_reported_as_ran(tmp_path):
    """Before: whether a stage ran was read from the last 400 lines of output, where DVC's "Running stage" line is
    no longer found once the stage prints more; it was reported as cached."""
    env = _repo(tmp_path / "repo", lines=1000)
    assert reproduce("talk", tmp_path / "repo", env, log=False) is True
    assert (tmp_path / "repo" / "out.txt").read_text() == "x"
    assert reproduce("talk", tmp_path / "repo", env, log=False) is False   # nothing changed: DVC skips it


@pytest.mark.slow
@pytest.mark.fault("runs", "another process keeps the project's DVC lock (a stuck dvc command, a test holding it)",
                   "a stage tries again for at most pipeline.data_lock_timeout_seconds, then fails as a retryable "
                   "StageFailed naming the busy lock; an ingestion's dvc commit waits as long, then leaves the "
                   "snapshot as it was; nothing waits forever")
def test_a_stage_waits_a_bounded_time_for_a_dvc_lock_another_process_holds(tmp_path):
    """Before: every DVC call ran with ``--wait-for-lock``, which waits forever: an ingestion whose ``dvc commit``
    met a lock another process kept hung (the continuous-training e2e test did) instead of leaving the snapshot as it
    was. Now a stage tries again while the lock is busy, for at most ``lock_wait`` seconds; other calls fail at once."""
    import time

    from flows.dvc_stage import LOCK_BUSY, StageFailed
    from tests.conftest import dvc_lock, release_after

    root = tmp_path / "repo"
    env = _repo(root, lines=1)
    lock = dvc_lock(root)
    try:
        with pytest.raises(StageFailed, match=LOCK_BUSY) as failed:   # no wait: at once, and worth a retry
            reproduce("talk", root, env, log=False)
        assert not failed.value.deterministic
        start = time.monotonic()
        with pytest.raises(StageFailed, match=LOCK_BUSY):   # held throughout: given up after the wait
            reproduce("talk", root, env, log=False, lock_wait=3)
        assert time.monotonic() - start < 30
    finally:
        lock.close()
    release = release_after(dvc_lock(root), 2.0)   # released while the stage waits: it runs
    assert reproduce("talk", root, env, log=False, lock_wait=60) is True
    release.join()
    assert (root / "out.txt").read_text() == "x"


@pytest.mark.slow
def test_a_run_reproduces_what_dvc_finds_out_of_date_and_everything_below_it(tmp_path):
    """What the pipeline runs ``dvc repro`` for (``stale_stages``): a stage that never ran, whose dependency changed
    or whose output is gone, and every stage after it (its outputs may change even when DVC restores them from its
    run cache and calls it cached); nothing when all are up to date; every stage when DVC cannot tell."""
    import zc.lockfile

    from flows.dvc_stage import changed_stages, stale_stages
    from flows.stage_graph import StageNode

    root = tmp_path / "repo"
    env = _repo(root, lines=1)
    (root / "in.txt").write_text("1")
    (root / "dvc.yaml").write_text(
        "stages:\n"
        "  make:\n    cmd: python -c \"open('a.txt', 'w').write(open('in.txt').read())\"\n"
        "    deps: [in.txt]\n    outs: [a.txt]\n"
        "  use:\n    cmd: python -c \"open('b.txt', 'w').write(open('a.txt').read() * 2)\"\n"
        "    deps: [a.txt]\n    outs: [b.txt]\n")
    nodes = [StageNode("make", ()), StageNode("use", ("make",))]
    assert stale_stages(root, nodes) == {"make", "use"}   # no dvc.lock: nothing ran yet
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=root, env=env, check=True)
    assert stale_stages(root, nodes) == set()
    (root / "in.txt").write_text("2")
    assert changed_stages(root, ["make", "use"]) == {"make"}   # DVC sees "use" change only once "make" has run
    assert stale_stages(root, nodes) == {"make", "use"}
    (root / "in.txt").write_text("1")
    (root / "b.txt").unlink()
    assert stale_stages(root, nodes) == {"use"}
    lock = zc.lockfile.LockFile(str(root / ".dvc" / "tmp" / "lock"))
    try:
        (root / "b.txt").write_text("11")
        assert stale_stages(root, nodes) == {"make", "use"}   # DVC's lock busy: every stage is reproduced
    finally:
        lock.close()
    assert stale_stages(root, nodes) == set()


def test_below_a_changed_stage_every_stage_that_depends_on_it_is_stale():
    """Directly or not, and whichever other stage it also depends on."""
    from flows.stage_graph import StageNode, below

    nodes = [StageNode("a", ()), StageNode("b", ()), StageNode("c", ("a",)), StageNode("d", ("b", "c")),
             StageNode("e", ("b",)), StageNode("f", ("d",))]
    assert below(nodes, {"a"}) == {"a", "c", "d", "f"}
    assert below(nodes, {"b"}) == {"b", "d", "e", "f"}
    assert below(nodes, {"e", "f"}) == {"e", "f"}
    assert below(nodes, set()) == set()


def test_dvc_reads_yaml_with_libyamls_parser():
    """Every DVC command parses dvc.yaml and dvc.lock, and params.yaml once per stage; ruamel.yaml 0.19 made its C
    parser an optional install, without which a cached ``dvc repro --single-item`` took twice as long."""
    from dvc.utils.serialize._yaml import parse_yaml
    from ruamel.yaml import YAML

    assert YAML(typ="safe").Parser.__module__.startswith("ruamel.yaml.clib")
    assert parse_yaml("a: [1, 2]\n", "x.yaml") == {"a": [1, 2]}


@pytest.mark.slow
@pytest.mark.fault("runs", "a stage process killed (SIGKILL: the out-of-memory killer) after its MLflow run started",
                   "the stage fails as retryable and its run under the pipeline run is marked KILLED (before: it "
                   "stayed RUNNING for ever beside the run that retried it)")
def test_a_killed_stages_run_is_marked_killed(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.dvc_stage import StageFailed, run_stage
    from tasks.tracking import PARENT_ENV
    from tests.conftest import ROOT

    env = _repo(tmp_path / "repo", lines=1)
    repo = tmp_path / "repo"
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (repo / "killed.py").write_text("import os\nfrom tasks.config import load_config\nfrom tasks.tracking import "
                                    "stage_run\nwith stage_run('talk', load_config('params.yaml'), {}):\n"
                                    "    os.kill(os.getpid(), 9)\n")
    (repo / "dvc.yaml").write_text("stages:\n  talk:\n    cmd: python killed.py\n    deps: [killed.py]\n"
                                   "    outs: [out.txt]\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = client.create_run(client.create_experiment("model-compression")).info.run_id
    env = {**env, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri, PARENT_ENV: parent}
    with pytest.raises(StageFailed) as failed:
        run_stage.fn("talk", repo, env)
    assert not failed.value.deterministic
    (child,) = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")
    assert child.info.status == "KILLED" and child.data.tags["pipeline.stage"] == "talk"


def test_a_tracking_server_down_after_a_stage_is_warned_of_without_its_password(monkeypatch, capsys):
    """Before: the warnings printed MLflow's own message, which names the URL it called, password included."""
    from flows.dvc_stage import _point_at_data_docs, close_killed_runs
    from tasks.tracking import PARENT_ENV

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    env = {"MLFLOW_TRACKING_URI": "http://admin:s3cret@127.0.0.1:9", PARENT_ENV: "0123abcd"}
    close_killed_runs("talk", env)
    _point_at_data_docs("validate_talk", env)
    warned = capsys.readouterr().err.splitlines()
    assert len(warned) == 2 and all(w.startswith("warning: ") and "admin:***@127.0.0.1:9" in w for w in warned)
    assert "s3cret" not in "".join(warned)


@pytest.mark.slow
@pytest.mark.fault("runs", "the flow process interrupted (Ctrl-C, a cancelled run) while `dvc repro` runs a stage",
                   "DVC and the stage's command are stopped before the interruption goes on (before: both kept "
                   "running, DVC free to write dvc.lock after its caller had undone its work; DVC passes no signal "
                   "on to the stage's command)")
def test_an_interrupted_dvc_command_is_stopped_with_the_stage_it_runs(tmp_path):
    import threading

    from flows.dvc_stage import run_dvc, stop_running

    root = tmp_path / "repo"
    env = _repo(root, lines=1)
    (root / "dvc.yaml").write_text(
        "stages:\n  talk:\n    cmd: python -c \"import time; print('started', flush=True); time.sleep(60); "
        "open('out.txt', 'w').write('x')\"\n    outs: [out.txt]\n")

    def interrupt(line: str) -> None:
        if line.strip() == "started":   # the stage runs: Ctrl-C
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_dvc(root, env, "repro", "talk", log=interrupt)
    assert _left_running(root) == [] and not (root / "out.txt").exists() and not (root / "dvc.lock").exists()

    # a run's stages are read by worker threads, and an interruption reaches the main thread only: it stops them
    started, codes = threading.Event(), []
    worker = threading.Thread(target=lambda: codes.append(run_dvc(root, env, "repro", "talk", log=lambda line: (
        line.strip() == "started" and started.set()))[0]))
    worker.start()
    assert started.wait(60)
    stop_running()
    worker.join(30)
    assert not worker.is_alive() and _left_running(root) == [] and not (root / "out.txt").exists()
    assert codes and codes[0] != 0   # the stopped command's own exit status, not a reaped one's 0


def _left_running(root: Path) -> list:
    """The command lines of the processes working in ``root`` (killed: a test leaves none behind)."""
    import psutil

    here = []
    for process in psutil.process_iter(["cwd", "cmdline"]):
        if process.info["cwd"] == str(root):
            here.append(process.info["cmdline"])
            process.kill()
    return here
