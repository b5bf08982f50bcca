"""The recommender family's params sections: the click-through kit's (``tasks.ctr.config``: DeepFM teacher and
student, compression, export, gate) and its own — MovieLens-100K as click-through data, its validation, drift,
replay and ranking evaluation. ``SECTIONS`` says which class validates ``<key>.recsys`` of params.yaml.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from tasks.config_types import Fraction, Positive, ProjectPath, Seed, Strict
from tasks.ctr.config import SECTIONS as CTR_SECTIONS

# model files saved before the kit (tasks.ctr) name their architecture tasks.recsys.config:RecArch
from tasks.ctr.config import RecArch as RecArch
from tasks.ctr.config import check as check_ctr
from tasks.family_config import Sha256, WheelFolder

if TYPE_CHECKING:
    from tasks.config import Config

RECSYS_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item", "ml-100k.zip")


class RecsysSplit(Strict):
    # hash: each rating's split follows from a seeded hash of (user, item, timestamp) alone, so it never changes when
    # batches arrive (a re-drawn split would put a champion's training rows in the new test split); temporal: the
    # newest ratings are validation, then test
    method: Literal["hash", "temporal"]
    val: Annotated[float, Field(gt=0.0, lt=0.5)]
    test: Annotated[float, Field(gt=0.0, lt=0.5)]

    def sizes(self, n: int) -> tuple[int, int, int]:
        """Rows of train, val and test for ``n`` labelled ratings."""
        n_test, n_val = round(n * self.test), round(n * self.val)
        return n - n_val - n_test, n_val, n_test


class RecsysData(Strict):
    """MovieLens-100K as click-through data (RecBole's CTR convention)."""

    # where the pinned files are found: no row depends on them (tasks.lineage.data_params)
    LOCATION: ClassVar[frozenset[str]] = frozenset({"source_dir", "wheel", "url", "download_cache"})
    INPUTS: ClassVar[frozenset[str]] = frozenset({"source_dir"})   # read by the stages: a project's copy links it
    source_dir: str | None = None      # ml-100k.{inter,user,item} (RecBole) or ml-100k.zip (GroupLens)
    wheel: WheelFolder                 # its member_dir holds ml-100k.{inter,user,item}
    url: str                           # the GroupLens zip
    download_cache: ProjectPath
    sha256: dict[str, Sha256]          # every raw file: the three RecBole files and the GroupLens zip
    positive_min_rating: Annotated[int, Field(ge=1, le=5)]
    negative_max_rating: Annotated[int, Field(ge=1, le=5)]
    zip_prefix_length: Annotated[int, Field(ge=1, le=5)]
    year_bucket: Positive              # release years grouped into buckets of this many years
    split: RecsysSplit
    seed: Seed

    @model_validator(mode="after")
    def _consistent(self) -> RecsysData:
        if set(self.sha256) != set(RECSYS_FILES):
            raise ValueError(f"sha256 must pin exactly {list(RECSYS_FILES)}, got {sorted(self.sha256)}")
        if self.negative_max_rating >= self.positive_min_rating:
            raise ValueError(f"negative_max_rating ({self.negative_max_rating}) must be below positive_min_rating "
                             f"({self.positive_min_rating})")
        return self


class RecsysValidation(Strict):
    positive_fraction: Fraction        # expected share of label 1 per split ...
    positive_tolerance: Fraction       # ... within this absolute tolerance
    min_kept_fraction: Fraction        # share of the snapshot's ratings that must be labelled (not neutral)
    split_tolerance: Fraction          # a split's share of the labelled rows may differ from its configured share by this
    min_rows: dict[Literal["train", "val", "test"], Positive]   # a floor per split


Share = Annotated[float, Field(ge=0.0, le=1.0)]


class RecsysDrift(Strict):
    """Largest change a new batch may bring against the accepted data (TFX's comparators); more is drift."""

    rating_linf: Share                 # L-infinity between the batch's and the accepted rating histograms (1-5)
    click_rate_delta: Share            # |click rate of the batch - click rate of the accepted data|
    unseen_user_share: Share           # share of the batch's ratings by users with no accepted rating
    unseen_item_share: Share           # ... of items with no accepted rating
    age_js: Share                      # Jensen-Shannon divergence (base 2) of the raters' age groups
    gender_js: Share                   # ... of the raters' genders
    occupation_js: Share               # ... of the raters' occupations
    genre_js: Share                    # ... of the rated items' genres


class RecsysReplay(Strict):
    """``python -m flows.replay``: MovieLens-100K cut by time into an initial window and batches that arrive."""

    initial_fraction: Annotated[float, Field(gt=0.0, lt=1.0)]   # the oldest ratings: the first batch
    period_days: Positive              # then one batch per this many days ...
    min_rows: Positive                 # ... a period with fewer ratings joins the next


class RecsysIngest(Strict):
    """``python -m flows.ingest --family recsys``: what a new batch must satisfy to join the snapshot."""

    bootstrap: Literal["published", "empty"]   # the snapshot starts as the published data set, or with no batch
    min_rows: Positive                 # ratings in a batch
    drift: RecsysDrift
    replay: RecsysReplay


class EvaluateRecsys(Strict):
    threads: Positive
    warmup: Annotated[int, Field(ge=0)]
    repeats: Annotated[int, Field(ge=10)]
    candidates: Positive               # items scored per request: latency is one user's request of this size
    ranking_k: Positive                # NDCG@k and Recall@k
    ranking_users: Positive | None = None   # rank a seeded sample of this many test users (None: every one)
    # a champion of an older vocabulary scores a row with a value it lacks as the mean over this many of its known
    # values of that field (tasks.recsys.family.cold_start_rows); 0: such rows are left out
    cold_start_samples: Annotated[int, Field(ge=0)] = 0


SECTIONS: dict[str, Any] = {**CTR_SECTIONS, "data": RecsysData, "validate": RecsysValidation,
                            "evaluate": EvaluateRecsys, "ingest": RecsysIngest}


def check(cfg: Config) -> None:
    check_ctr(cfg, "recsys")
