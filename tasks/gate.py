"""Promotion gate: absolute floors, goals relative to the teacher (Olive-style) and challenger vs champion.

Pure functions: ``gate_checks(evaluation, champion, cfg, spec) -> [Check]`` and the report renderers. The candidate
is the INT8 student of ``metrics/<family>/evaluation.json``; ``champion`` is the current champion scored on the
same test data in the same run (``None`` when the registry has no champion yet: the candidate is then compared
with the floors and the teacher only). ``spec`` names which latency a family is gated on. The gate reads the test
split's scores (``test_<metric>``): it reports and decides, it never chooses between recipes (sweeps choose on
``val_<metric>``). The promotion flow re-measures the candidate's and the teacher's latencies before the checks, in
pairs of alternating rounds (``tasks.speedup``): the speed-up divides numbers measured back to back.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tasks.family_config import Gate

WINDOWS = ("golden", "recent")   # evaluation windows of a test split a family may score (``<window>_<metric>``)


@dataclass(frozen=True)
class GateSpec:
    """Which latency a family is gated on: ``<latency>_p50_ms`` / ``<latency>_p95_ms`` in its evaluation. (Its
    quality metric is its gate config's ``metric``.)"""

    latency: str
    latency_what: str


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    op: str           # ">=" or "<="
    threshold: float
    passed: bool
    why: str
    compared: bool = True   # False: a placeholder that compared nothing (no champion, a window too small)

    def as_dict(self) -> dict:
        return asdict(self)


def meets(value: float, op: str, threshold: float) -> bool:
    """``value op threshold`` (``op``: ">=" or "<="), a value within floating-point error of its threshold meeting
    it: a drop is the difference of two rounded means (0.935 - 0.925 = 0.010000000000000009), and a limit says "at
    most". NaN meets nothing."""
    passed = value >= threshold if op == ">=" else value <= threshold
    return passed or math.isclose(value, threshold, rel_tol=1e-9, abs_tol=1e-12)


def _check(name: str, value: float, op: str, threshold: float, what: str) -> Check:
    passed = meets(value, op, threshold)
    verdict = "meets" if passed else "fails"
    return Check(name, value, op, threshold, passed, f"{what} {value:.4g} {verdict} {op} {threshold:.4g}")


def speedup(cand: dict, teacher: dict, lat: str) -> float:
    """The candidate's p50 speed-up over the teacher: the gate's paired measurement (``tasks.speedup``) when it made
    one, else the ratio of the two p50 latencies the evaluation recorded."""
    return cand.get("speedup_vs_teacher", teacher[f"{lat}_p50_ms"] / cand[f"{lat}_p50_ms"])


def gate_checks(evaluation: dict, champion: dict | None, cfg: Gate, spec: GateSpec,
                split: str = "test") -> list[Check]:
    """Every check of the gate, in report order, on the ``split`` scores: ``test`` for the gate itself, ``val``
    where a sweep asks which recipes may be chosen at all (a choice the test split must not make)."""
    cand, teacher = evaluation["models"]["student_int8"], evaluation["models"]["teacher_fp32"]
    floors, rel, metric, lat = cfg.floors, cfg.vs_teacher, cfg.metric, spec.latency
    score = f"{split}_{metric}"
    checks = [
        _check(metric, cand[score], ">=", getattr(floors, f"min_{metric}"), f"{split} {metric}"),
        _check("p95_latency_ms", cand[f"{lat}_p95_ms"], "<=", floors.max_p95_latency_ms,
               f"{spec.latency_what} p95 latency (ms)"),
        _check("size_kb", cand["bytes"] / 1024, "<=", floors.max_size_kb, "ONNX size (KB)"),
        _check(f"{metric}_drop_vs_teacher", teacher[score] - cand[score], "<=", getattr(rel, f"max_{metric}_drop"),
               f"{split} {metric} drop vs the teacher"),
        _check("speedup_vs_teacher", speedup(cand, teacher, lat), ">=", rel.min_speedup,
               f"{spec.latency_what} p50 speed-up vs the teacher"
               + (f" (median of {cand['speedup_pairs']} paired rounds)" if "speedup_pairs" in cand else "")),
        _check("size_ratio_vs_teacher", teacher["bytes"] / cand["bytes"], ">=", rel.min_size_ratio,
               "size ratio vs the teacher")]
    max_drop = getattr(cfg.vs_champion, f"max_{metric}_drop")
    if champion is None or "incomparable" in champion:
        checks.append(Check("vs_champion", 0.0, "<=", max_drop, True, (champion or {}).get(
            "incomparable", "no champion yet: nothing to be worse than"), compared=False))
    else:
        # a champion reading the data in its own encoding (an older vocabulary) is compared on the rows it can read
        mine = champion.get("candidate", cand)
        drop = champion[score] - mine[score]
        rows = "the test rows both can read" if "candidate" in champion else "same test data"
        checks.append(_check(f"{metric}_drop_vs_champion", drop, "<=", max_drop,
                             f"{metric} drop vs champion v{champion['version']} ({rows}, same run)"))
        windows = cfg.windows if split == "test" else None
        for window in WINDOWS if windows else ():   # not worse on either evaluation window
            key, name = f"{window}_{metric}", f"{metric}_drop_vs_champion_{window}"
            rows = int(min(mine.get(f"{window}_rows", 0), champion.get(f"{window}_rows", 0)))
            if key in champion and key in mine and rows >= windows.min_rows:
                checks.append(_check(name, champion[key] - mine[key], "<=", windows.max_drop,
                                     f"{window} window {metric} drop vs champion v{champion['version']} "
                                     f"({rows} test rows both read, same run)"))
            else:
                checks.append(Check(name, 0.0, "<=", windows.max_drop, True,
                                    f"{window} window not compared: {rows} test rows both read"
                                    + (f" (fewer than {windows.min_rows})" if rows < windows.min_rows else
                                       " of one class only"), compared=False))
    return checks


def champion_health(champion: dict | None, registered: dict[str, float], cfg: Gate) -> dict | None:
    """The champion's score on the recent window against the one it was registered with (``registered``: its
    ``recent`` score then, like with like, else its ``test`` score) — on the recent rows it reads as they are
    (``recent_known``) when some hold values it never saw, as the rows it was registered on did not. ``None`` when
    there is no champion, no recent window, no recorded score or no ``champion_health`` limit; not compared on fewer
    than ``windows.min_rows``."""
    window = "recent_known" if "recent_known_rows" in (champion or {}) else "recent"
    key = f"{window}_{cfg.metric}"
    baseline = "recent" if "recent" in registered else "test"
    if (champion is None or cfg.champion_health is None or baseline not in registered or key not in champion
            or not math.isfinite(registered[baseline])):   # a score recorded as NaN is no score to compare with
        return None
    rows, least = int(champion.get(f"{window}_rows", 0)), cfg.windows.min_rows if cfg.windows else 1
    drop = registered[baseline] - champion[key]
    compared = rows >= least and math.isfinite(drop)   # a window it cannot be scored on (NaN): not judged
    return {"version": champion["version"], "baseline": f"registered {baseline} {cfg.metric}",
            f"registered_{cfg.metric}": registered[baseline], f"recent_{cfg.metric}": champion[key], "window": window,
            "recent_rows": rows,
            "drop": drop, "max_drop": cfg.champion_health.max_drop, "compared": compared,
            "degraded": compared and not meets(drop, "<=", cfg.champion_health.max_drop)}


def health_markdown(health: dict | None, passed: bool) -> str:
    if health is None:
        return ""
    rows = "test rows" + (" whose users and items it knows" if health.get("window") == "recent_known" else "")
    if not health["compared"]:
        return f"\nChampion v{health['version']} on the recent window: not judged, {health['recent_rows']} {rows}.\n"
    verdict = "**DEGRADED**" if health["degraded"] else "healthy"
    alarm = " and no challenger passed the gate: the champion serves worse than it was registered to" \
        if health["degraded"] and not passed else ""
    return (f"\nChampion v{health['version']} on the recent window ({health['recent_rows']} {rows}): {verdict}, "
            f"drop {health['drop']:.4g} from its {health['baseline']} (limit {health['max_drop']:.4g}){alarm}.\n")


def gate_tags(checks: list[Check]) -> dict[str, str]:
    """The gate's verdict as registry/run tags: ``gate.<check>`` pass|fail and ``gate.passed``."""
    return {**{f"gate.{c.name}": "pass" if c.passed else "fail" for c in checks},
            "gate.passed": str(all(c.passed for c in checks)).lower()}


def gate_markdown(checks: list[Check], passed: bool) -> str:
    lines = [f"Gate: **{'PASS' if passed else 'FAIL'}**", "", "| check | value | threshold | result | why |",
             "|---|---:|---:|---|---|"]
    lines += [f"| {c.name} | {c.value:.4g} | {c.op} {c.threshold:.4g} | {'pass' if c.passed else 'FAIL'} | {c.why} |"
              for c in checks]
    return "\n".join(lines) + "\n"
