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
    with pytest.raises(ConfigError, match=rf"--family {family} has no sweep\.space entry \(families with one: "
                                          r"vision, recsys\)"):
        main()


def test_image_families_are_those_on_the_image_kit(config):
    from tasks.images.config import image_families

    assert image_families(config) == ["vision", "digits"]
