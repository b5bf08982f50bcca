"""Stage ``snapshot_digits``: the digits family's raw images as a versioned snapshot (``tasks.snapshot``): the image
folder fetch_digits wrote as the bootstrap, then every batch ``flows.ingest`` accepted."""
from __future__ import annotations

from tasks.digits.intake import INTAKE
from tasks.errors import run_cli
from tasks.snapshot import stage_main

if __name__ == "__main__":
    run_cli(lambda: stage_main("digits", INTAKE))
