"""Atomic stage outputs, tested on real processes: when the artifact store refuses a stage's artifact (prepare_recsys
on a small MovieLens), the stage fails with one clear line and its previous outputs stay as they were; when a stage
is killed while its outputs move into place, the next stage to start completes the move, so no mix is ever left."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT


def _run_stage(tmp_path: Path, params: dict) -> subprocess.CompletedProcess:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("PIPELINE_PARENT_RUN_ID", None)
    from tasks.config import parse_config
    from tasks.recsys.intake import INTAKE
    from tasks.snapshot import ensure

    if not (tmp_path / "data" / "raw").exists():   # the raw snapshot prepare reads (its own stage in dvc.yaml)
        ensure(tmp_path / "data" / "raw", "recsys", INTAKE, parse_config(params))
    return subprocess.run([sys.executable, "-m", "tasks.recsys.prepare", "--raw", "data/raw", "--out", "data/processed"],
                          cwd=tmp_path,
                          env=env, capture_output=True, text=True)


@contextlib.contextmanager
def _full(store: Path):
    """A 64 KiB file system mounted over the artifact store and filled up: writes fail with ENOSPC."""
    store.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(store)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here (needs root): {mounted.stderr.strip()}")
    try:
        with contextlib.suppress(OSError), open(store / "filler", "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        yield
    finally:
        subprocess.run(["umount", str(store)], check=True)


@contextlib.contextmanager
def _unwritable(store: Path):
    """The artifact store's folder replaced by a file: no run folder can be made in it, even by root."""
    store.rename(store.with_name("moved"))
    store.write_text("not a folder")
    yield


@pytest.mark.parametrize("fault,reason", [
    pytest.param(_full, "ENOSPC", id="full", marks=pytest.mark.fault(
        "runs", "the artifact store full (no space left) while a stage logs its artifacts",
        "ArtifactStoreError naming the store and ENOSPC, exit 2; previous outputs byte-identical, nothing staged "
        "left, MLflow run FAILED")),
    pytest.param(_unwritable, "ENOTDIR", id="unwritable", marks=pytest.mark.fault(
        "runs", "the artifact store unwritable while a stage logs its artifacts",
        "ArtifactStoreError naming the store and ENOTDIR, exit 2; previous outputs byte-identical, nothing staged "
        "left, MLflow run FAILED")),
])
@pytest.mark.slow
def test_a_refused_artifact_leaves_the_previous_outputs(synthetic_movielens, tmp_path, fault, reason):
    _, _, cfg = synthetic_movielens
    params = cfg.model_dump(by_alias=True)
    first = _run_stage(tmp_path, params)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "data" / "processed"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    params["data"]["recsys"]["seed"] += 1  # a re-run that would write other splits
    with fault(tmp_path / "mlartifacts"):
        second = _run_stage(tmp_path, params)
    assert second.returncode == 2, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ArtifactStoreError: cannot log artifact features.json: the artifact store file://")
    assert f"({reason}:" in last and "Traceback" not in second.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.rglob(".staging"))
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"], order_by=["start_time DESC"])
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]


OLD, NEW = {"model.bin": "old", "processed/rows.txt": "old"}, {"model.bin": "new", "processed/rows.txt": "new"}


def _outputs(root: Path) -> dict[str, str]:
    """The outputs in place under data/ and their contents (staged ones left out)."""
    data = root / "data"
    return {str(p.relative_to(data)): p.read_text() for p in sorted(data.rglob("*"))
            if p.is_file() and ".staging" not in p.parts}


