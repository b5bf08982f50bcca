"""The suite collects however its files are named on the command line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_tests_named_through_a_symlink_to_the_checkout_are_collected(tmp_path):
    """Before: the ordering of the collected tests took their paths relative to the resolved checkout, and a path
    through a symlink (a CI job's /check/work/main) stopped the collection with a ValueError."""
    link = tmp_path / "checkout"
    link.symlink_to(ROOT, target_is_directory=True)
    def collected(checkout):
        return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               str(checkout / "tests" / "test_makefile.py")], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, check=False)

    done, direct = collected(link), collected(ROOT)
    count = direct.stdout.strip().splitlines()[-1]   # "<n> tests collected in <s>s"
    assert direct.returncode == 0 and count.split()[1:3] == ["tests", "collected"], direct.stdout + direct.stderr
    assert done.returncode == 0 and f"{count.split()[0]} tests collected" in done.stdout, done.stdout + done.stderr
