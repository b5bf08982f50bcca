"""The fault catalogue: every test marked ``@pytest.mark.fault(group, scenario, behaviour)``, as a table.

    python -m tests.fault_catalogue            # print the table and the number of scenarios
    python -m tests.fault_catalogue --write    # regenerate docs/faults.md from the markers
    python -m tests.fault_catalogue --check    # exit 1 when docs/faults.md is not what the markers say

The markers are the one source: a scenario is in the catalogue only when a test injects it, and the docs table is
checked against them by the test suite, so neither can drift from the other.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "faults.md"
GROUPS = ("data", "params", "runs", "promotion", "security", "load")
HEADER = """# Fault catalogue

Each row is a fault or a bad input that a test injects for real (a corrupted file, a killed process, a server
stopped, a concurrent run), with the behaviour the test checks. Generated from the tests' `fault` markers by
`python -m tests.fault_catalogue --write`; `make faults` prints it with its count, and the test suite fails when
this file and the markers disagree.

"""


class Scenario(NamedTuple):
    group: str
    scenario: str
    behaviour: str
    test: str


class _Collector:
    def __init__(self) -> None:
        self.found: list[Scenario] = []

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            for mark in item.iter_markers("fault"):
                group, scenario, behaviour = mark.args
                self.found.append(Scenario(group, scenario, behaviour, item.nodeid))


def catalogue() -> list[Scenario]:
    """Every marked scenario, by group then test order."""
    collector = _Collector()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")],
                           plugins=[collector])
    if code != 0:
        raise SystemExit(f"collecting the tests failed (pytest exit {code}):\n{out.getvalue()[-3000:]}")
    unknown = sorted({s.group for s in collector.found} - set(GROUPS))
    if unknown:
        raise SystemExit(f"fault markers with unknown groups {unknown}; use one of {list(GROUPS)}")
    merged: dict[tuple[str, str, str], list[str]] = {}
    for found in collector.found:  # a marker on a parametrized test: one scenario, run for every parameter
        merged.setdefault(found[:3], []).append(found.test)
    scenarios = [Scenario(*key, _common(tests)) for key, tests in merged.items()]
    return sorted(scenarios, key=lambda s: GROUPS.index(s.group))


def _common(tests: list[str]) -> str:
    functions = {test.split("[")[0] for test in tests}
    return tests[0] if len(tests) == 1 else " ".join(sorted(functions))


def table(scenarios: list[Scenario]) -> str:
    rows = ["| # | group | scenario | expected behaviour | test |", "|---:|---|---|---|---|"]
    rows += [f"| {i} | {s.group} | {s.scenario} | {s.behaviour} | `{s.test}` |" for i, s in enumerate(scenarios, 1)]
    return "\n".join(rows) + "\n"


def document(scenarios: list[Scenario]) -> str:
    return HEADER + table(scenarios) + f"\n{len(scenarios)} scenarios.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {DOC.relative_to(ROOT)}")
    mode.add_argument("--check", action="store_true", help=f"fail when {DOC.relative_to(ROOT)} is stale")
    args = parser.parse_args()
    scenarios = catalogue()
    text = document(scenarios)
    if args.write:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text)
    elif args.check and (not DOC.exists() or DOC.read_text() != text):
        sys.exit(f"{DOC.relative_to(ROOT)} does not match the tests' fault markers; "
                 "run `python -m tests.fault_catalogue --write`")
    print(table(scenarios))
    print(f"{len(scenarios)} scenarios in the fault catalogue")


if __name__ == "__main__":
    main()
