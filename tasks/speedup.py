"""The gate's speed-up of a candidate over its teacher, measured so that a change of load on a shared machine does not
decide it.

Timed one after the other (the candidate's ~200 runs, then the teacher's), a neighbour that starts or stops
between the two blocks scales one latency and not the other: in the recommender's replay on 2 cores
(docs/continuous.md) the same two architectures measured 2.87× to 3.85× against a 3.0× floor, and two weeks'
challengers were kept on that alone. Here the
two are timed in ``rounds`` short alternating rounds, in ABBA order (candidate first in even rounds, teacher first in
odd ones), and each round gives one ratio of two latencies measured back to back; the speed-up is the median of
those ratios, the latencies reported are each model's median over the rounds.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

Timing = Callable[[], dict[str, float]]   # one latency measurement of one model: {"<latency>_p50_ms": ..., ...}


def paired_timing(candidate: Timing, teacher: Timing, rounds: int, key: str
                  ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(candidate's latencies, teacher's latencies, speed-up) over ``rounds`` alternating rounds; ``key`` is the
    latency the speed-up divides (a p50). The speed-up dict holds ``speedup_vs_teacher`` (median of the rounds'
    teacher/candidate ratios), ``speedup_rounds`` and ``speedup_spread`` (the ratios' max/min)."""
    measured: dict[str, list[dict[str, float]]] = {"candidate": [], "teacher": []}
    for r in range(rounds):
        order = ("candidate", "teacher") if r % 2 == 0 else ("teacher", "candidate")
        for name in order:
            measured[name].append((candidate if name == "candidate" else teacher)())
    ratios = np.array([t[key] / c[key] for c, t in zip(measured["candidate"], measured["teacher"], strict=True)])
    medians = {name: {k: float(np.median([m[k] for m in runs])) for k in runs[0]} for name, runs in measured.items()}
    return medians["candidate"], medians["teacher"], {"speedup_vs_teacher": float(np.median(ratios)),
                                                      "speedup_rounds": rounds,
                                                      "speedup_spread": float(ratios.max() / ratios.min())}