def _stage_dying_at_move(root: Path, move: int, body: str) -> subprocess.CompletedProcess:
    """Run ``body`` (with ``staged`` and ``atomic_outputs`` imported) in a fresh process in ``root`` that dies at once
    (os._exit, like SIGKILL: no cleanup runs) on its ``move``-th os.replace of an output under data/; 0: never."""
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from tasks.staging import atomic_outputs, staged
        real_replace, moves = os.replace, []
        def replace(src, dst):
            if "data" in Path(src).parts:
                moves.append(src)
                if len(moves) == {move}:
                    os._exit(9)
            real_replace(src, dst)
        os.replace = replace
    """) + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("move", [1, 2, 3], ids=["at-the-first-move", "between-outputs", "inside-the-folder-swap"])
@pytest.mark.fault("runs", "a stage killed (os._exit) while its staged outputs move into place, and killed again "
                   "while the next stage completes that move",
                   "the next stage to start moves every remaining staged output in: all outputs new, no mix of old "
                   "and new, no folder missing, nothing staged or .old left")
def test_a_stage_killed_while_committing_is_rolled_forward_by_the_next(tmp_path, move):
    (tmp_path / "data" / "processed").mkdir(parents=True)
    for name, text in OLD.items():
        (tmp_path / "data" / name).write_text(text)
    killed = _stage_dying_at_move(tmp_path, move, """
        with atomic_outputs():
            staged(Path("data/model.bin")).write_text("new")
            folder = staged(Path("data/processed"))
            folder.mkdir()
            (folder / "rows.txt").write_text("new")
    """)
    assert killed.returncode == 9, killed.stderr[-3000:]
    assert _outputs(tmp_path) != NEW  # killed mid-commit: left so, the outputs would be old, a mix, or missing

    recovering = _stage_dying_at_move(tmp_path, 1, "with atomic_outputs(): pass")  # killed again, at its first move
    assert recovering.returncode == 9, (_outputs(tmp_path), recovering.stderr[-3000:])
    recovered = _stage_dying_at_move(tmp_path, 0, "with atomic_outputs(): pass")
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    assert _outputs(tmp_path) == NEW
    assert not list(tmp_path.rglob(".staging")) and not list(tmp_path.rglob("*.old"))


def test_everything_waiting_for_the_outputs_is_told_even_when_one_of_them_fails(tmp_path, capsys):
    from tasks.staging import after_commit, atomic_outputs, staged

    assert after_commit(lambda committed: None) is False   # no stage's outputs to wait for: the caller acts now
    told: list[tuple[str, bool]] = []

    def failing(committed: bool) -> None:
        told.append(("first", committed))
        raise RuntimeError("the tracking server went away")

    with pytest.raises(RuntimeError, match="went away"), atomic_outputs():   # in place, then the error is the stage's
        staged(tmp_path / "a.txt").write_text("a")
        after_commit(failing)
        after_commit(lambda committed: told.append(("second", committed)))
    assert told == [("first", True), ("second", True)] and (tmp_path / "a.txt").read_text() == "a"
    told.clear()
    with pytest.raises(KeyError), atomic_outputs():   # the stage fails: each is told, the stage's error is reported
        after_commit(failing)
        after_commit(lambda committed: told.append(("second", committed)))
        raise KeyError("boom")
    assert told == [("first", False), ("second", False)] and "went away" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.fault("runs", "a stage sent SIGTERM (`kill`, a container or job stopped) while it runs",
                   "ended as Ctrl-C ends it: one line, exit 143, staged outputs dropped and the previous ones kept, "
                   "its MLflow run marked KILLED (before: Python's default death, the run RUNNING for good)")
def test_a_terminated_stage_cleans_up_and_its_run_is_marked_killed(tmp_path):
    import signal

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "model.bin").write_text("old")
    (tmp_path / "stage.py").write_text(textwrap.dedent("""
        import time
        from pathlib import Path
        from tasks.config import load_config
        from tasks.errors import run_cli
        from tasks.staging import staged
        from tasks.tracking import stage_run

        def main():
            with stage_run("talk", load_config("params.yaml"), {}):
                staged(Path("data/model.bin")).write_text("new")
                print("ready", flush=True)
                time.sleep(120)

        run_cli(main)
        """))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri}
    env.pop("PIPELINE_PARENT_RUN_ID", None)
    proc = subprocess.Popen([sys.executable, "stage.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip().splitlines()[-1] == "error: stopped by SIGTERM; previous outputs kept"
    assert "Traceback" not in err
    assert (tmp_path / "data" / "model.bin").read_text() == "old" and not list(tmp_path.rglob(".staging"))
    (run,) = MlflowClient(uri).search_runs(["1"])
    assert run.info.status == "KILLED"
