"""The params sections of a click-through family read from a user's own table (CSV or Parquet) through a declared
field schema: where the table is, which column is the label, which columns are categorical fields and which hold
multi-hot tags, how rows are split; what its data contract checks; how its models are timed. ``SECTIONS`` adds them
to the kit's (``tasks.ctr.config``) for a family built on ``tasks.ctr.table``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from tasks.config_types import Fraction, Positive, ProjectPath, Strict, distinct
from tasks.ctr.config import SECTIONS as CTR_SECTIONS
from tasks.ctr.config import check as check_ctr

if TYPE_CHECKING:
    from tasks.config import Config

SPLITS = ("train", "val", "test")


class TableFile(Strict):
    path: ProjectPath                  # relative to the project (a stage output, or a file the user tracks)
    format: Literal["csv", "parquet"] | None = None   # None: from the suffix (.csv, .csv.gz, .parquet, .pq)


class MultiHot(Strict):
    """A column of tags (``Action|Comedy``): one multi-hot group, embedded as the mean of its tags' rows."""

    column: str = Field(min_length=1)
    separator: str = Field(default="|", min_length=1)


class TableSplit(Strict):
    # hash: a seeded hash of the ``key`` columns' values puts each row in train, val or test (a row keeps its split
    # when the table grows); column: the table's own ``column`` says train, val or test
    method: Literal["hash", "column"]
    val: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.1
    test: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.1
    # hash: the columns that identify a row (default: the categorical and multi-hot columns; never the label, so a
    # corrected label leaves its row where it was)
    key: Annotated[list[str], distinct("key column")] = []
    column: str | None = None

    @model_validator(mode="after")
    def _method_needs(self) -> TableSplit:
        if self.method == "column":
            if not self.column:
                raise ValueError("method column needs `column`, the column that says train, val or test")
            if ignored := sorted({"val", "test", "key"} & self.model_fields_set):
                raise ValueError(f"method column takes the split from the table: {ignored} would be ignored")
        elif self.column is not None:
            raise ValueError("method hash hashes `key`: `column` would be ignored (method column reads it)")
        return self


class TableData(Strict):
    """A click-through table and its declared schema. Every categorical field gets one embedding row per value
    seen at least ``min_count`` times in the training rows, plus one row for any other value (unseen, rare or
    missing); every multi-hot column one group of tag rows. Without a multi-hot column the model's ``genres`` input
    is one all-zero column (its ONNX file still takes it)."""

    # where the file is found: no row depends on it (tasks.lineage.data_params)
    LOCATION: ClassVar[frozenset[str]] = frozenset({"table"})
    table: TableFile
    label: str = Field(min_length=1)   # 0/1, or true/false
    categorical: Annotated[list[str], Field(min_length=1), distinct("categorical column")]
    multi_hot: list[MultiHot] = []
    split: TableSplit
    seed: int
    min_count: Positive = 1
    subset: Positive | None = None     # a seeded sample of this many rows (the smoke profile)

    @model_validator(mode="after")
    def _columns_once(self) -> TableData:
        named = [self.label, *self.categorical, *(m.column for m in self.multi_hot),
                 *([self.split.column] if self.split.method == "column" else [])]
        twice = sorted({c for c in named if named.count(c) > 1})
        if twice:
            raise ValueError(f"columns {twice} are declared in more than one role (label, categorical, multi_hot, "
                             "split column)")
        return self

    def columns(self) -> list[str]:
        """Every column the schema reads (the split key's aside)."""
        return [self.label, *self.categorical, *(m.column for m in self.multi_hot),
                *([self.split.column] if self.split.method == "column" and self.split.column else [])]

    def split_key(self) -> list[str]:
        """The columns a hashed split hashes."""
        return self.split.key or [*self.categorical, *(m.column for m in self.multi_hot)]


class TableValidation(Strict):
    positive_fraction: Fraction        # expected share of label 1 per split ...
    positive_tolerance: Fraction       # ... within this absolute tolerance
    split_tolerance: Fraction          # a hashed split's share of the rows may differ from its configured share by this
    max_missing: dict[str, Fraction] = {}   # a categorical column's share of missing values (default 0)
    min_rows: dict[Literal["train", "val", "test"], Positive]   # a floor per split


class EvaluateTable(Strict):
    threads: Positive
    warmup: Annotated[int, Field(ge=0)]
    repeats: Annotated[int, Field(ge=10)]
    request_rows: Positive             # rows scored per request: latency is one request of this many test rows


# no warm start: a table family trains from scratch on each version of its table
SECTIONS: dict[str, Any] = {**{k: v for k, v in CTR_SECTIONS.items() if k != "warm_start"}, "data": TableData,
                            "validate": TableValidation, "evaluate": EvaluateTable}


def check(cfg: Config, family: str) -> None:
    """The kit's checks, and that the contract's per-column allowances name declared categorical columns."""
    check_ctr(cfg, family)
    data, rules = cfg.block("data", family), cfg.block("validate", family)
    unknown = sorted(set(rules.max_missing) - set(data.categorical))
    if unknown:
        raise ValueError(f"validate.{family}.max_missing: {unknown} are not categorical columns of data.{family} "
                         f"({data.categorical})")
