"""A click-through family's params sections (field-embedding models: DeepFM teacher and student, their compression,
export and gate) and the check that spans them. ``SECTIONS`` says which class validates ``<key>.<family>`` of
params.yaml for a family built on this kit (``tasks.ctr``); the family adds its data, validation, evaluation and
ingestion sections.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import Field

from tasks.config_types import Fraction, ModelArch, Positive, Strict
from tasks.family_config import (
    Floors,
    Gate,
    GradualPruning,
    LossWeights,
    ObserverFreeze,
    PretrainedTeacher,
    Recipe,
    Score,
    Training,
    VsTeacher,
    WarmStart,
)

if TYPE_CHECKING:
    from tasks.config import Config


class RecArch(ModelArch):
    """A click-through model over field embeddings: first-order weights, FM pairwise interactions (``fm``) and an
    MLP over the concatenated field embeddings (``mlp``; empty for none). DeepFM: both; FM: fm only; LR: neither."""

    MODEL: ClassVar[str] = "tasks.ctr.models:CtrModel"
    dim: Positive
    fm: bool
    mlp: list[Positive] = []
    dropout: Fraction = 0.0
    # Weight sharing: the field-embedding table holds this many shared rows, each id mapped to one (share stage).
    shared_rows: Annotated[int, Field(ge=2, le=65536)] | None = None


class TrainTeacherCtr(Training):
    arch: RecArch
    pretrained: PretrainedTeacher | None = None   # features: the one (N, fields + groups, dim) field-vector tensor


class DistillCtr(Training):
    """total = ground_truth·BCE(y) + target·BCE(σ(s/T), σ(t/T))·T² + feature·embedding MSE + label·BCE(t > 0)."""

    student: RecArch
    temperature: Annotated[float, Field(gt=0.0)]
    weights: LossWeights


class PruneCtr(GradualPruning):
    """Structured pruning of embedding dimensions (``final_sparsity``: the share removed), i.e. the columns of every
    embedding table and the MLP inputs they feed. The model is rebuilt narrower: smaller and faster, not sparser."""


class QatCtr(Training, ObserverFreeze):
    """QAT of the student: per-row INT8 embedding tables and an INT8 MLP, fake-quantized; the family's distillation
    loss stays active when its recipe has ``distill``."""

    mlp_weight_bits: Annotated[int, Field(ge=2, le=8)]   # signed, per channel, narrow: ±(2^(b-1) - 1)
    float_last_layer: bool             # the MLP's one-output layer left in float


class ShareCtr(Training):
    """Weight sharing of the field-embedding table: k-means over its rows, each id then points at one of ``clusters``
    shared rows (a one- or two-byte index instead of its own row); the centroids are fine-tuned with KD."""

    clusters: Annotated[int, Field(ge=2, le=65536)]


class CtrParity(Strict):
    """ONNX file vs the PyTorch model it came from: predicted probabilities and AUC on the test split."""

    max_probability_diff: Annotated[float, Field(gt=0.0, lt=1.0)]
    min_rows_within: Annotated[float, Field(gt=0.0, le=1.0)]   # share of rows within max_probability_diff
    max_auc_delta: Fraction


class ExportCtr(Strict):
    opset: Annotated[int, Field(ge=13, le=21)]
    threads: Positive
    parity: CtrParity


class AucFloors(Floors):
    min_auc: Score


class AucVsTeacher(VsTeacher):
    max_auc_drop: Score


class AucVsChampion(Strict):
    max_auc_drop: Score


class GateCtr(Gate):
    metric: ClassVar[str] = "auc"
    floors: AucFloors
    vs_teacher: AucVsTeacher
    vs_champion: AucVsChampion


SECTIONS: dict[str, Any] = {
    "teacher": TrainTeacherCtr, "recipe": Recipe, "distill": DistillCtr, "prune": PruneCtr, "qat": QatCtr,
    "share": ShareCtr, "export": ExportCtr, "gate": GateCtr, "warm_start": WarmStart}


def warm_start_policy(cfg: Config, family: str) -> WarmStart | None:
    """``warm_start.<family>``, or None for a family without a warm start (it always trains from scratch)."""
    section = getattr(cfg, "warm_start", None)
    return getattr(section, family, None) if section is not None else None


def check(cfg: Config, family: str) -> None:
    """What no single section can check: feature distillation from an imported ONNX teacher or PyTorch program needs its
    vectors."""
    spec = cfg.block("teacher", family).pretrained
    feature = cfg.block("distill", family).weights.feature
    if spec and spec.format != "state_dict" and feature > 0 and len(spec.features) != 1:
        raise ValueError(f"distill.{family}.weights.feature > 0 aligns the teacher's field vectors: name that one "
                         f"output in teacher.{family}.pretrained.features, or set the weight to 0")
