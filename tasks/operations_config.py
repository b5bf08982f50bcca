"""Typed params of running the pipeline at scale: the recipe sweep (``sweep`` in params.yaml)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from tasks.config_types import Positive, ProjectPath, Seed, Strict

SWEEPABLE = ("distill", "prune", "qat", "share", "recipe")   # sections a recipe may change: never data or teacher


class SweepConfig(Strict):
    """A sweep of compression recipes for one family: ``space`` maps dotted params keys to the values to try."""

    family: str = Field(min_length=1)          # one of params.yaml's families (checked with them)
    method: Literal["grid", "random"]          # grid: every combination; random: `recipes` of them, drawn with `seed`
    recipes: Positive
    seed: Seed
    workers: Positive                          # a Dask LocalCluster of this many single-process workers ...
    threads_per_worker: Positive               # ... each recipe's stages limited to this many torch threads
    address: str | None = None                 # ... unless an existing scheduler is named (tcp://host:8786)
    work_dir: ProjectPath                      # scratch copies of the project, one per recipe
    recipe_retries: Annotated[int, Field(ge=0, le=5)]   # retries of a recipe that failed for a transient reason
    space: dict[str, dict[str, Annotated[list[Any], Field(min_length=1)]]]

    @model_validator(mode="after")
    def _keys_are_compression_knobs(self) -> SweepConfig:
        for family, space in self.space.items():
            for key in space:
                section, _, rest = key.partition(".")
                owner = rest.split(".", 1)[0]
                if section not in SWEEPABLE or owner != family:
                    raise ValueError(f"space.{family}: {key!r} is not a {family} compression knob; a key starts "
                                     f"with one of {', '.join(f'{s}.{family}' for s in SWEEPABLE)}")
        if self.family not in self.space:
            raise ValueError(f"family {self.family!r} has no entry in space")
        return self
