"""The gate's speed-up of a candidate over its teacher, measured so that a change of load on a shared machine weighs
on both models alike.

Timed once each, one after the other, a neighbour that starts, stops or ramps up between the two timings scales one
latency and not the other: in the recommender's replay on 2 cores (docs/continuous.md) the same two architectures
measured 2.96× to 3.47× against a 3.0× floor, and challengers that passed every other check were kept four times on
that alone. Here the two are timed in ``pairs`` pairs of rounds — candidate, teacher, then teacher, candidate — each
round one full timing of the family (``Family.timing``: its own session, warm-up and repeats, seconds long). A pair's speed-up is the
geometric mean of its two rounds' ratios, which cancels a load that rises or falls steadily through the pair (to
first order); the speed-up is the median over the pairs, which drops a pair a burst of load fell on. The latencies
reported are each model's median over its rounds.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

Timing = Callable[[], dict[str, float]]   # one latency measurement of one model: {"<latency>_p50_ms": ..., ...}


def paired_timing(candidate: Timing, teacher: Timing, pairs: int, key: str
                  ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(candidate's latencies, teacher's latencies, speed-up) over ``pairs`` pairs of alternating rounds; ``key`` is
    the latency the speed-up divides (a p50). The speed-up dict holds ``speedup_vs_teacher`` (the median of the
    pairs' speed-ups), ``speedup_pairs`` and ``speedup_spread`` (the pairs' largest speed-up over their smallest)."""
    runs: dict[str, list[dict[str, float]]] = {"candidate": [], "teacher": []}
    timings = {"candidate": candidate, "teacher": teacher}
    for _ in range(pairs):
        for name in ("candidate", "teacher", "teacher", "candidate"):
            runs[name].append(timings[name]())
    ratios = np.array([t[key] / c[key] for c, t in zip(runs["candidate"], runs["teacher"], strict=True)])
    per_pair = np.sqrt(ratios[0::2] * ratios[1::2])
    medians = {name: {k: float(np.median([m[k] for m in found])) for k in found[0]} for name, found in runs.items()}
    return medians["candidate"], medians["teacher"], {"speedup_vs_teacher": float(np.median(per_pair)),
                                                      "speedup_pairs": pairs,
                                                      "speedup_spread": float(per_pair.max() / per_pair.min())}
