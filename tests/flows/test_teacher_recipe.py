"""The teacher recipe benchmark: each arm trained once, its live and averaged weights scored on validation (and,
where the recipe flips images, with flip test-time averaging), test beside for reference; arms resume."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import yaml

from tests.conftest import write_processed

TINY = {"arch": {"stem": 4, "widths": [8, 16], "blocks": [1, 1]}, "batch_size": 32, "threads": 1,
        "eval_batch_size": 64}


@pytest.mark.slow
@pytest.mark.parametrize("family,flips", [("vision", True), ("digits", False)])
def test_every_arm_is_scored_on_validation_and_resumes(raw_params, tmp_path, monkeypatch, capsys, family, flips):
    rng = np.random.default_rng(0)
    write_processed(tmp_path / "data", {name: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                                               rng.integers(0, 10, n).astype(np.int64))
                                        for name, n in (("train", 96), ("val", 48), ("test", 48))})
    params = {**raw_params, "teacher": {**raw_params["teacher"],
                                        family: {**raw_params["teacher"][family], **TINY}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    argv = ["teacher_recipe", "--family", family, "--epochs", "1", "--data", str(tmp_path / "data"), "--work",
            str(tmp_path / "work"), "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out.json")]
    monkeypatch.setattr(sys, "argv", argv)
    from flows.teacher_recipe import main

    main()
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith(("| params |", "| erasing |"))]
    assert len(rows) == 2 * 2 * (2 if flips else 1)   # arms x (live, moving average) x (plain, flip TTA)
    assert ("| yes |" in printed) is flips and "best on validation: " in printed
    doc = json.loads((tmp_path / "out.json").read_text())
    assert set(doc["arms"]) == {"params", "erasing"} and doc["ema"] == 0.998
    assert all(0.0 <= s["val"] <= 1.0 and 0.0 <= s["test"] <= 1.0 for a in doc["arms"].values() for s in a["scores"])
    assert (tmp_path / "work" / family / "erasing" / "last.pt").exists()

    main()   # every arm resumes from its finished checkpoint: nothing trains again, the same scores
    again = capsys.readouterr().out
    resumed = json.loads((tmp_path / "out.json").read_text())["arms"]
    assert "epoch 1/1" not in again
    assert {a: (r["history"], r["scores"]) for a, r in resumed.items()} == {
        a: (r["history"], r["scores"]) for a, r in doc["arms"].items()}


def test_a_family_that_is_no_image_family_is_refused(monkeypatch):
    from flows.teacher_recipe import main
    from tasks.errors import ConfigError

    monkeypatch.setattr(sys, "argv", ["teacher_recipe", "--family", "recsys", "--epochs", "1"])
    with pytest.raises(ConfigError, match=r"--family recsys is no image family \(families: vision, recsys"):
        main()
