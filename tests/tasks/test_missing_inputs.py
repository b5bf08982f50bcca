"""Processed data or models a command reads that are not there (a stage run before its prepare stage, a wrong
``--data`` or ``--root``): one line naming the file and what makes it, exit 2, before anything trains."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.ctr.ctr_training import load_ctr_data
from tasks.errors import DataFormatError, PipelineError
from tasks.image_training import Split
from tasks.text.training import TextSplit

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.fault("data", "an image family's processed split is missing or unreadable (a stage run before "
                   "prepare_<family>, a wrong --data)",
                   "DataFormatError naming the file and the prepare stage, exit 2 (before: numpy's "
                   "FileNotFoundError traceback in every training, export and evaluate stage and benchmark)")
def test_a_missing_or_unreadable_image_split_is_one_line_naming_the_file(tmp_path):
    """``Split.load`` of a folder without the split, or with a file cut short. Before: numpy's FileNotFoundError
    (or ValueError) traceback, exit 1, in every image stage and benchmark."""
    with pytest.raises(DataFormatError, match=rf"^{tmp_path}/train_x\.npy: cannot be read \(.*No such file.*\); "
                                              r"re-run its prepare stage \(prepare_<family>\)$"):
        Split.load(tmp_path, "train")
    np.save(tmp_path / "train_x.npy", np.zeros((2, 4, 4), np.uint8))
    (tmp_path / "train_y.npy").write_bytes(b"\x93NUMPY")   # cut short
    with pytest.raises(DataFormatError, match=rf"^{tmp_path}/train_y\.npy: cannot be read"):
        Split.load(tmp_path, "train")


@pytest.mark.fault("data", "a click-through family's processed data is missing or unreadable (a stage run before "
                   "its prepare stage, a wrong --data)",
                   "DataFormatError naming the file and the prepare stage, exit 2 (before: a FileNotFoundError "
                   "traceback in every recsys and clicks training, export and evaluate stage)")
def test_missing_click_through_data_is_one_line_naming_the_file(tmp_path):
    """``load_ctr_data`` without features.json, then without the splits. Before: a FileNotFoundError traceback."""
    with pytest.raises(DataFormatError, match=rf"^{tmp_path}/features\.json: cannot be read \(.*No such file.*\); "
                                              r"re-run its prepare stage \(prepare_<family>\)$"):
        load_ctr_data(tmp_path)
    (tmp_path / "features.json").write_text('{"vocabulary": 4, "fields": ["user"], "genres": []}')
    with pytest.raises(DataFormatError, match=rf"^{tmp_path}/train_fields\.npy: cannot be read"):
        load_ctr_data(tmp_path)


@pytest.mark.fault("data", "the text family's sentences.csv is missing, unreadable or lacks a column",
                   "DataFormatError naming the file and prepare_text, exit 2 (before: pandas' FileNotFoundError "
                   "traceback in export_text and evaluate_text)")
def test_missing_or_malformed_sentences_are_one_line_naming_the_file(tmp_path):
    """``TextSplit.load`` without sentences.csv, then with one lacking a column. Before: pandas' FileNotFoundError
    (AttributeError) traceback."""
    with pytest.raises(DataFormatError, match=rf"^{tmp_path}/sentences\.csv: cannot be read \(.*No such file.*\); "
                                              "re-run prepare_text$"):
        TextSplit.load(tmp_path, "test")
    (tmp_path / "sentences.csv").write_text("text,label\ngood,1\n")
    with pytest.raises(DataFormatError, match=rf"^{tmp_path}/sentences\.csv: no column split; re-run prepare_text$"):
        TextSplit.load(tmp_path, "test")


@pytest.mark.slow
@pytest.mark.fault("data", "a stage run with --data naming no folder (export_digits, as dvc.yaml runs it)",
                   "one `error: DataFormatError` line naming the file, exit 2 (before: a traceback, exit 1)")
def test_a_stage_with_no_data_exits_2_with_one_error_line(tmp_path):
    """One stage as dvc.yaml runs it (a cheap one), --data naming nothing. Before: a traceback, exit 1."""
    import yaml

    words = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["export_digits"]["cmd"].split()
    words[words.index("--data") + 1] = "nowhere"
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    proc = subprocess.run([sys.executable, *words[1:]], cwd=tmp_path, capture_output=True, text=True, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors == [("error: DataFormatError: nowhere/val_x.npy: cannot be read ([Errno 2] No such file or "
                       "directory: 'nowhere/val_x.npy'); re-run its prepare stage (prepare_<family>)")]


def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with params.yaml and dvc.yaml but nothing made, and the current folder another one."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, project / name)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return project


@pytest.mark.fault("data", "the recommender benchmark run with --root a project that has not exported yet (or from "
                   "another folder)",
                   "one line naming the missing data and ONNX files under --root and `dvc repro export_recsys`, "
                   "before any baseline trains (before: paths read from the current folder, and the LR and FM "
                   "baselines trained before a FileNotFoundError traceback)")
def test_the_recsys_benchmark_reads_root_and_names_missing_inputs_before_training(tmp_path, monkeypatch):
    """Run from another folder with --root a project that made nothing. Before: --data and --onnx-dir read from
    the current folder, and both baselines trained before the missing ONNX files were found."""
    from tasks.recsys import benchmark

    project = _elsewhere(tmp_path, monkeypatch)
    monkeypatch.setattr(benchmark, "train_baselines", lambda *a: pytest.fail("trained before its inputs were checked"))
    monkeypatch.setattr(sys, "argv", ["benchmark", "--root", str(project)])
    with pytest.raises(PipelineError, match=rf"^{project}/data/recsys/processed/features\.json, .*"
                                            rf"{project}/models/recsys/onnx/student_int8\.onnx: no such file or "
                                            r"folder; make them with `dvc repro export_recsys`"):
        benchmark.main()


@pytest.mark.fault("data", "the text benchmark run with --root a project without its teacher (or from another "
                   "folder)",
                   "one line naming the missing data and teacher under --root and `dvc repro train_teacher_text`, "
                   "before any student trains (before: paths read from the current folder, a traceback)")
def test_the_text_benchmark_reads_root_and_names_missing_inputs_before_training(tmp_path, monkeypatch):
    """Run from another folder with --root a project that made nothing. Before: --data and --teacher read from the
    current folder, a FileNotFoundError traceback."""
    from tasks.text import benchmark

    project = _elsewhere(tmp_path, monkeypatch)
    monkeypatch.setattr(benchmark, "measure", lambda *a: pytest.fail("measured before its inputs were checked"))
    monkeypatch.setattr(sys, "argv", ["benchmark", "--root", str(project), "--seeds", "0"])
    with pytest.raises(PipelineError, match=rf"^{project}/data/text/processed/manifest\.json, .*"
                                            rf"{project}/models/text/teacher\.pt: no such file or folder; make "
                                            r"them with `dvc repro train_teacher_text`"):
        benchmark.main()


@pytest.mark.fault("data", "evaluate_recsys, or a prune or share stage left out of the recipe, run before what writes "
                   "its input (the user and item tables, the student model)",
                   "one line naming the file and what writes it, exit 2 (before: numpy's or Python's "
                   "FileNotFoundError traceback)")
def test_the_recommenders_tables_and_a_passed_through_student_missing_are_one_line(tmp_path):
    """Before: ``Catalog`` (evaluate_recsys, the speed-up benchmark) loaded users.npy with a bare ``np.load``, and a
    stage left out of the recipe read its student with ``read_bytes``: tracebacks."""
    from argparse import Namespace

    from tasks.artifacts import pass_through
    from tasks.errors import CheckpointError
    from tasks.recsys.evaluate import Catalog

    with pytest.raises(DataFormatError, match=rf"^{tmp_path}/users\.npy: cannot be read .*; re-run prepare_recsys$"):
        Catalog(tmp_path)
    paths = Namespace(student=tmp_path / "student_kd.pt", model=tmp_path / "student_pruned.pt")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/student_kd\.pt: cannot be read \(No such file or "
                                              r"directory\); re-run the stage that writes it$"):
        pass_through(None, paths, "prune_vision")
    assert not paths.model.exists()
