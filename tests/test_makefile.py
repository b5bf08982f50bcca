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
