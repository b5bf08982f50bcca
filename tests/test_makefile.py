"""The Makefile's commands name modules that exist. Before: ``make benchmark-recsys`` still ran
``flows.recsys_benchmark`` after the module moved into the recommender's package, and no test ran the target."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_the_makefile_runs_exists():
    modules = set(re.findall(r"\$\(PY\) -m ([\w.]+)", (ROOT / "Makefile").read_text()))
    assert {"flows.pipeline", "tasks.recsys.benchmark", "flows.ablation"} <= modules
    missing = sorted(m for m in modules if m not in ("pip", "pytest") and importlib.util.find_spec(m) is None)
    assert not missing, f"Makefile runs modules that do not exist: {missing}"


def test_clean_results_removes_every_familys_data():
    """Before: the families were listed by hand and data/clicks, added later, was left behind. Run as CI runs it
    (``make test``), the inner make printed "make[1]: Entering directory" first: it is told not to."""
    import os
    import subprocess

    import yaml

    families = yaml.safe_load((ROOT / "params.yaml").read_text())["families"]
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    command = ["make", "--no-print-directory", "-n", "clean-results"]
    dry = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    removed = dry.stdout.split()
    assert removed[:2] == ["rm", "-rf"] and {"models", "mlflow.db"} <= set(removed)
    assert {f"data/{family}" for family in families} <= set(removed), removed


def test_make_worker_passes_a_project_folder_with_spaces_whole(tmp_path):
    """Before: ``KDQ_PROJECT_DIR=$(CURDIR)`` unquoted: in "My Projects/kdq" the shell ran "Projects/kdq" as a command
    (exit 127) and no worker started."""
    import os
    import subprocess

    project = tmp_path / "My Projects" / "Modèles kdq"
    (project / "venv" / "bin").mkdir(parents=True)
    (project / "Makefile").write_text((ROOT / "Makefile").read_text())
    for name in ("pyproject.toml", "constraints.txt"):   # the install stamp's prerequisites, older than the stamp
        (project / name).write_text("")
    (project / "venv" / ".installed").write_text("")
    prefect = project / "venv" / "bin" / "prefect"   # stands in for Prefect's CLI: says what it was given
    prefect.write_text('#!/bin/sh\nprintf "%s\\n" "$KDQ_PROJECT_DIR" "$*"\n')
    prefect.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(["make", "--no-print-directory", "-s", "worker", "VENV=venv"], cwd=project, env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(project), "worker start --pool kdq-process"]
