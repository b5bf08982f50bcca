"""Stage ``warm_start_recsys`` (``tasks.warm_start``): the champion's DeepFM teacher and FP32 student fitted to this
snapshot's vocabulary. Each field's embedding and first-order rows are carried over by value (a new snapshot adds
users and items, which shifts every row index); a value the champion never saw starts at its field's mean row, what
the champion knows of "some user" or "some item". The genre tables and the MLP are kept as they are."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.errors import run_cli
from tasks.recsys.prepare import ENCODING, FIELDS, VOCABULARY
from tasks.warm_start import stage_main

if TYPE_CHECKING:
    import torch

ROW_TABLES = ("embedding.weight", "linear.weight")   # one row per vocabulary entry, fields in FIELDS order


def carried_rows(table: torch.Tensor, theirs: dict[str, list], ours: dict[str, list]) -> torch.Tensor:
    """``table``'s rows (the champion's vocabulary ``theirs``) in the order of vocabulary ``ours``."""
    import torch  # here: the stage imports this module, and starts from scratch (the default) without PyTorch

    parts, offset = [], 0
    for name in FIELDS:
        old = table[offset: offset + len(theirs[name])]
        offset += len(theirs[name])
        index = {str(v): i for i, v in enumerate(theirs[name])}
        source = torch.tensor([index.get(str(v), -1) for v in ours[name]], dtype=torch.long)
        rows = (old.mean(0, keepdim=True) if len(old) else torch.zeros(1, table.shape[1])).repeat(len(source), 1)
        known = source >= 0
        rows[known] = old[source[known]]
        parts.append(rows)
    return torch.cat(parts)


def adapt(blob: dict[str, Any], champion: Path, data: Path) -> dict[str, Any] | None:
    """``blob`` (a ``ctr`` model file's content) in ``data``'s vocabulary; None when the champion's vocabulary is
    not there, was made with another encoding, or the model shares rows (weight sharing maps ids otherwise)."""
    if blob.get("kind") != "ctr" or blob["arch"].get("shared_rows") or not (champion / VOCABULARY).is_file():
        return None
    theirs = json.loads((champion / VOCABULARY).read_text())
    ours = json.loads((data / VOCABULARY).read_text())
    state = dict(blob["state_dict"])
    if theirs.get(ENCODING) != ours.get(ENCODING) or state["linear.weight"].shape[0] != sum(
            len(theirs[name]) for name in FIELDS):
        return None
    for key in ROW_TABLES:
        state[key] = carried_rows(state[key], theirs, ours)
    return {**blob, "state_dict": state, "shape": {**blob["shape"], "vocabulary": int(state["linear.weight"].shape[0])}}


if __name__ == "__main__":
    run_cli(lambda: stage_main("recsys", adapt))
