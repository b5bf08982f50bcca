"""What a gate compares its candidate with: a champion only when its rows were split as today's are."""
from __future__ import annotations

import pytest

from tests.flows.test_promotion import _gate, _lenient, project  # noqa: F401 - the fixture, used by name


@pytest.mark.fault("promotion", "a champion that records no split params (registered before data.split_params was "
                   "recorded, or by hand)", "the champion is not compared on today's test rows: the gate says it "
                   "records no split params and judges the candidate on the floors and the teacher; a passing "
                   "candidate is registered as challenger only, champion left to a promotion by hand")
def test_a_champion_that_records_no_split_params_is_not_compared(project, raw_params, tmp_path):  # noqa: F811
    """Before: a champion without a ``data.split_params`` tag (and no warm start plan naming them) was scored on
    today's test rows as if split the same way, while ``tasks.lineage.same_split`` says it is not and the warm start
    refuses the same champion ("recorded no data params"): its score may be on rows it trained on."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _lenient(raw_params)
    first, client = _gate(project, cfg, uri)
    assert first["champion"]
    client.delete_model_version_tag(first["name"], first["version"], "data.split_params")   # as registered before
    report, _ = _gate(project, cfg, uri)
    assert report["champion_before"] == {"version": "1", "unverified": True,
                                         "incomparable": report["champion_before"]["incomparable"]}
    (check,) = [c for c in report["checks"] if c["name"] == "vs_champion"]
    assert check["passed"] and check["why"].startswith("champion v1 records no split params")
    assert "not compared (floors and teacher only)" in check["why"]
    assert not any(c["name"].startswith("accuracy_drop_vs_champion") for c in report["checks"])
    tags = client.get_model_version(report["name"], report["version"]).tags
    assert tags["gate.vs_champion"] == "pass" and tags["audit.champion_before"] == "1"
    # not replaced unseen (a rollback's choice, say): challenger only, champion moved by hand (before: promoted)
    assert report["passed"] and not report["champion"] and "made champion by hand" in check["why"]
    assert str(client.get_model_version_by_alias(report["name"], "champion").version) == "1"
    assert tags["audit.decision"] == "challenger"
