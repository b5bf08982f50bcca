"""Atomic stage outputs, tested on a real stage process (prepare_recsys on a small MovieLens): when the artifact
store refuses the stage's artifact, the stage fails with one clear line and its previous outputs stay as they were."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT


def _run_stage(tmp_path: Path, params: dict) -> subprocess.CompletedProcess:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("PIPELINE_PARENT_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", "tasks.prepare_recsys", "--out", "data/processed"], cwd=tmp_path,
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
