"""The Prefect artifacts of a pipeline run: rows and links built from a family's evaluation and the MLflow store."""
from __future__ import annotations

import logging
from pathlib import Path

from flows.run_artifacts import evaluation_rows, mlflow_run_link


def test_evaluation_rows_hold_each_models_scores_latency_and_size_rounded():
    evaluation = {"models": {"teacher_fp32": {"test_accuracy": 0.912345, "val_accuracy": 0.9, "bytes": 1000,
                                              "latency_b1_p95_ms": 1.23456, "macs": 7},
                             "student_int8": {"test_accuracy": 0.9, "val_accuracy": 0.88, "bytes": 100,
                                              "latency_b1_p95_ms": 0.5, "macs": 3}}}
    rows = evaluation_rows(evaluation)
    assert rows == [{"model": "teacher_fp32", "val_accuracy": 0.9, "test_accuracy": 0.9123,
                     "latency_b1_p95_ms": 1.2346, "bytes": 1000},
                    {"model": "student_int8", "val_accuracy": 0.88, "test_accuracy": 0.9,
                     "latency_b1_p95_ms": 0.5, "bytes": 100}]
    # a family's own ranking cut-off and unit of latency (before: only NDCG@10 and batch or request latency showed)
    text = evaluation_rows({"models": {"student_int8": {"test_accuracy": 0.8, "sentence_p95_ms": 0.21}}})
    recsys = evaluation_rows({"models": {"teacher_fp32": {"test_auc": 0.85, "test_ndcg_at_5": 0.41,
                                                         "latency_p95_ms": 2.5, "latency_p50_ms": 2.0}}})
    assert text == [{"model": "student_int8", "test_accuracy": 0.8, "sentence_p95_ms": 0.21}]
    assert recsys == [{"model": "teacher_fp32", "test_auc": 0.85, "test_ndcg_at_5": 0.41, "latency_p95_ms": 2.5}]


def test_an_mlflow_link_points_at_the_servers_run_page_and_never_carries_credentials():
    assert mlflow_run_link("http://mlflow:5000/", "3", "abc") == "http://mlflow:5000/#/experiments/3/runs/abc"
    assert mlflow_run_link("https://admin:s3cret@mlflow.example.org", "1", "r") == \
        "https://mlflow.example.org/#/experiments/1/runs/r"
    assert mlflow_run_link("sqlite:///tmp/mlflow.db", "1", "r") is None  # a local store has no page to link
    # before: the brackets of an IPv6 address were dropped (http://::1:5000/...)
    assert mlflow_run_link("http://u:p@[::1]:5000", "1", "r") == "http://[::1]:5000/#/experiments/1/runs/r"


def test_the_data_docs_of_a_local_store_are_named_by_a_path_that_exists(tmp_path):
    """Before: the artifact URI's escapes were kept: a project path with a space named `sp%20ace/...`."""
    from flows.run_artifacts import local_index

    page = tmp_path / "sp ace" / "art" / "data_docs" / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text("<html/>")
    assert Path(local_index((tmp_path / "sp ace" / "art").as_uri())).is_file()


def test_the_commands_a_run_prints_open_a_store_in_a_folder_with_spaces(tmp_path, monkeypatch):
    """The MLflow and Prefect UI commands of the run's summary and of its Prefect artifact are quoted for a shell.
    Before: pasted as printed, ``mlflow ui --backend-store-uri sqlite:////home/me/My Projects/kdq/mlflow.db`` failed
    (``Got unexpected extra arguments``)."""
    import shlex
    import sys

    import flows.run_artifacts as artifacts
    from flows.pipeline import summary

    uri = f"sqlite:///{tmp_path / 'My Projects' / 'Modèles kdq' / 'mlflow.db'}"
    said = []
    monkeypatch.setattr(artifacts, "create_table_artifact", lambda *args, **kwargs: None)
    monkeypatch.setattr(artifacts, "create_markdown_artifact", lambda text, **kwargs: said.append(text))
    artifacts.publish_run({}, tmp_path, [], uri, "1", "r")
    (command,) = [part for part in said[0].split("`") if part.startswith("mlflow ui")]
    assert shlex.split(command) == ["mlflow", "ui", "--backend-store-uri", uri]
    text = summary({"stages": {}, "metrics": {}, "parent_run_id": "r", "tracking_uri": uri, "gates": {}}, tmp_path)
    mlflow, prefect = (line for line in text.splitlines() if "ui --backend-store-uri" in line or "server start" in line)
    bin_dir = Path(sys.executable).parent
    assert shlex.split(mlflow) == [str(bin_dir / "mlflow"), "ui", "--backend-store-uri", uri, "--port", "5000"]
    assert shlex.split(prefect, comments=True) == [str(bin_dir / "prefect"), "server", "start"]


