from __future__ import annotations

import pytest

from tasks.artifacts import load_model
from tasks.errors import CheckpointError


@pytest.mark.parametrize("content", [b"", b"\n", b"not a model", b"PK\x03\x04truncated zip"])
def test_unreadable_model_files_fail_with_a_clear_error(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.pt: not a model file of this pipeline"):
        load_model(path)


def test_a_stage_left_out_of_the_recipe_passes_its_student_through(tmp_path, config, mlflow_uri, monkeypatch):
    import argparse
    import json

    from mlflow.tracking import MlflowClient

    from tasks.artifacts import pass_through, save_model
    from tasks.tracking import stage_run
    from tasks.vision_models import MobileStudent

    monkeypatch.chdir(tmp_path)
    student = tmp_path / "in" / "student.pt"
    save_model(MobileStudent(config.distill.vision.student), "mobile_student", config.distill.vision.student, student)
    paths = argparse.Namespace(student=student, model=tmp_path / "out" / "m.pt", metrics=tmp_path / "out" / "m.json",
                               plots=tmp_path / "out" / "p.csv", checkpoint=tmp_path / "ckpt" / "last.pt")
    with stage_run("share_vision", config, {}) as run:
        pass_through(run, paths, "share_vision")
    assert paths.model.read_bytes() == student.read_bytes()
    assert json.loads(paths.metrics.read_text()) == {"pass_through": 1}
    assert (tmp_path / "ckpt").is_dir()  # the stage's declared checkpoint output, which DVC requires
    assert MlflowClient(mlflow_uri).get_run(run.run_id).data.tags["stage.pass_through"] == "true"
    assert not list((tmp_path / "out").glob("*.tmp"))
