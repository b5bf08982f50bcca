"""The params sections of a click-through family read from a user's own table (CSV or Parquet) through a declared
field schema: where the table is, which column is the label, which columns are categorical fields and which hold
multi-hot tags, how rows are split; what its data contract checks; how its models are timed. ``SECTIONS`` adds them
to the kit's (``tasks.ctr.config``) for a family built on ``tasks.ctr.table``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from tasks.config_types import Fraction, Positive, ProjectPath, Seed, Strict, distinct
from tasks.ctr.config import SECTIONS as CTR_SECTIONS
from tasks.ctr.config import check as check_ctr

if TYPE_CHECKING:
    from tasks.config import Config

SPLITS = ("train", "val", "test")


class TableFile(Strict):
    # a file the stages read (no split param: where it is, tasks.lineage.data_params): a copy of the project (make
    # smoke, a sweep's recipe) links it when no stage of the copy makes it
    INPUTS: ClassVar[frozenset[str]] = frozenset({"path"})
    path: ProjectPath                  # relative to the project (a stage output, or a file the user tracks)
    format: Literal["csv", "parquet"] | None = None   # None: from the suffix (.csv, .csv.gz, .parquet, .pq)


class MultiHot(Strict):
    """A column of tags (``Action|Comedy``): one multi-hot group, embedded as the mean of its tags' rows."""

    column: str = Field(min_length=1)
    separator: str = Field(default="|", min_length=1)


class Numeric(Strict):
    """A numeric column (a price, an age, a count): its training values cut at ``buckets`` quantiles into bins, one
    embedding row each (bins of equal edges merge), after row 0, which a missing value takes."""

    # how its values encode, not which split a row is in (tasks.lineage.data_params)
    ENCODING: ClassVar[frozenset[str]] = frozenset({"buckets"})
    column: str = Field(min_length=1)
    buckets: Annotated[int, Field(ge=2, le=1000)] = 10


class TableSplit(Strict):
    # hash: a seeded hash of the ``key`` columns' values puts each row in train, val or test (a row keeps its split
    # when the table grows); column: the table's own ``column`` says train, val or test; time: the newest ``test``
    # share of the rows by the time ``column`` (numbers, or dates and times) is test, the ``val`` share before it
    # val, the older rows train (rows of one time stay together)
    method: Literal["hash", "column", "time"]
    val: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.1
    test: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.1
    # hash: the columns that identify a row (default: the categorical, numeric and multi-hot columns; never the
    # label, so a corrected label leaves its row where it was)
    key: Annotated[list[str], distinct("key column")] = []
    column: str | None = None

    @model_validator(mode="after")
    def _method_needs(self) -> TableSplit:
        if self.method == "column":
            if not self.column:
                raise ValueError("method column needs `column`, the column that says train, val or test")
            if ignored := sorted({"val", "test", "key"} & self.model_fields_set):
                raise ValueError(f"method column takes the split from the table: {ignored} would be ignored")
        elif self.method == "time":
            if not self.column:
                raise ValueError("method time needs `column`, the column that says when a row happened")
            if self.key:
                raise ValueError("method time splits by `column`: `key` would be ignored (method hash hashes it)")
        elif self.column is not None:
            raise ValueError("method hash hashes `key`: `column` would be ignored (methods column and time read it)")
        return self


# tasks.ctr.table_validate's own columns beside the fields in each split's frame: the label, and whether every tag
# column holds only 0 and 1
LABEL_COLUMN, TAGS_COLUMN = "label", "genres_binary"
VALIDATION_COLUMNS = (LABEL_COLUMN, TAGS_COLUMN)