def _health(degraded: bool) -> dict:
    return {"version": "3", "degraded": degraded, "drop": 0.08 if degraded else 0.01, "max_drop": 0.05}


def test_a_degraded_champion_that_stays_champion_flags_the_flow_run(prefect_server, caplog):
    """A champion that fell on the recent window and stays champion tags the flow run it was gated in (and logs an
    ALERT); a healthy one, or one replaced by a passing challenger, leaves the run as it is."""
    from prefect import flow, get_client, task
    from prefect.runtime import flow_run

    from flows.run_artifacts import flag_degraded_champion

    @task
    def gate(report: dict) -> bool:
        return flag_degraded_champion("vision", report)

    @flow
    def run(report: dict) -> tuple[bool, str]:
        return gate(report), flow_run.id

    cases = {"degraded, stays": ({"champion_health": _health(True), "champion": False}, True),
             "degraded, replaced": ({"champion_health": _health(True), "champion": True}, False),
             "healthy": ({"champion_health": _health(False), "champion": False}, False),
             "no champion": ({"champion_health": None, "champion": True}, False)}
    task_log = logging.getLogger("prefect.task_runs")   # Prefect's loggers do not propagate to the root's capture
    task_log.addHandler(caplog.handler)
    try:
        for name, (report, flagged) in cases.items():
            said, run_id = run(report)
            with get_client(sync_client=True) as client:
                tags = set(client.read_flow_run(run_id).tags)
            assert said is flagged and tags == ({"champion-degraded", "champion-degraded-vision"} if flagged else
                                                set()), name
    finally:
        task_log.removeHandler(caplog.handler)
    # one record (it may reach the capture twice: through this handler and, when Prefect's loggers propagate, the root)
    alerts = list({id(r): r for r in caplog.records if "ALERT" in r.getMessage()}.values())
    assert [r.levelno for r in alerts] == [logging.ERROR]
    assert "ALERT: vision champion v3 degraded on the recent window (drop 0.08 > 0.05)" in alerts[0].getMessage()


def test_a_champion_not_judged_on_its_recent_window_is_recorded_so():
    """The promote run's tags and metrics say what the gate's report says. Before: a champion whose recent window
    held too few rows was tagged ``champion.health = healthy`` (gate.md: "not judged") and its unmeasured drop logged
    as ``champion.recent_drop``; with no champion yet, ``gate.vs_champion`` was logged as a 0.0 drop."""
    from flows.pipeline import gate_record

    health = {"version": "3", "drop": 0.3, "max_drop": 0.05, "compared": False, "degraded": False, "recent_rows": 40}
    report = {"passed": True, "unchanged": False, "version": "4", "champion_health": health,
              "checks": [{"name": "vs_champion", "value": 0.0, "why": "no champion yet: nothing to be worse than",
                          "compared": False},
                         {"name": "auc_drop_vs_teacher", "value": 0.01, "why": "test auc drop vs the teacher",
                          "compared": True},
                         {"name": "auc_drop_vs_champion_recent", "value": 0.0,   # a window too small to compare on
                          "why": "recent window not compared: 40 test rows both read (fewer than 100)",
                          "compared": False}]}
    metrics, tags = gate_record(report)
    assert tags["champion.health"] == "not judged" and "champion.recent_drop" not in metrics
    assert metrics == {"gate.auc_drop_vs_teacher": 0.01}
    assert tags["gate.passed"] == "true" and tags["registry.version"] == "4" and tags["registry.unchanged"] == "false"
    judged = gate_record({**report, "champion_health": {**health, "compared": True, "degraded": True}})
    assert judged[1]["champion.health"] == "degraded" and judged[0]["champion.recent_drop"] == 0.3
    fine = gate_record({**report, "champion_health": {**health, "compared": True, "drop": 0.01}})
    assert fine[1]["champion.health"] == "healthy"
