"""The per-run HTML report: plots inlined, tables filled, a stale ablation file named instead of failing."""
from __future__ import annotations

import pytest

from tasks.report import ReportView, ablation_table, render_report

MEASURED = {"val_accuracy": 0.931, "test_accuracy": 0.93, "bytes": 120_000, "gzip_bytes": 90_000, "parameters": 87_866, "macs": 5_000_000,
            "latency_b1_p50_ms": 0.05, "latency_b1_p95_ms": 0.07, "latency_b1_p99_ms": 0.09,
            "throughput_b64_ips": 30_000.0}
EVALUATION = {"models": {"teacher_fp32": {**MEASURED, "test_accuracy": 0.94, "bytes": 4_800_000},
                         "student_int8": MEASURED}}
GATE = {"passed": False, "checks": [{"name": "min_accuracy", "value": 0.93, "op": ">=", "threshold": 0.92,
                                     "passed": True, "why": "floor"},
                                    {"name": "max_accuracy_drop_vs_teacher", "value": 0.012, "op": "<=",
                                     "threshold": 0.01, "passed": False, "why": "relative to the teacher"}]}
ABLATION = {"date": "2026-11-28", "machine": "test machine", "seeds": [0, 1, 2],
            "rows": [{"arm": "KD + QAT", "precision": "INT8", "val_mean": 0.9302, "mean": 0.9271, "std": 0.0005, "n": 3,
                      "min_top1_agreement": 0.9931,
                      "parameters": 87_866, "nonzero": 87_866, "bytes": 115_000, "gzip_bytes": 88_000,
                      "latency_ms": 0.125, "throughput_ips": 41_000.0}]}
IMAGES = ReportView("Fashion-MNIST compression report", "accuracy", "latency_b1", "batch-1", ablation=True)


def test_report_inlines_both_plots_and_every_table():
    page = render_report(EVALUATION, GATE, ABLATION, {"git commit": "abc"}, IMAGES)
    assert page.count("<svg") == 2 and "<?xml" not in page
    assert "student INT8 (the candidate)" in page and "max_accuracy_drop_vs_teacher" in page and "FAIL" in page
    assert "92.71 ± 0.05 (n=3)" in page and "test machine" in page
    assert "<td>93.02</td>" in page and "val accuracy" in page and "<td>0.9931</td>" in page
    assert "<td>0.125</td>" in page and "<td>41,000</td>" in page   # each arm's speed beside its size


def test_an_ablation_file_without_validation_scores_asks_for_a_rerun():
    old = {**ABLATION, "rows": [{k: v for k, v in ABLATION["rows"][0].items() if k != "val_mean"}]}
    assert "make ablation" in ablation_table(old)


def test_stale_ablation_file_is_named_not_fatal():
    stale = {**ABLATION, "rows": {"KD + QAT": ABLATION["rows"][0]}}  # rows keyed by arm, as an older version wrote
    text = ablation_table(stale)
    assert "not in this version's format" in text and "make ablation" in text
    assert "re-run" in render_report(EVALUATION, GATE, stale, {}, IMAGES)


@pytest.mark.slow
def test_the_recommender_gets_the_same_report_on_its_own_metric_and_latency():
    measured = {"val_auc": 0.85, "test_auc": 0.8512, "bytes": 20_000, "gzip_bytes": 15_000, "parameters": 10_840,
                "latency_p50_ms": 1.0, "latency_p95_ms": 1.1, "latency_p99_ms": 1.2}
    evaluation = {"models": {"teacher_fp32": {**measured, "test_auc": 0.86, "bytes": 230_000},
                             "student_int8": measured}}
    view = ReportView("Recsys compression report", "auc", "latency", "one-request")
    page = render_report(evaluation, GATE, None, {"git commit": "abc"}, view)
    assert page.count("<svg") == 2 and "Recsys compression report" in page and "test auc" in page
    assert "<td>0.8512</td>" in page and "one-request p50 ms" in page and "Ablation" not in page


def test_each_models_latencies_say_which_measurement_they_come_from():
    """Before: the gate's paired timings of the candidate and the teacher stood in one table (and one latency plot)
    with the evaluate stage's timings of the other models, taken at another time under another load, unmarked."""
    gated = {"models": {"teacher_fp32": {**EVALUATION["models"]["teacher_fp32"], "latency_timed_by": "gate"},
                        "student_fp32": MEASURED,
                        "student_int8": {**MEASURED, "latency_timed_by": "gate"}}}
    page = render_report(gated, GATE, None, {}, IMAGES)
    assert page.count("<td>the gate, in paired rounds</td>") == 2 and page.count("<td>the evaluate stage</td>") == 1
    assert "latencies timed by" in page
