from __future__ import annotations

import pytest

from tasks.artifacts import load_model
from tasks.errors import CheckpointError


@pytest.mark.fault("security", "a model file that is not one of ours (garbage, wrong kind)",
                   "CheckpointError naming the file; nothing loaded")
@pytest.mark.parametrize("content", [b"", b"\n", b"not a model", b"PK\x03\x04truncated zip"])
def test_unreadable_model_files_fail_with_a_clear_error(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.pt: not a model file of this pipeline"):
        load_model(path)


def test_a_model_file_whose_weights_do_not_fit_its_description_is_named(tmp_path):
    """Before: a bare torch RuntimeError (state_dict size mismatch) with no file name, e.g. a student saved without
    its data's shape (three classes) read back as the ten-class default."""
    import torch

    from tasks.artifacts import save_model
    from tasks.images.arch_config import MobileArch
    from tasks.images.models import MobileStudent

    arch = MobileArch(stem=4, widths=[8], strides=[2])
    blob_path = tmp_path / "student.pt"
    save_model(MobileStudent(arch, num_classes=3), "mobile_student", arch, blob_path)   # no shape saved with it
    assert isinstance(torch.load(blob_path, weights_only=True), dict)
    with pytest.raises(CheckpointError, match=r"student\.pt: its weights do not fit the mobile_student it describes "
                                              r"\(size mismatch for head\.weight"):
        load_model(blob_path)


@pytest.mark.fault("security", "a model file naming an architecture outside this project's code, a class that is "
                   "no ModelArch, or none (an older format)",
                   "CheckpointError naming the file and the class; nothing imported beyond tasks.*, nothing built")
@pytest.mark.parametrize(("arch_class", "why"), [
    ("os:system", "of another program"), ("tasks.io:write_json", "is no model architecture"),
    ("tasks.config_types:ModelArch", "is no model architecture"),   # the base: it names no model
    ("tasks.nowhere:Arch", "is not in this code"), (None, "of an older format")])
def test_a_model_file_names_a_model_architecture_of_this_project(tmp_path, arch_class, why):
    """A model file says which architecture class rebuilds it (no registry naming every family's models); what it
    names is imported only when it is this project's and a ``ModelArch``."""
    import torch

    from tasks.artifacts import model_meta, save_model
    from tasks.images.arch_config import MobileArch
    from tasks.images.models import MobileStudent

    arch = MobileArch(stem=4, widths=[8], strides=[2])
    path = tmp_path / "student.pt"
    save_model(MobileStudent(arch, num_classes=3), "mobile_student", arch, path, shape={"num_classes": 3})
    assert model_meta(path)["arch"] == arch and isinstance(load_model(path), MobileStudent)
    blob = torch.load(path, weights_only=True)
    blob["arch_class"] = arch_class
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match=rf"student\.pt: .*{why}"):
        load_model(path)
    blob["arch_class"] = "tasks.images.arch_config:MobileArch"
    torch.save({**blob, "qat_form": {"bits": 4}}, path)   # a QAT form this model has no way to rebuild
    with pytest.raises(CheckpointError, match=r"student\.pt: a QAT form its mobile_student has no way to rebuild"):
        load_model(path)


def test_a_stage_left_out_of_the_recipe_passes_its_student_through(tmp_path, config, mlflow_uri, monkeypatch):
    import argparse
    import json

    from mlflow.tracking import MlflowClient

    from tasks.artifacts import pass_through, save_model
    from tasks.images.models import MobileStudent
    from tasks.tracking import stage_run

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


class _Payload:
    """A pickle that runs code when loaded: what a planted model or checkpoint would carry."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.fault("security", "a model file or checkpoint carrying a pickle that runs code",
                   "refused by weights_only loading with CheckpointError naming the file; the code never runs")
def test_pickled_code_in_model_files_and_checkpoints_never_runs(tmp_path):
    import torch

    from tasks.checkpoints import load_checkpoint, save_checkpoint

    marker = tmp_path / "pwned"
    model = tmp_path / "model.pt"
    torch.save({"kind": "mobile_student", "arch": {}, "state_dict": _Payload(str(marker))}, model)
    with pytest.raises(CheckpointError, match=r"model\.pt: not a model file of this pipeline"):
        load_model(model)
    checkpoint = tmp_path / "ck" / "last.pt"  # its sidecar hash matches: only weights_only stands in the way
    save_checkpoint(checkpoint, {"model": _Payload(str(marker)), "history": []}, "fp")
    with pytest.raises(CheckpointError, match=r"last\.pt matches its SHA-256 but holds more than tensors"):
        load_checkpoint(checkpoint, "fp")
    assert not marker.exists()
