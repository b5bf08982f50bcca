"""The fault catalogue command: docs/faults.md is exactly what the tests' markers say, and it has 20+ scenarios."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_the_fault_catalogue_is_documented_and_complete():
    proc = subprocess.run([sys.executable, "-m", "tests.fault_catalogue", "--check"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    count = int(re.search(r"^(\d+) scenarios in the fault catalogue$", proc.stdout, re.MULTILINE).group(1))
    assert count >= 20
    groups = set(re.findall(r"^\| \d+ \| (\w+) \|", proc.stdout, re.MULTILINE))
    assert groups == {"data", "params", "runs", "promotion", "security", "load"}
