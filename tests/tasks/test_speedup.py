"""The gate's speed-up measurement (tasks/speedup.py) against a machine whose load changes while it measures."""
from __future__ import annotations

import itertools

import pytest

from tasks.gate import speedup
from tasks.speedup import paired_timing


def _machine(load_from: int):
    """Two models on one machine, 1 ms and 3 ms alone (a true speed-up of 3x); from the ``load_from``-th measurement
    on, a neighbour doubles every latency."""
    calls = itertools.count()

    def model(ms: float):
        def timing() -> dict[str, float]:
            slow = 2.0 if next(calls) >= load_from else 1.0
            return {"latency_p50_ms": ms * slow, "latency_p95_ms": 1.5 * ms * slow}
        return timing

    return model(1.0), model(3.0)


def test_a_neighbour_starting_between_the_two_timings_does_not_decide_the_speedup():
    """Before: the gate timed the candidate once, then the teacher once, and divided: a neighbour that started in
    between made a 3x student look 6x faster (or, the other way round, a passing one fail its floor)."""
    candidate, teacher = _machine(load_from=1)
    alone = candidate()["latency_p50_ms"]   # the old measurement, on the same machine: candidate, then teacher
    assert teacher()["latency_p50_ms"] / alone == pytest.approx(6.0)

    candidate, teacher = _machine(load_from=1)
    mine, theirs, speed = paired_timing(candidate, teacher, rounds=5, key="latency_p50_ms")
    assert speed["speedup_vs_teacher"] == pytest.approx(3.0)
    assert speed["speedup_rounds"] == 5 and speed["speedup_spread"] == pytest.approx(2.0)   # round 0 says 6x
    assert mine == {"latency_p50_ms": 2.0, "latency_p95_ms": 3.0} and theirs["latency_p50_ms"] == 6.0


def test_a_quiet_machine_gives_the_plain_ratio_and_the_gate_reads_the_paired_one():
    candidate, teacher = _machine(load_from=10**9)
    mine, theirs, speed = paired_timing(candidate, teacher, rounds=3, key="latency_p50_ms")
    assert speed == {"speedup_vs_teacher": 3.0, "speedup_rounds": 3, "speedup_spread": 1.0}
    assert speedup({**mine, **speed, "latency_p50_ms": 0.1}, theirs, "latency") == 3.0   # paired, not 6 / 0.1
    assert speedup(mine, theirs, "latency") == 3.0   # an evaluation without a paired measurement: the ratio
