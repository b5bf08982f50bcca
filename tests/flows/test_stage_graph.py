"""dvc.yaml is the one stage graph: the flow's order derives from it, and every stage declares what it uses."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from flows.stage_graph import stage_graph
from tasks.config import config_model
from tests.conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
FAMILIES = yaml.safe_load((ROOT / "params.yaml").read_text())["families"]
PRODUCERS = {out if isinstance(out, str) else next(iter(out)): name
             for name, spec in DVC.items() for out in spec.get("outs", [])}


def test_graph_has_exactly_the_stages_of_dvc_yaml_in_a_valid_order():
    nodes = stage_graph(ROOT)
    assert sorted(n.name for n in nodes) == sorted(DVC)
    position = {n.name: i for i, n in enumerate(nodes)}
    for name, spec in DVC.items():
        needed = {PRODUCERS[d] for d in spec.get("deps", []) if d in PRODUCERS}
        assert set(next(n for n in nodes if n.name == name).upstream) == needed
        assert all(position[u] < position[name] for u in needed)


def test_each_stage_lists_its_own_module_and_real_params_keys(raw_params):
    for name, spec in DVC.items():
        # stage <kind>_<family> runs its family's module tasks/<family>/<kind>.py
        kind, family = name.rsplit("_", 1)
        assert re.search(r"python -m ([\w.]+)", spec["cmd"]).group(1) == f"tasks.{family}.{kind}", name
        assert f"tasks/{family}/{kind}.py" in spec["deps"]
        for dep in spec["deps"]:
            assert dep in PRODUCERS or (ROOT / dep).is_file(), f"{name}: dep {dep} is neither a file nor a stage output"
        for key in spec["params"]:
            node = raw_params
            for part in key.split("."):
                assert part in node, f"{name}: params key {key} is not in params.yaml"
                node = node[part]


def test_config_sections_are_all_read_by_some_stage():
    read = {k.split(".")[0] for spec in DVC.values() for k in spec["params"]}
    # tracking, pipeline, families and gate configure the flow (the gate moves registry state, not DVC's to cache);
    # ablation and sweep configure commands outside the graph
    outside = {"tracking", "pipeline", "families", "gate", "ablation", "sweep"}
    model = config_model(tuple(FAMILIES))
    sections = {f.alias or n for n, f in model.model_fields.items()} - outside
    assert {"distill", "validate", "teacher"} <= sections   # the families' stage keys, not only the generic ones
    assert sections <= read


@pytest.mark.slow
def test_every_family_is_validated_before_any_family_trains():
    order = [n.name for n in stage_graph(ROOT)]
    validations = [i for i, name in enumerate(order) if name.startswith("validate_")]
    trainings = [i for i, name in enumerate(order) if name.startswith("train_teacher_")]
    assert len(validations) == len(trainings) == len(FAMILIES) and max(validations) < min(trainings)


def test_outputs_persist_so_a_failed_stage_keeps_the_previous_ones():
    """DVC deletes an output before its stage runs unless it is ``persist``; the stages stage their outputs and move
    them in on success (tasks/staging.py). Validation reports are the exception: a failed validation leaves none."""
    for name, spec in DVC.items():
        for kind in ("outs", "metrics", "plots"):
            for out in spec.get(kind, []):
                path, flags = (out, {}) if isinstance(out, str) else next(iter(out.items()))
                wanted = not name.startswith("validate_")
                assert flags.get("persist", False) is wanted, f"{name}: {path} persist should be {wanted}"


def _dvc_stages():
    """Each stage's code deps and params keys as DVC itself reads them from dvc.yaml."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(ROOT)) as repo:
        stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
        return {s.name: ({str(d.def_path) for d in s.deps if str(d.def_path).startswith("tasks/")},
                         {k for d in s.deps if hasattr(d, "params") for k in (d.params or [])}, s.cmd) for s in stages}


