"""Stage ``snapshot_recsys``: the recommender's raw data as a versioned snapshot (``tasks.snapshot``): MovieLens-100K
from its pinned sources as the bootstrap, then every batch ``flows.ingest`` accepted."""
from __future__ import annotations

from tasks.errors import run_cli
from tasks.recsys.intake import INTAKE
from tasks.snapshot import stage_main

if __name__ == "__main__":
    run_cli(lambda: stage_main("recsys", INTAKE))
