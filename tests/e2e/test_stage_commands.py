"""Commands and faults on their own scratch copies (smoke profile): ``dvc repro`` of a slice of the graph, a
flow stopped by bad data, the benchmark command, a training killed mid-run. (The whole-graph flow run that
most e2e tests share is test_smoke_pipeline.py's.)"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from flows.pipeline import compression_pipeline
from tests.conftest import idx_bytes
from tests.e2e.scratch import dvc, make_repo, repo_env

pytestmark = pytest.mark.e2e


def test_stages_left_out_of_the_recipe_pass_the_student_through_under_dvc(tmp_path):
    """The default full recipe leaves ``share`` out; every left-out stage must still satisfy DVC's outputs. (A few
    hundred images: what is checked is the files the stages pass on, not what the models learn.)"""
    repo = make_repo(tmp_path / "distill-only", **{"profiles.smoke.recipe.vision": ["distill"],
                                                   "profiles.smoke.data.vision.subset": {"train": 400, "val": 100,
                                                                                         "test": 200}})
    proc = dvc(repo, "repro", "share_vision")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    student = (repo / "models/vision/student_kd.pt").read_bytes()
    for stage in ("pruned", "qat", "shared"):
        assert (repo / f"models/vision/student_{stage}.pt").read_bytes() == student, stage
        assert json.loads((repo / f"metrics/vision/student_{stage}.json").read_text()) == {"pass_through": 1}


@pytest.mark.fault("data", "bad labels in pinned raw files, through the flow",
                   "the flow fails at validate_vision naming the check; no report, no model trained; not retried")
def test_bad_data_stops_the_pipeline_before_training(tmp_path, prefect_server):
    """Labels out of range pass the checksum (they are pinned) but not the expectation gate."""
    src = tmp_path / "bad-source"
    src.mkdir()
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 60)
    labels[:5] = 11
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (600, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": labels,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (200, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": np.repeat(np.arange(10, dtype=np.uint8), 20)}
    pins = {}
    for name, arr in arrays.items():
        (src / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(arr)))
        pins[name] = hashlib.sha256(idx_bytes(arr)).hexdigest()
    repo = make_repo(tmp_path / "repo", **{"data.vision.source_dir": str(src), "data.vision.sha256": pins,
                                           "profiles.smoke.data.vision.subset": {"train": 400, "val": 100, "test": 200},
                                           "data.vision.val_size": 100})
    from flows.dvc_stage import StageFailed

    # the vision family's stages only: that every family's data is validated before any family trains is the stage
    # graph's order (tests/flows/test_stage_graph.py), the same for one family as for three
    state = compression_pipeline(str(repo), families=["vision"], return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed, match=r"(?s)validate_vision.*expect_column_values_to_be_in_set\(column=label.*e\.g\. \[11"):
        state.result()
    # the data is validated before anything trains, so no model at all was trained
    assert not (repo / "models").exists() and not (repo / "reports" / "vision" / "validation.json").exists()
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs(["1"], "tags.`pipeline.stage` = 'validate_vision'")
    assert [r.info.status for r in runs] == ["FAILED"]  # a deterministic failure is not retried
    # its Data Docs show the offending labels, and the Prefect run says where they are
    assert "index.html" in {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(runs[0].info.run_id, "data_docs")}
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect:
        artifacts = {a.key: a.data for a in prefect.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))}
    docs = artifacts["validate-vision-data-docs"]
    assert "(validation success: false)" in docs
    (page,) = Path(docs.split("`")[1]).parent.glob("validations/vision_rows_train/*/*/*.html")
    assert "Unexpected Value" in page.read_text() and ">11<" in page.read_text().replace(" ", "").replace("\n", "")


def test_benchmark_command_reports_cold_and_cached_runs(tmp_path, prefect_server):
    out = tmp_path / "bench.json"
    # one family, the digits (the smallest image family: the same generic stages as vision's at a fraction of the
    # CPU; the teacher table has a row per family that ran); every family's cold run is the e2e suite's
    proc = subprocess.run([sys.executable, "-m", "flows.benchmark", "--profile", "smoke", "--family", "digits",
                           "--teacher-target", "digits=0.5", "--teacher-seconds", "digits=3600", "--out", str(out)],
                          capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                               if k != "MLFLOW_TRACKING_URI"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| train_teacher_digits | ran |" in proc.stdout
    assert re.search(r"\| digits \| accuracy 0\.\d+ \| ≥ 0\.5000 \| met \| \d+ \| ≤ 3600 \| met \|", proc.stdout)
    numbers = json.loads(out.read_text())
    assert set(numbers["cold"]["statuses"].values()) == {"ran"}
    assert {stage.rsplit("_", 1)[1] for stage in numbers["cold"]["statuses"]} == {"digits"}   # --family filtered
    assert set(numbers["warm"]["statuses"].values()) == {"cached"}
    assert numbers["cold"]["stage_seconds"]["train_teacher_digits"] > 0


@pytest.mark.fault("runs", "SIGKILL in the middle of teacher training (dvc repro)",
                   "no model written; the re-run resumes from the last checkpoint and records every epoch")
def test_killed_training_resumes_from_its_checkpoint_under_dvc(tmp_path):
    """SIGKILL the teacher stage after its first checkpoint; ``dvc repro`` then resumes instead of restarting."""
    import signal

    repo = make_repo(tmp_path / "repo", **{"profiles.smoke.teacher.vision.epochs": 3})
    env = repo_env(repo)
    checkpoint = repo / "checkpoints" / "vision" / "teacher" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train_teacher_vision"], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists(), "no checkpoint was written before the stage ended"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: dvc and the stage it runs
    proc.wait()
    assert not (repo / "models" / "vision" / "teacher.pt").exists()

    again = dvc(repo, "repro", "train_teacher_vision")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from checkpoints/vision/teacher/last.pt after epoch" in again.stderr
    history = (repo / "plots" / "vision" / "teacher_history.csv").read_text().strip().splitlines()
    assert len(history) == 1 + 3  # header + every epoch, the ones before the kill included
    assert dvc(repo, "status", "train_teacher_vision").stdout.strip().endswith("up to date.")