@pytest.mark.slow
def test_every_stage_depends_on_exactly_the_code_it_imports():
    """Before: evaluate_recsys missed tasks/recsys/prepare.py, the recsys compression stages tasks/distillation.py,
    validate_vision tasks/expectations.py (so DVC served stale results), and every vision stage depended on the
    recommender's model code through tasks/artifacts.py."""
    from flows.stage_deps import model_modules as models_of
    from flows.stage_deps import module_closure

    model_modules = models_of(ROOT)
    assert {"tasks/images/models.py", "tasks/ctr/config.py", "tasks/onnx_teacher.py"} <= model_modules
    for name, (code, _, cmd) in _dvc_stages().items():
        imported = module_closure(re.search(r"python -m (tasks\.[\w.]+)", cmd).group(1), ROOT)
        assert not imported - code, f"{name}: dvc.yaml misses {sorted(imported - code)}"
        # its family's params model (tasks.config loads it by name): its defaults and checks shape what the stage runs
        family = name.rsplit("_", 1)[1]
        family_config = module_closure(f"tasks.{family}.config", ROOT)
        assert family_config <= code, f"{name}: dvc.yaml misses {sorted(family_config - code)}"
        others = {d for d in code if d.startswith(tuple(f"tasks/{f}/" for f in FAMILIES if f != family))}
        assert not others, f"{name}: depends on another family's modules {sorted(others)}"
        if "tasks/artifacts.py" in imported and not name.startswith(("prepare", "validate")):
            # any teacher file may hold an imported ONNX graph, which that module runs
            assert "tasks/onnx_teacher.py" in code, f"{name}: loads models but misses tasks/onnx_teacher.py"
        # beyond its imports, a stage depends on the model code load_model builds its family's models from
        assert code - imported <= model_modules | family_config, \
            f"{name}: dvc.yaml lists {sorted(code - imported)}, never imported"
        # ... of its own package, or of a kit it builds on (tasks/images for an image family)
        kits = {m.rsplit("/", 1)[0] + "/" for m in imported if m.count("/") == 2 and m.split("/")[1] not in FAMILIES}
        family_models = {m for m in model_modules if m.startswith((f"tasks/{family}/", *kits))}
        if "tasks/artifacts.py" in imported and not name.startswith("prepare"):
            assert family_models <= code, f"{name}: loads models built by {sorted(family_models)}, not in its deps"


def test_every_import_form_of_a_family_package_counts_as_a_dependency(tmp_path):
    """Inside a family's package ``from tasks.<family> import models`` and ``from .data import X`` are natural; both
    were missed (the closure stopped at the package), so dvc.yaml could leave out code the stage runs."""
    from flows.stage_deps import module_closure

    package = tmp_path / "tasks" / "fam"
    package.mkdir(parents=True)
    (package / "prepare.py").write_text("from tasks.fam import models\nfrom .data import load\nfrom .. import io\n")
    (package / "models.py").write_text("from tasks.config import Config\n")
    (package / "data.py").write_text("import tasks.fam.shapes as shapes\n")
    (package / "shapes.py").write_text("")
    for name in ("io.py", "config.py"):
        (tmp_path / "tasks" / name).write_text("")
    assert module_closure("tasks.fam.prepare", tmp_path) == {
        "tasks/fam/prepare.py", "tasks/fam/models.py", "tasks/fam/data.py", "tasks/fam/shapes.py", "tasks/io.py",
        "tasks/config.py"}


def test_the_vision_teacher_does_not_depend_on_recommender_code_params_or_unrelated_profile_values(raw_params):
    """Before: every stage listed tasks/config.py's whole closure and the whole ``profiles`` tree, so editing a
    smoke-profile value or a recommender knob or module re-ran the 30-minute vision teacher."""
    stages = _dvc_stages()
    code, params, _ = stages["train_teacher_vision"]
    assert not [c for c in code if any(word in c for word in ("recsys", "ctr", "movielens"))], code
    assert "tasks/quantization.py" not in code  # editing QAT code does not re-run the teacher
    assert "profiles" not in params and not [p for p in params if "recsys" in p], params
    assert "profiles.smoke.teacher.vision" in params  # what the smoke profile does overlay is still tracked
    for name, (_, keys, _) in stages.items():  # every overlaid key tracked, in every profile
        for profile, overlay in raw_params["profiles"].items():
            for key in (k for k in keys if not k.startswith("profile")):
                node = overlay
                for part in key.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                assert node is None or f"profiles.{profile}.{key}" in keys, f"{name}: profiles.{profile}.{key}"


