"""An image family's ablation params (``ablation.<family>``): its seeds, per-stage overrides, targets and low-bit arms.
``tasks.images.config.ablation_recipes`` merges the overrides into the stage recipes."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from tasks.config_types import Fraction, Positive, Seed, Strict, distinct


class AblationTargets(Strict):
    """Targets of the ablation benchmark, checked on seed means."""

    kd_qat_accuracy: Fraction          # the KD + QAT INT8 student at least this accurate
    max_drop_vs_teacher: Fraction      # ... and at most this far below the teacher
    min_gain_over_ptq: Fraction        # ... and at least this far above CE-only + PTQ INT8


class LowBitArms(Strict):
    """W<weight_bits>A8 arms beside the 8-bit ones: CE-only + PTQ, QAT without KD and KD + QAT with weights at
    ``weight_bits`` (QAT's own schedule, onnxruntime's PTQ at the same bits), and their targets."""

    weight_bits: Literal[4]
    min_gain_over_ptq: Fraction        # KD + QAT at least this far above CE-only + PTQ, both at weight_bits
    max_size_ratio: Annotated[float, Field(gt=0.0)]   # KD + QAT file bytes at most this share of the 8-bit one's


class AblationImages(Strict):
    """The ablation benchmark: every arm trained once per seed with the stage recipes, where ``distill``, ``prune``,
    ``qat`` and ``share`` hold overrides of ``<stage>.<family>`` for the ablation only (e.g. fewer epochs)."""

    seeds: Annotated[list[Seed], Field(min_length=1), distinct("seed")]
    calibration_size: Positive         # validation images that calibrate the PTQ baseline (never test images)
    distill: dict[str, Any] = {}
    prune: dict[str, Any] = {}
    qat: dict[str, Any] = {}
    share: dict[str, Any] = {}
    targets: AblationTargets
    low_bit: LowBitArms | None = None  # null: the 8-bit arms only
