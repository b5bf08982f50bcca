"""The export and sweep benchmarks name a family they cannot run, before any work (before: a traceback from deep
inside, after the project was copied or the data read)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tasks.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", ["recsys", "audio"])
def test_the_export_benchmark_refuses_a_family_that_is_no_image_family(family, monkeypatch):
    from flows.export_benchmark import main

    monkeypatch.setattr(sys, "argv", ["export_benchmark", "--family", family, "--root", str(ROOT)])
    with pytest.raises(ConfigError, match=rf"--family {family} is no image family \(families: vision, recsys"):
        main()


@pytest.mark.parametrize("family", ["text", "audio"])
def test_the_sweep_benchmark_refuses_a_family_without_a_sweep_space(family, monkeypatch):
    from flows.sweep_benchmark import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["sweep_benchmark", "--family", family])
    from flows.sweep import UsageError

    with pytest.raises(UsageError, match=rf"--family: '{family}' has no sweep\.space entry; choose one of "
                                         r"\['recsys', 'vision'\]"):
        main()


def test_image_families_are_those_on_the_image_kit(config):
    from tasks.images.config import image_families

    assert image_families(config) == ["vision", "digits"]


@pytest.mark.parametrize("args,message", [
    (["--family", "clicks", "--batches", "1"], (r"--family clicks: replay compares warm-start policies; clicks has no "
                                                r"warm_start block \(families with one: vision, recsys, digits\)")),
    (["--family", "recsys", "--profile", "nosuch"], r"params\.yaml: profile: unknown profile 'nosuch'"),
])
def test_the_replay_benchmark_refuses_what_it_cannot_replay_before_making_any_folder(args, message, monkeypatch,
                                                                                     tmp_path):
    """Before: an AttributeError traceback for a family without warm start; an unknown profile only after the
    ``--keep`` folder was made."""
    from flows.replay_benchmark import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["replay_benchmark", *args, "--keep", str(tmp_path / "kept")])
    with pytest.raises(ConfigError, match=message):
        main()
    assert not (tmp_path / "kept").exists()


def test_the_pipeline_benchmark_names_the_users_params_file_not_its_scratch_copy(monkeypatch, tmp_path):
    """Before: a params.yaml that does not load was named by the benchmark's temporary copy of the project, after the
    copy; and a --family of none of its families ran a whole pipeline of nothing."""
    import flows.benchmark
    from flows.benchmark import main

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("profile: full", "profle: full"))
    monkeypatch.setattr(flows.benchmark, "PROJECT", tmp_path)   # the project it copies
    monkeypatch.setattr(sys, "argv", ["benchmark", "--family", "vision"])
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/params\.yaml is invalid:"):
        main()
    monkeypatch.setattr(flows.benchmark, "PROJECT", ROOT)
    monkeypatch.setattr(sys, "argv", ["benchmark", "--family", "audio"])
    with pytest.raises(ConfigError, match=r"--family audio is not one of families \['vision', 'recsys'"):
        main()


def test_the_stage_graph_command_is_a_one_line_error_for_a_folder_without_dvc_yaml(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "flows.stage_graph", "--root", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: PipelineError: ") and "dvc.yaml" in done.stderr
