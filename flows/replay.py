"""Replay a family's published data as the batches it arrived in: ``python -m flows.replay --family recsys DIR``.

Writes ``DIR/0000-initial`` and then one folder per period (``ingest.<family>.replay``), each a batch that
``python -m flows.ingest --family <family> --landing DIR`` takes; with ``ingest.<family>.bootstrap: empty`` the
snapshot starts from the initial window, and each later batch is checked against what came before it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tasks.config import load_config
from tasks.errors import PipelineError, run_cli
from tasks.intake import load_intake


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("landing", type=Path, help="the folder to write the batches into (must not hold any)")
    parser.add_argument("--family", required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    cfg = load_config(args.params)
    if args.family not in cfg.families:
        raise PipelineError(f"--family: {args.family!r} is not one of families {cfg.families}")
    if args.landing.exists() and (not args.landing.is_dir() or any(args.landing.iterdir())):
        what = "not empty" if args.landing.is_dir() else "not a folder"
        raise PipelineError(f"{args.landing}: {what}; replay writes into an empty or new folder")
    written = load_intake(args.family).replay(cfg, args.landing)
    print(f"{len(written)} batches in {args.landing}: {', '.join(p.name for p in written)}")


if __name__ == "__main__":
    run_cli(main)
