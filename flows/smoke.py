"""``make smoke``: the whole stage graph and every family's gate on the small smoke profile, in a few minutes.

It runs in a scratch copy of the project (``.smoke/project`` by default: its own git repo, DVC cache, SQLite MLflow
store and model registry), so this project's params.yaml, outputs, dvc.lock and registry are never touched, and a
tracking server named by ``$MLFLOW_TRACKING_URI`` is not used. Each run starts from a fresh copy of the current
sources. The Prefect runs go to whatever Prefect API is configured (an ephemeral one by default).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from flows.benchmark import run_pipeline
from flows.workspace import PROJECT, copy_project
from tasks.config import PARAMS_FILE, load_config
from tasks.errors import ConfigError, PipelineError, run_cli

# In every smoke copy, the only kind of folder a new smoke run may replace (inside .git: an untracked file would
# mark the copy's runs dirty)
MARK = ".git/kdq-smoke-copy"


def smoke(dest: Path, families: list[str] | None = None) -> tuple[float, dict]:
    """Copy the project to ``dest`` (replacing an older smoke copy) on the smoke profile, with the copy's own
    SQLite tracking store whatever params.yaml names, and run the pipeline there; return its wall seconds and the
    per-stage statuses, seconds and metrics of its MLflow parent run."""
    # checked before an older copy (its runs and results) is removed and a pipeline process (Prefect's temporary
    # server) started only to refuse the family
    mine = load_config(PROJECT / PARAMS_FILE, "smoke")   # the params the copy is made from
    if unknown := [f for f in families or [] if f not in mine.families]:
        raise ConfigError(f"--family {unknown[0]} is not one of families {mine.families}")
    if dest.exists():
        if not (dest / MARK).exists():
            raise PipelineError(f"{dest}: exists and is not a smoke copy; give --dir a new folder (nothing was removed)")
        shutil.rmtree(dest)
    root = copy_project(dest, {"profile": "smoke", "tracking.uri": None})
    (root / MARK).write_text("a scratch copy made by `make smoke`; replaced by the next one\n")
    return run_pipeline(root, families)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(".smoke") / "project",
                        help="where the scratch copy goes (replaced on each run; default: .smoke/project)")
    parser.add_argument("--family", action="append", dest="families",
                        help="only this family's stages and gate (repeatable; default: every family)")
    args = parser.parse_args()
    dest = args.dir.resolve()
    wall, info = smoke(dest, args.families)
    ran = sum(status == "ran" for status in info["statuses"].values())
    gates = len(args.families or load_config(dest / "params.yaml").families)
    print(f"\nsmoke run: {ran} stages and {gates} gate(s) in {wall:.0f} s, in {dest} "
          f"(its MLflow store: sqlite:///{dest / 'mlflow.db'}); this project was not touched")


if __name__ == "__main__":
    run_cli(main)