def test_weight_sharing_tracks_only_the_export_params_it_reads():
    """Before: editing export.<family>.parity or .threads (what the export stage checks and times with) re-ran the
    image families' weight-sharing fine-tune, which reads only the ONNX opset and calibration size."""
    stages = _dvc_stages()
    for family in ("vision", "digits"):
        _, params, _ = stages[f"share_{family}"]
        tracked = [p for p in params if p.split(".", 2)[:2] == ["export", family] or "smoke.export" in p]
        assert sorted(tracked) == [f"export.{family}.calibration_size", f"export.{family}.opset"], tracked


def test_the_readmes_stage_graph_is_dvc_yamls():
    from flows.stage_graph import mermaid

    readme = (ROOT / "README.md").read_text()
    drawn = readme.split("```mermaid\n", 1)[1].split("```", 1)[0].strip()
    assert drawn == mermaid(stage_graph(ROOT)), "README's graph is stale: paste `python -m flows.stage_graph`"


def test_the_gate_finds_each_familys_files_where_dvc_yaml_puts_them(raw_params):
    """Before: the gate (flows.gating.paths) restated every path of dvc.yaml (and the ablation its data and teacher)."""
    from flows.gating import paths
    from flows.stage_graph import stage_paths
    from tasks.errors import PipelineError

    declared = {stage: {next(iter(o)) if isinstance(o, dict) else o for kind in ("outs", "metrics", "plots")
                        for o in spec.get(kind, [])} for stage, spec in DVC.items()}
    for family in raw_params["families"]:
        where = paths(ROOT, family)
        assert str(where["onnx"]) in declared[f"export_{family}"]
        assert str(where["evaluation"]) in declared[f"evaluate_{family}"]
        assert str(where["data"]) in declared[f"prepare_{family}"]
        assert where["candidate"].parent == where["teacher"].parent == where["onnx"]
        assert any(Path(out).parent == where["reports"] for out in declared[f"validate_{family}"])
    with pytest.raises(PipelineError, match="no stage 'evaluate_audio'"):
        stage_paths(ROOT, "evaluate_audio")


