"""Stages at once where the graph allows (flows.pipeline.run_graph), as Prefect task runs in a real flow: the order
is checked by what each stage saw when it started, never by wall time."""
from __future__ import annotations

import threading

import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.pipeline import run_graph
from flows.stage_graph import StageNode

# validate_a <- train_a <- export_a ; validate_b <- train_b (two families; validation first)
GRAPH = [StageNode("validate_a", (), checks=True), StageNode("validate_b", (), checks=True),
         StageNode("train_a", ("validate_a",)), StageNode("train_b", ("validate_b",)),
         StageNode("export_a", ("train_a",))]


class Log:
    def __init__(self, meet: set[str] = frozenset()) -> None:
        self.lock, self.started, self.done, self.seen = threading.Lock(), [], [], {}
        self.met = {}
        self.meet = meet   # these stages wait (at most 10 s) until all of them have started
        self.barrier = threading.Barrier(len(meet)) if meet else None

    def run(self, name: str, fail: str | None) -> str:
        with self.lock:
            self.started.append(name)
            self.seen[name] = set(self.done)   # what had finished when it started
        if name in self.meet:
            try:
                self.barrier.wait(timeout=10)
                self.met[name] = True
            except threading.BrokenBarrierError:
                self.met[name] = False
        if name == fail:
            raise RuntimeError(f"{name} failed")
        with self.lock:
            self.done.append(name)
        return "ran"


LOGS: dict[str, Log] = {}   # by test: the flow's and tasks' parameters stay plain strings


@task(task_run_name="{name}", cache_policy=NO_CACHE)
def fake_stage(log: str, name: str, fail: str | None) -> str:
    return LOGS[log].run(name, fail)


@flow
def graph_flow(log: str, width: int, fail: str | None = None) -> dict:
    after: list[str] = []
    return {"statuses": run_graph(GRAPH, width, lambda node: fake_stage.submit(log, node.name, fail), after.append),
            "finished": after}


def _run(log: Log, width: int, fail: str | None = None) -> dict:
    key = str(id(log))
    LOGS[key] = log
    try:
        return graph_flow(key, width, fail)
    finally:
        del LOGS[key]


def _respects_the_graph(log: Log) -> None:
    for node in GRAPH:
        if node.name in log.seen:
            assert set(node.upstream) <= log.seen[node.name], f"{node.name} started before its upstream"
            if not node.checks:
                assert {"validate_a", "validate_b"} <= log.seen[node.name], f"{node.name} started before validation"


def test_one_at_a_time_runs_the_stages_in_graph_order(prefect_server):
    log = Log()
    out = _run(log, 1)
    assert log.started == [n.name for n in GRAPH] and out["finished"] == log.started
    assert out["statuses"] == {n.name: "ran" for n in GRAPH}


def test_two_at_a_time_runs_independent_stages_together_and_keeps_the_order_that_matters(prefect_server):
    log = Log(meet={"train_a", "train_b"})   # each waits for the other: only both running at once gets past
    out = _run(log, 2)
    assert log.met == {"train_a": True, "train_b": True}
    assert out["statuses"] == {n.name: "ran" for n in GRAPH}
    _respects_the_graph(log)


def test_after_a_failure_nothing_new_starts_and_the_running_stage_finishes(prefect_server):
    log = Log(meet={"train_a", "train_b"})   # both start; train_a fails once train_b is under way
    with pytest.raises(RuntimeError, match="train_a failed"):
        _run(log, 2, fail="train_a")
    assert "export_a" not in log.started   # downstream of the failure: never started
    assert "train_b" in log.done           # running beside it: finished, its outputs recorded by DVC
    _respects_the_graph(log)


def test_a_run_of_some_families_logs_their_metrics_only(tmp_path):
    """Before: a ``--family recsys`` run logged and printed the vision metrics another run had left."""
    import json

    from flows.pipeline import collect_metrics

    for family, value in (("vision", 0.93), ("recsys", 0.71)):
        (tmp_path / "metrics" / family).mkdir(parents=True)
        (tmp_path / "metrics" / family / "evaluation.json").write_text(json.dumps({"accuracy": value, "ok": True}))
    assert collect_metrics(tmp_path, ["recsys"]) == {"recsys.evaluation.accuracy": 0.71}
    assert collect_metrics(tmp_path, ["vision", "recsys"]).keys() == {"vision.evaluation.accuracy",
                                                                      "recsys.evaluation.accuracy"}
