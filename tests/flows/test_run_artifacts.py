"""The Prefect artifacts of a pipeline run: rows and links built from a family's evaluation and the MLflow store."""
from __future__ import annotations

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


def test_an_mlflow_link_points_at_the_servers_run_page_and_never_carries_credentials():
    assert mlflow_run_link("http://mlflow:5000/", "3", "abc") == "http://mlflow:5000/#/experiments/3/runs/abc"
    assert mlflow_run_link("https://admin:s3cret@mlflow.example.org", "1", "r") == \
        "https://mlflow.example.org/#/experiments/1/runs/r"
    assert mlflow_run_link("sqlite:///tmp/mlflow.db", "1", "r") is None  # a local store has no page to link
