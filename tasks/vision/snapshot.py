"""Stage ``snapshot_vision``: the vision family's raw images as a versioned snapshot (``tasks.snapshot``): Fashion-MNIST
from its pinned sources (or the user's image folder) as the bootstrap, then every batch ``flows.ingest`` accepted."""
from __future__ import annotations

from tasks.errors import run_cli
from tasks.snapshot import stage_main
from tasks.vision.intake import INTAKE

if __name__ == "__main__":
    run_cli(lambda: stage_main("vision", INTAKE))
