"""A sweep's recipes: the combinations of ``sweep.space.<family>``, each reduced to the knobs the stages of its
recipe read, so that no recipe runs twice (``flows.sweep`` runs them)."""
from __future__ import annotations

import functools
import itertools
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.stage_graph import stage_params
from tasks.config import Config

#: Stages a recipe may leave out: ``<stage>_<family>`` then passes the student through (tasks/ctr/stage.py,
#: tasks/images/prune.py, ...). Distillation always runs: without ``distill`` the student learns from the labels.
PASSED_THROUGH = ("prune", "qat", "share")


def draw_recipes(space: dict[str, list[Any]], method: str, count: int, seed: int,
                 in_effect: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The recipes of a sweep: every combination of ``space`` (grid) or the first ``count`` of them in an order
    shuffled with ``seed``. Each combination is reduced to what it changes (``in_effect``), and one that does what an
    earlier one does is dropped: no recipe runs twice. Drawn from the whole product, a recipe list keeps its share of
    the draws (a short recipe, with fewer knobs to tell its combinations apart, is not crowded out by long ones)."""
    keys = sorted(space)
    grid = [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]
    if method != "grid":
        grid = random.Random(seed).sample(grid, len(grid))
    distinct = {json.dumps(r, sort_keys=True): r for r in map(in_effect or dict, grid)}   # first seen, in order
    recipes = list(distinct.values())
    return recipes if method == "grid" else recipes[:count]


def in_effect(combo: dict[str, Any], family: str, recipe: list[str], reads: dict[str, list[str]]) -> dict[str, Any]:
    """``combo`` without the keys only stages its recipe (its ``recipe.<family>``, else ``recipe``) passes through
    read: ``prune.<family>.*`` does nothing in a ``[distill, qat]`` recipe. A key a stage that runs reads too stays
    (export reads ``qat.<family>``'s weight bits for its PTQ baseline), and so does one no stage lists."""
    stages = combo.get(f"recipe.{family}", recipe)
    idle = {name for name in reads if (step := name.rsplit("_", 1)[0]) in PASSED_THROUGH and step not in stages}

    def read_by(key: str, name: str) -> bool:
        return any(key == p or key.startswith(f"{p}.") or p.startswith(f"{key}.") for p in reads[name])

    def runs(key: str) -> bool:
        readers = [name for name in reads if read_by(key, name)]
        return not readers or any(name not in idle for name in readers)

    return {key: value for key, value in combo.items() if runs(key)}


def sweep_recipes(root: Path, cfg: Config, family: str, stages: list[str], count: int) -> list[dict[str, Any]]:
    """``draw_recipes`` of ``sweep.space.<family>``, each recipe reduced to the knobs its ``stages`` read."""
    effect = functools.partial(in_effect, family=family, recipe=list(cfg.block("recipe", family)),
                               reads=stage_params(root, stages))
    return draw_recipes(cfg.sweep.space[family], cfg.sweep.method, count, cfg.sweep.seed, effect)
