"""``make smoke`` replaces only a folder it made itself."""
from __future__ import annotations

import pytest

from flows.smoke import MARK, smoke
from tasks.errors import ConfigError, PipelineError


def test_a_folder_that_is_not_a_smoke_copy_is_never_removed(tmp_path):
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "params.yaml").write_text("mine")
    with pytest.raises(PipelineError, match="is not a smoke copy"):
        smoke(precious)
    assert (precious / "params.yaml").read_text() == "mine"


@pytest.mark.fault("params", "`make smoke` (`flows.smoke`) with a --family params.yaml does not name",
                   "refused in one line before the older smoke copy is removed or a pipeline starts")
def test_an_unknown_family_is_refused_before_the_older_copy_is_replaced(tmp_path, monkeypatch):
    """Before: the older copy (its MLflow store, its results) was removed, the project copied again and a pipeline
    process started (a Prefect temporary server) before the family was refused, in several lines."""
    import flows.smoke

    older = tmp_path / "project"
    (older / ".git").mkdir(parents=True)
    (older / MARK).write_text("a smoke copy\n")
    (older / "mlflow.db").write_text("its runs")

    def no_pipeline(*args, **kwargs):
        raise AssertionError("the pipeline ran")

    monkeypatch.setattr(flows.smoke, "run_pipeline", no_pipeline)
    with pytest.raises(ConfigError, match=r"^--family nope is not one of families \["):
        smoke(older, ["nope"])
    assert (older / "mlflow.db").read_text() == "its runs" and (older / MARK).exists()
