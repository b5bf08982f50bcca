"""Scratch copies of the project (make smoke, benchmarks, sweeps, the e2e tests) carry what a run needs."""
from __future__ import annotations

import subprocess

import yaml

from flows.workspace import PROJECT as ROOT
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


def test_a_scratch_copy_carries_the_data_files_its_split_params_name(tmp_path, raw_params):
    """A user's corpus (``data.text.source_file``) and image folder (``image_folder.path``) inside the project are
    data of the project, not sources: the copy links them (out of its git), and its data params (their content)
    are the project's. Before: the copy lacked them, so a sweep's registration in its recipe's copy stopped on the
    missing file, and a benchmark's copy could not prepare the data."""
    import copy as copying

    from tasks.config import parse_config
    from tasks.lineage import data_params
    from tests.tasks.test_image_folder import image_folder

    source = tmp_path / "project"
    (source / "data/mine").mkdir(parents=True)
    (source / "data/mine/corpus.csv").write_text("text,category\ngood film,fresh\nbad film,rotten\n")
    image_folder(source / "data/photos", per_class=2)
    raw = copying.deepcopy(raw_params)
    raw["data"]["text"]["source_file"] = "data/mine/corpus.csv"
    raw["data"]["vision"]["image_folder"] = {"path": "data/photos"}
    (source / "params.yaml").write_text(yaml.safe_dump(raw))
    (source / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    image_folder(source / "data/digits/images", per_class=1)   # the digits' folder: an output of fetch_digits
    copy = copy_project(tmp_path / "copy", {}, source=source)
    assert (copy / "data/mine/corpus.csv").resolve() == (source / "data/mine/corpus.csv").resolve()   # linked
    assert "photos" not in subprocess.run(["git", "ls-files"], cwd=copy, capture_output=True, text=True,
                                          check=True).stdout   # not in the copy's commit
    cfg = parse_config(raw)
    for family in ("text", "vision"):
        assert data_params(cfg, family, copy) == data_params(cfg, family, source)
    assert not (copy / "data/digits").exists()   # made by its own stage (fetch_digits) in the copy


def test_a_scratch_copy_carries_the_users_table_and_source_folders(tmp_path, raw_params):
    """A user's table (``data.<family>.table.path``) and a folder of the published files (``source_dir``) inside the
    project are read by the stages but split nothing: the copy links them too. Before: only the data params' content
    fields were linked, so `make smoke --family <a table family>` and every sweep recipe of it stopped at its
    prepare stage on a missing table. A table a stage of the copy makes (fetch_clicks's) is made there."""
    import copy as copying

    source = tmp_path / "project"
    (source / "data/mine").mkdir(parents=True)
    (source / "data/mine/clicks.csv").write_text("click,user_id\n1,7\n")
    (source / "data/ml100k").mkdir(parents=True)
    (source / "data/ml100k/ml-100k.inter").write_text("user_id:token\n")
    raw = copying.deepcopy(raw_params)
    (tmp_path / "shared-cache").mkdir()   # DVC's symlink cache type, the cache outside the project
    (tmp_path / "shared-cache/ab12").write_text("click,user_id\n0,8\n")
    (source / "data/mine/linked.csv").symlink_to(tmp_path / "shared-cache/ab12")
    raw["data"]["clicks"]["table"] = {"path": "data/mine/clicks.csv"}
    raw["data"]["recsys"]["source_dir"] = "data/ml100k"
    raw["data"]["text"]["source_file"] = "data/mine/linked.csv"
    (source / "params.yaml").write_text(yaml.safe_dump(raw))
    (source / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    copy = copy_project(tmp_path / "copy", {}, source=source)
    assert (copy / "data/mine/clicks.csv").resolve() == (source / "data/mine/clicks.csv").resolve()
    assert (copy / "data/ml100k/ml-100k.inter").is_file()
    assert (copy / "data/mine/linked.csv").read_text() == "click,user_id\n0,8\n"   # (before: left out)
    assert "data/" not in subprocess.run(["git", "ls-files"], cwd=copy, capture_output=True, text=True,
                                         check=True).stdout   # not in the copy's commit

    raw["data"]["clicks"]["table"] = {"path": "data/clicks/table/ratings.parquet"}   # fetch_clicks's output
    (source / "data/clicks/table").mkdir(parents=True)
    (source / "data/clicks/table/ratings.parquet").write_bytes(b"PAR1")
    (source / "params.yaml").write_text(yaml.safe_dump(raw))
    assert not (copy_project(tmp_path / "again", {}, source=source) / "data/clicks").exists()


def test_an_override_wins_over_the_copys_profile_overlay(tmp_path, raw_params):
    """Before: overrides went to the top level only, and the profile's overlay, merged last, won: a smoke profile
    naming the team's tracking server sent `make smoke`'s runs, registrations and promotions there."""
    from tasks.config import load_config
    from tasks.mlflow_store import tracking_uri

    source = tmp_path / "project"
    source.mkdir()
    raw_params["profiles"]["smoke"]["tracking"] = {"uri": "http://team-mlflow:5000"}
    (source / "params.yaml").write_text(yaml.safe_dump(raw_params, sort_keys=False))
    copy = copy_project(tmp_path / "copy", {"profile": "smoke", "tracking.uri": None}, source=source)
    assert tracking_uri(load_config(copy / "params.yaml"), copy) == f"sqlite:///{copy / 'mlflow.db'}"
    written = yaml.safe_load((copy / "params.yaml").read_text())
    assert written["profile"] == "smoke" and "profile" not in written["profiles"]["smoke"]