class TableData(Strict):
    """A click-through table and its declared schema. Every categorical field gets one embedding row per value
    seen at least ``min_count`` times in the training rows, plus one row for any other value (unseen, rare or
    missing); every numeric column one row per bin of its training values' quantiles, plus one for a missing value;
    every multi-hot column one group of tag rows. Fields come in that order: categorical, then numeric. Without a
    multi-hot column the model's ``genres`` input is one all-zero column (its ONNX file still takes it)."""

    # where the file is found: no row depends on it (tasks.lineage.data_params)
    LOCATION: ClassVar[frozenset[str]] = frozenset({"table"})
    # how values encode, not which split a row is in: the gate scores a champion of other ones in its own vocabulary
    ENCODING: ClassVar[frozenset[str]] = frozenset({"min_count"})
    # added after table families had registered models, with the value that reads a table as before them: the data
    # params digest leaves them out while they hold it (tasks.lineage.data_params)
    ADDED: ClassVar[dict[str, Any]] = {"numeric": [], "na_values": []}
    table: TableFile
    label: str = Field(min_length=1)   # 0/1, or true/false
    categorical: Annotated[list[str], distinct("categorical column")] = []
    numeric: list[Numeric] = []
    multi_hot: list[MultiHot] = []
    # text that means "missing" in a categorical, numeric or multi-hot column (a whole cell), besides an empty cell
    # and a null, e.g. ["unknown", "-1"] (quoted in YAML); in a numeric column also the same number (-1 is -1.0). A
    # list holds for every feature column; a mapping only for the columns it names ({age: ["0"], zip: ["?"]}). The
    # label, the split column and key columns that are no feature are read as they are
    na_values: Annotated[Annotated[list[str], distinct("na value"), Tag("list")]
                         | Annotated[dict[str, Annotated[list[str], distinct("na value")]], Tag("mapping")],
                         Discriminator(lambda v: "mapping" if isinstance(v, dict) else "list")] = []
    split: TableSplit
    seed: Seed
    min_count: Positive = 1
    subset: Positive | None = None     # a seeded sample of this many rows (the smoke profile)

    @field_validator("na_values", mode="before")
    @classmethod
    def _no_mapping_is_no_list(cls, value: Any) -> Any:
        """A mapping without its empty lists ({age: []} marks nothing), and [] for none left: it reads as [] does, so
        it must hash as [] does (the data params digest a champion records)."""
        if isinstance(value, dict):
            value = {column: listed for column, listed in value.items() if listed != []}
        return [] if value is None or value == {} else value   # (False, 0 or "" are no list: refused)

    @model_validator(mode="after")
    def _columns_once(self) -> TableData:
        if not self.categorical and not self.numeric:
            raise ValueError("no field: declare at least one categorical or numeric column")
        named = self.columns()
        twice = sorted({c for c in named if named.count(c) > 1})
        if twice:
            raise ValueError(f"columns {twice} are declared more than once (label, categorical, numeric, multi_hot, "
                             "split column)")
        features = self.feature_columns()
        if self.label in self.split.key:
            raise ValueError(f"split.key holds the label {self.label!r}: a corrected label would move its row to "
                             "another split (a key identifies the row: its feature columns)")
        if taken := sorted({*self.categorical, *self.numeric_columns()} & set(VALIDATION_COLUMNS)):
            raise ValueError(f"categorical or numeric columns may not be named {taken}: rename the column in the "
                             f"table (the validation's own columns beside the fields: {list(VALIDATION_COLUMNS)})")
        if isinstance(self.na_values, dict) and (unknown := sorted(set(self.na_values) - set(features))):
            raise ValueError(f"na_values names {unknown}, which are no categorical, numeric or multi_hot column "
                             f"({features})")
        return self

    def feature_columns(self) -> list[str]:
        return [*self.categorical, *self.numeric_columns(), *(m.column for m in self.multi_hot)]

    def numeric_columns(self) -> list[str]:
        return [n.column for n in self.numeric]

    def columns(self) -> list[str]:
        """Every column the schema reads (the split key's aside)."""
        return [self.label, *self.categorical, *self.numeric_columns(), *(m.column for m in self.multi_hot),
                *([self.split.column] if self.split.column else [])]

    def split_key(self) -> list[str]:
        """The columns a hashed split hashes."""
        return self.split.key or self.feature_columns()


class TableValidation(Strict):
    positive_fraction: Fraction        # expected share of label 1 per split ...
    positive_tolerance: Fraction       # ... within this absolute tolerance
    split_tolerance: Fraction          # a split's share of the rows (hashed or by time) may differ from it by this
    max_missing: dict[str, Fraction] = {}   # a categorical or numeric column's share of missing values (default 0)
    min_rows: dict[Literal["train", "val", "test"], Positive]   # a floor per split
    # a numeric column's values within [low, high] (missing ones aside)
    ranges: dict[str, Annotated[list[float], Field(min_length=2, max_length=2)]] = {}

    @model_validator(mode="after")
    def _ranges_ordered(self) -> TableValidation:
        if odd := sorted(c for c, pair in self.ranges.items() if not all(math.isfinite(v) for v in pair)):
            raise ValueError(f"ranges of {odd}: low and high must be finite numbers")
        if reversed_ := sorted(c for c, (low, high) in self.ranges.items() if low > high):
            raise ValueError(f"ranges of {reversed_}: low is above high")
        return self


class EvaluateTable(Strict):
    threads: Positive
    warmup: Annotated[int, Field(ge=0)]
    repeats: Annotated[int, Field(ge=10)]
    request_rows: Positive             # rows scored per request: latency is one request of this many test rows


# no warm start: a table family trains from scratch on each version of its table
SECTIONS: dict[str, Any] = {**{k: v for k, v in CTR_SECTIONS.items() if k != "warm_start"}, "data": TableData,
                            "validate": TableValidation, "evaluate": EvaluateTable}


def check(cfg: Config, family: str) -> None:
    """The kit's checks, and that the contract's per-column rules name declared columns of their kind."""
    check_ctr(cfg, family)
    data, rules = cfg.block("data", family), cfg.block("validate", family)
    fields = [*data.categorical, *data.numeric_columns()]
    for key, names, kind in (("max_missing", fields, "categorical or numeric"),
                             ("ranges", data.numeric_columns(), "numeric")):
        if unknown := sorted(set(getattr(rules, key)) - set(names)):
            raise ValueError(f"validate.{family}.{key}: {unknown} are not {kind} columns of data.{family} ({names})")