@pytest.mark.slow
def test_a_folder_that_is_no_project_is_a_one_line_error(tmp_path, monkeypatch):
    """Before: ``flows.export_benchmark --root <a folder with params.yaml alone>`` ended in FileNotFoundError's
    traceback, and the flows reading the graph (pipeline, sweep, ingest) in DVC's NotDvcRepoError."""
    import subprocess
    import sys

    from flows.restore import restore_data
    from tasks.errors import PipelineError

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    command = [sys.executable, "-m", "flows.export_benchmark", "--family", "vision", "--root", str(tmp_path)]
    proc = subprocess.run(command, check=False, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    line = (f"error: PipelineError: {tmp_path / 'dvc.yaml'}: no such file: {tmp_path} is not a project folder "
            "(its dvc.yaml holds the stages)")
    assert proc.stderr.strip().splitlines() == [line]
    with pytest.raises(PipelineError, match=r"dvc\.yaml: no such file"):
        stage_graph(tmp_path)
    # restoring a version: a commit without a snapshot stage has its data from pinned sources, one without a
    # dvc.yaml is no project (it was not taken for one without a snapshot stage)
    assert restore_data(ROOT, ROOT, "text") == "pinned sources (no snapshot stage at that commit)"
    with pytest.raises(PipelineError, match=r"dvc\.yaml: no such file"):
        restore_data(ROOT, tmp_path, "vision")
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    with pytest.raises(PipelineError, match="not a DVC project"):
        stage_graph(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)   # `--root .` names the folder it means (it read "... . is not a project folder")
    with pytest.raises(PipelineError, match=f"{re.escape(str(elsewhere.resolve()))} is not a project folder"):
        stage_graph(Path("."))


@pytest.mark.slow
@pytest.mark.fault("runs", "a flow starts while another family's DVC process is rewriting dvc.lock",
                   "the graph is read again until the file is whole; a dvc.lock DVC still cannot read is a one-line "
                   "error naming it (before: DVC's validation error's traceback at the flow's start)")
def test_the_graph_is_read_again_while_dvc_lock_is_rewritten(tmp_path):
    import subprocess
    import sys
    import threading
    import time

    import zc.lockfile

    from tasks.errors import PipelineError

    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n"
                                       "  b:\n    cmd: cp a.txt b.txt\n    deps: [a.txt]\n    outs: [b.txt]\n")
    whole = ("schema: '2.0'\nstages:\n  a:\n    cmd: echo a > a.txt\n    outs:\n    - path: a.txt\n"
             "      hash: md5\n      md5: 60b725f10c9c85c70d97880dfe8191b3\n      size: 2\n")
    (tmp_path / "dvc.lock").write_text(whole[:60])   # DVC truncates it, then writes it
    # DVC's lock held all along (a push holds it for minutes): the graph is read without waiting for it
    lock = zc.lockfile.LockFile(str(tmp_path / ".dvc" / "tmp" / "lock"))
    threading.Timer(1.0, lambda: (tmp_path / "dvc.lock").write_text(whole)).start()
    start = time.monotonic()
    try:
        assert [(n.name, n.upstream) for n in stage_graph(tmp_path)] == [("a", ()), ("b", ("a",))]
    finally:
        lock.close()
    assert time.monotonic() - start < 6.0
    (tmp_path / "dvc.lock").write_text(whole[:60])   # left so: the user's to mend
    with pytest.raises(PipelineError, match=rf"{tmp_path / 'dvc.lock'}: DVC cannot read it"):
        stage_graph(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: [\n")   # dvc.yaml's own error: said at once
    start = time.monotonic()
    with pytest.raises(PipelineError, match=rf"{tmp_path / 'dvc.yaml'}: DVC cannot read it"):
        stage_graph(tmp_path)
    assert time.monotonic() - start < 5.0


def test_the_docs_run_dvc_with_the_projects_python_first_on_path():
    """A stage's command is ``python -m tasks...``: DVC runs whichever ``python`` is first on PATH. Before, the README
    said ``.venv/bin/dvc exp run ...`` (and docs/byom.md ``.venv/bin/dvc repro``), which, without the venv activated,
    ran the stages with the system's Python: ``No module named 'pandas'``."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    bare = [f"{page.relative_to(ROOT)}:{n}" for page in pages
            for n, line in enumerate(page.read_text().splitlines(), 1) if ".venv/bin/dvc " in line]
    assert not bare, f"run DVC in a shell with `source .venv/bin/activate`, not as .venv/bin/dvc: {bare}"


def test_every_output_is_kept_by_git_or_by_dvc():
    """``dvc metrics diff``, ``dvc exp show`` and ``dvc metrics show -a`` read a metrics file of another revision from
    git or from DVC's cache. Before: each family's evaluation.json (the INT8 student's scores, latency, size) was
    ``cache: false`` and gitignored (``/metrics/``): kept by neither, so every diff showed ``old: None`` and every
    experiment row ``FileNotFoundError``. The same for every output: a clone's ``dvc pull`` restores none DVC does
    not cache, and a missing output is a changed stage: the training checkpoints and the Data Docs (``cache: false``
    until 2026-12-07) had every clone re-run each family's training and validation."""
    import subprocess

    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    uncached = [next(iter(out)) for stage in stages.values() for kind in ("outs", "metrics", "plots")
                for out in stage.get(kind, []) if isinstance(out, dict) and next(iter(out.values())).get("cache") is False]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *uncached], cwd=ROOT, capture_output=True,
                             text=True, check=False).stdout.split() if uncached else []
    assert not ignored, f"outputs kept by neither git (ignored) nor DVC (cache: false): {ignored}"
