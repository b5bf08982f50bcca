"""Training checkpoints: written atomically with a SHA-256 sidecar, loaded with ``weights_only=True``.

A checkpoint is reused only when its fingerprint (hash of the params, data and code it was trained with) matches
and its content matches the recorded hash; otherwise training starts fresh and says why.
"""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from tasks.errors import CheckpointError
from tasks.io import file_digest


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(path: Path, state: dict[str, Any], fingerprint: str) -> None:
    """Write ``state`` to ``path`` so that a kill at any moment leaves either the old or the new checkpoint (a kill
    between the two renames leaves the new one's sidecar beside it, which ``load_checkpoint`` completes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**state, "fingerprint": fingerprint}, tmp)
    digest = file_digest(tmp)
    side_tmp = _sidecar(tmp)
    side_tmp.write_text(digest + "\n")
    os.replace(tmp, path)
    os.replace(side_tmp, _sidecar(path))


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """Return the checkpoint's state, or None (with the reason on stderr) when it must not be resumed."""
    if not path.exists():
        return None
    side, left = _sidecar(path), _sidecar(path.with_name(path.name + ".tmp"))
    recorded = side.read_text().strip() if side.exists() else None
    actual = file_digest(path)
    if recorded != actual and left.exists() and left.read_text().strip() == actual:
        # killed between the checkpoint's rename and its sidecar's: the new one is whole, its sidecar waits beside
        os.replace(left, side)
        recorded = actual
    if recorded != actual:
        print(f"warning: checkpoint {path} does not match its recorded SHA-256 "
              f"({recorded or 'no sidecar'} != {actual}); not loading it, training from scratch", file=sys.stderr)
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # code or objects weights_only refuses to load
        raise CheckpointError(f"checkpoint {path} matches its SHA-256 but holds more than tensors and plain values "
                              f"({type(err).__name__}); refused, nothing of it was run. Delete it to train from "
                              "scratch") from None
    if state.get("fingerprint") != fingerprint:
        print(f"note: checkpoint {path} was made with other params, data or code; training from scratch",
              file=sys.stderr)
        return None
    print(f"resuming from {path} after epoch {len(state['history'])}", file=sys.stderr)
    return state
