"""The gate's speed-up measurement (tasks/speedup.py) on a machine whose load changes while it measures."""
from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from tasks.gate import speedup
from tasks.speedup import paired_timing


def _machine(load: Callable[[int], float]):
    """Two models on one machine, 1 ms and 3 ms alone (a true speed-up of 3x); the n-th timing on it is slowed by the
    factor ``load(n)``."""
    calls = itertools.count()

    def model(ms: float):
        def timing() -> dict[str, float]:
            slow = load(next(calls))
            return {"latency_p50_ms": ms * slow, "latency_p95_ms": 1.5 * ms * slow}
        return timing

    return model(1.0), model(3.0)


def _before(candidate, teacher) -> float:
    """The gate's old measurement: one timing of the candidate, then one of the teacher."""
    alone = candidate()["latency_p50_ms"]
    return teacher()["latency_p50_ms"] / alone


def test_a_neighbour_starting_between_the_two_timings_does_not_decide_the_speedup():
    """Before: a neighbour that started between the two timings made a 3x student look 6x faster (or, the other way
    round, a passing one fail its floor)."""
    neighbour = lambda n: 2.0 if n >= 1 else 1.0   # from the second timing on, everything twice as slow
    assert _before(*_machine(neighbour)) == pytest.approx(6.0)
    mine, theirs, speed = paired_timing(*_machine(neighbour), pairs=3, key="latency_p50_ms")
    assert speed["speedup_vs_teacher"] == pytest.approx(3.0)   # the first pair's 4.24x is outvoted
    assert speed["speedup_pairs"] == 3 and speed["speedup_spread"] == pytest.approx(2 ** 0.5)
    assert mine == {"latency_p50_ms": 2.0, "latency_p95_ms": 3.0} and theirs["latency_p50_ms"] == 6.0


def test_a_load_that_rises_steadily_cancels_within_each_pair():
    rising = lambda n: 1.05 ** n   # 5 % slower with every timing
    assert _before(*_machine(rising)) == pytest.approx(3.15)
    _, _, speed = paired_timing(*_machine(rising), pairs=3, key="latency_p50_ms")
    assert speed["speedup_vs_teacher"] == pytest.approx(3.0, abs=0.005)
    _, _, one_way = paired_timing(*_machine(lambda n: 1.05 ** -n), pairs=2, key="latency_p50_ms")   # and falling
    assert one_way["speedup_vs_teacher"] == pytest.approx(3.0, abs=0.005)


def test_a_quiet_machine_gives_the_plain_ratio_and_the_gate_reads_the_paired_one():
    mine, theirs, speed = paired_timing(*_machine(lambda n: 1.0), pairs=1, key="latency_p50_ms")
    assert speed == {"speedup_vs_teacher": 3.0, "speedup_pairs": 1, "speedup_spread": 1.0}
    assert speedup({**mine, **speed, "latency_p50_ms": 0.1}, theirs, "latency") == 3.0   # paired, not 3 / 0.1
    assert speedup(mine, theirs, "latency") == 3.0   # an evaluation without a paired measurement: the ratio
