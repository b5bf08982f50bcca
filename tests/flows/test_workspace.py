"""Scratch copies of the project (make smoke, benchmarks, sweeps, the e2e tests) carry what a run needs."""
from __future__ import annotations

import yaml

from flows.workspace import copy_project


def test_a_scratch_copy_carries_the_imported_teacher_files(tmp_path):
    """Before: only code and params were copied, so `make smoke` of a project with an imported teacher stopped at
    its teacher stage (the file, under the git-ignored models/, was missing)."""
    source = tmp_path / "project"
    (source / "models").mkdir(parents=True)
    (source / "models" / "mine.onnx").write_bytes(b"onnx bytes")
    params = {"profile": "smoke", "teacher": {"vision": {"epochs": 1}},
              "profiles": {"smoke": {"teacher": {"recsys": {"pretrained": {"path": "models/mine.onnx"}}}}}}
    (source / "params.yaml").write_text(yaml.safe_dump(params))
    copy = copy_project(tmp_path / "copy", {}, source=source)
    assert (copy / "models" / "mine.onnx").read_bytes() == b"onnx bytes"


def test_a_scratch_copy_skips_an_editors_lock_file(tmp_path):
    """Before: an editor's lock file in the sources (Emacs's ``.#x.py``, a symlink to nowhere) stopped every copy
    (``shutil.Error``), so `make smoke`, the sweeps and the benchmarks failed while a file was open."""
    source = tmp_path / "project"
    (source / "tasks").mkdir(parents=True)
    (source / "tasks" / "x.py").write_text("X = 1\n")
    (source / "tasks" / ".#x.py").symlink_to("user@host.1234:1700000000")
    (source / "tasks" / "y.py").symlink_to("x.py")   # a relative link that points somewhere is copied
    (source / "params.yaml").write_text(yaml.safe_dump({"teacher": {}}))
    copy = copy_project(tmp_path / "copy", {}, source=source)
    assert (copy / "tasks" / "x.py").read_text() == "X = 1\n" and not (copy / "tasks" / ".#x.py").is_symlink()
    assert (copy / "tasks" / "y.py").read_text() == "X = 1\n"
