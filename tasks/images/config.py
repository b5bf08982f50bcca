"""An image family's params sections (its images, a ResNet teacher, a MobileNet-style student), the checks that span
them, and the ablation's recipes. ``SECTIONS`` says which class validates ``<key>.<family>`` of params.yaml for a
family built on this kit (``tasks.images``); ``check`` is its cross-section check.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationError, model_validator

from tasks.config_types import Fraction, Positive, Strict, distinct
from tasks.family_config import (
    Floors,
    Gate,
    GradualPruning,
    LossWeights,
    ObserverFreeze,
    Parity,
    PretrainedTeacher,
    Recipe,
    Score,
    Training,
    VsTeacher,
    WarmStart,
)
from tasks.images.ablation_config import AblationImages
from tasks.images.arch_config import MobileArch, ResNetArch
from tasks.images.data_config import ImageData, ImageIngest, ImageValidation

if TYPE_CHECKING:
    from tasks.config import Config


class Erasing(Strict):
    """Random erasing (Zhong et al., AAAI 2020): with ``probability`` an image gets a rectangle set to the data's mean
    pixel (0 once normalised), its area drawn uniformly from ``area`` (fractions of the image) and its aspect ratio
    log-uniformly from 1/``max_aspect`` to ``max_aspect``; a rectangle larger than the image is cut to it."""

    probability: Fraction
    area: Annotated[list[Fraction], Field(min_length=2, max_length=2)] = [0.02, 0.4]   # [low, high]
    max_aspect: Annotated[float, Field(ge=1.0)] = 3.3

    @model_validator(mode="after")
    def _ordered(self) -> Erasing:
        if not 0.0 < self.area[0] <= self.area[1]:
            raise ValueError(f"area must be [low, high] with 0 < low <= high, got {self.area}")
        return self


class Augmentation(Strict):
    crop_padding: Annotated[int, Field(ge=0, le=8)]
    horizontal_flip: bool
    erasing: Erasing | None = None


class Ema(Strict):
    """An exponential moving average of the weights (and batch-norm statistics), updated after every step: what is
    scored on validation each epoch and kept at the end (the live weights are what the checkpoint resumes)."""

    decay: Annotated[float, Field(gt=0.0, lt=1.0)]


class TrainingRecipe(Training):
    """An image training run, shared by the teacher and student stages."""

    label_smoothing: Fraction
    augmentation: Augmentation
    bf16: bool
    ema: Ema | None = None   # the teacher's and the distilled student's; the compression stages refuse it


class NoEma(TrainingRecipe):
    """A compression stage's recipe: no weight average. Pruning masks, fake quantization's observed ranges and shared
    weights' cluster indices are state an average of the weights would not follow."""

    @model_validator(mode="after")
    def _no_ema(self) -> NoEma:
        if self.ema is not None:
            raise ValueError("ema must be unset: a compression stage's masks, observers or clusters would not follow "
                             "averaged weights")
        return self


class TrainTeacherImages(TrainingRecipe):
    arch: ResNetArch
    pretrained: PretrainedTeacher | None = None

    @model_validator(mode="after")
    def _mirror_keeps_the_label(self) -> TrainTeacherImages:
        if self.arch.flip_average and not self.augmentation.horizontal_flip:
            raise ValueError("arch.flip_average averages each image with its mirror: only for data whose mirror "
                             "keeps the label, which augmentation.horizontal_flip: false says this data's does not")
        return self

    def feature_stages(self) -> int:
        """How many feature maps the teacher offers to feature distillation."""
        if self.pretrained and self.pretrained.format != "state_dict":
            return len(self.pretrained.features)
        return len(self.arch.widths)


class FeaturePair(Strict):
    """Align the output of teacher stage ``teacher`` with that of student block ``student`` (0-based)."""

    teacher: Annotated[int, Field(ge=0)]
    student: Annotated[int, Field(ge=0)]


class Dkd(Strict):
    """Decoupled KD (Zhao et al., CVPR 2022): alpha·TCKD (target vs the rest) + beta·NCKD (among the non-targets)."""

    alpha: Annotated[float, Field(ge=0.0)] = 1.0
    beta: Annotated[float, Field(ge=0.0)] = 8.0

    @model_validator(mode="after")
    def _some_weight(self) -> Dkd:
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("alpha and beta are both 0: the soft-target term would be 0 (weigh one, or set "
                             "weights.target: 0)")
        return self


class DistillImages(TrainingRecipe):
    student: MobileArch
    temperature: Annotated[float, Field(gt=0.0)]
    target_loss: Literal["kl", "mse", "dkd"]
    dkd: Dkd = Dkd()   # read when target_loss is dkd
    weights: LossWeights
    feature_pairs: list[FeaturePair] = []
    # The frozen teacher's forward in bf16 autocast (inference only), where the CPU computes bf16 natively.
    teacher_bf16: bool
    # Who runs the frozen teacher while students distil (distill, prune, qat and share): PyTorch, or onnxruntime on
    # its ONNX twin (fp32; teacher_bf16 then does not apply); auto: PyTorch on a GPU and where it runs the teacher in
    # bf16 (teacher_bf16 and a CPU with native bf16), else onnxruntime. `make benchmark-teacher` measures them.
    teacher_runtime: Literal["auto", "pytorch", "onnxruntime"] = "auto"

    def resolved(self, device: str | None = None) -> DistillImages:
        """This recipe with ``auto`` replaced by what runs on this machine: what the distilling stages train,
        fingerprint their checkpoints and log with, so neither names "auto" (a checkpoint resumed on another kind of
        CPU must not mix the two teachers' targets). ``device``: the device knob of the stage that trains against
        the teacher (prune, qat, share), when not this block's. Not at params load: that would import PyTorch into
        every process that reads params."""
        if self.teacher_runtime != "auto":
            return self
        runtime = "onnxruntime" if self.teacher_in_onnxruntime(device) else "pytorch"
        return self.model_copy(update={"teacher_runtime": runtime})

    def teacher_in_onnxruntime(self, device: str | None = None) -> bool:
        """Whether the frozen teacher runs as its ONNX twin on this machine (``auto`` resolved: never when the
        student trains on a GPU (``device``, else this block's), where the PyTorch teacher computes beside it)."""
        import torch

        from tasks.hardware import native_bf16

        if self.teacher_runtime == "auto":
            if (device or self.device) != "cpu" and torch.cuda.is_available():
                return False
            return not (self.teacher_bf16 and native_bf16())
        return self.teacher_runtime == "onnxruntime"


class PruneImages(NoEma, GradualPruning):
    """Magnitude pruning of the student: single weights (unstructured) or whole channels (structured)."""

    mode: Literal["unstructured", "structured"]
    scope: Literal["global", "layer"]
    min_channels: Positive             # structured: no channel group (tasks.channel_pruning) keeps fewer channels


class Fp32Recipe(NoEma):
    """A recipe that trains through fake quantization, which is simulated in fp32."""

    @model_validator(mode="after")
    def _fp32_fake_quant(self) -> Fp32Recipe:
        if self.bf16:
            raise ValueError("bf16 must be false: fake quantization is simulated in fp32")
        return self


class QatImages(Fp32Recipe, ObserverFreeze):
    """QAT of the student; the KD loss of ``distill.<family>`` stays active when the recipe has ``distill``."""

    # Only 8: convert_fx widens narrower activation ranges to 8 bits, and even with each activation clamped to its
    # N-bit range (a Clip before every QuantizeLinear) the INT8 file agreed with the fake-quantized student on only
    # 88-95 % of test images (4 and 6 bits, small students, 2026-12-01): refused rather than shipped unlike its
    # training.
    activation_bits: Literal[8]
    # signed, per channel, narrow: ±(2^(b-1) - 1); 4 ships INT4 weights (opset 21, tasks/int4.py); PTQ quantizes
    # to the same bits (4: onnxruntime's INT4, [-8, 7])
    weight_bits: Literal[4, 7, 8]
    freeze_bn_after: Annotated[int, Field(ge=0)]
    # A layer whose weights are at least this share zeros counts as pruned: its zeros are held through QAT.
    pruned_min_sparsity: Annotated[float, Field(gt=0.0, le=1.0)]
    # Student modules left in float ("stem", "head", "blocks.<i>"); the PTQ baseline leaves out the same ones.
    float_modules: Annotated[list[Annotated[str, Field(pattern=r"^(stem|head|blocks\.\d+)$")]], distinct("module")] = []


class ShareImages(Fp32Recipe):
    """Weight sharing after QAT: ``clusters`` centroids per layer (16 = 4-bit indices), fine-tuned with KD."""

    clusters: Annotated[int, Field(ge=2, le=256)]


class ExportImages(Strict):
    opset: Annotated[int, Field(ge=13, le=21)]   # QDQ with per-channel axes needs 13+
    calibration_size: Positive                   # validation images that calibrate onnxruntime PTQ
    threads: Positive
    parity: Parity


class EvaluateImages(Strict):
    """How onnxruntime latency is measured; recorded with the results."""

    threads: Positive                  # intra-op threads (fixed: measurements must not follow the machine's load)
    warmup: Annotated[int, Field(ge=0)]
    repeats: Annotated[int, Field(ge=10)]
    throughput_batch: Positive
    throughput_repeats: Annotated[int, Field(ge=3)]


class GateFloors(Floors):
    min_accuracy: Score


class GateVsTeacher(VsTeacher):
    max_accuracy_drop: Score


class GateVsChampion(Strict):
    max_accuracy_drop: Score


class GateImages(Gate):
    metric: ClassVar[str] = "accuracy"
    floors: GateFloors
    vs_teacher: GateVsTeacher
    vs_champion: GateVsChampion


SECTIONS: dict[str, Any] = {
    "data": ImageData, "validate": ImageValidation, "teacher": TrainTeacherImages,
    "recipe": Recipe,
    "distill": DistillImages, "prune": PruneImages, "qat": QatImages, "share": ShareImages, "export": ExportImages,
    "evaluate": EvaluateImages, "gate": GateImages, "ablation": AblationImages, "ingest": ImageIngest,
    "warm_start": WarmStart}


def image_families(cfg: Config) -> list[str]:
    """The families of ``cfg`` built on this kit (their ``distill`` block is the kit's)."""
    return [name for name in cfg.families if isinstance(cfg.block("distill", name), DistillImages)]


def ablation_recipes(cfg: Config, seed: int, family: str, resolve: bool = True) -> dict[str, TrainingRecipe]:
    """The stage recipes of ``family``'s ablation for one seed: ``<stage>.<family>`` with
    ``ablation.<family>.<stage>`` merged over it (validated as strictly as params.yaml itself), the distillation
    recipe ``resolved`` for this machine unless not ``resolve`` (params' check at load: that imports PyTorch)."""
    from tasks.config import deep_merge

    recipes: dict[str, TrainingRecipe] = {}
    stages = (("distill", DistillImages), ("prune", PruneImages), ("qat", QatImages), ("share", ShareImages))
    for stage, model in stages:
        base = cfg.block(stage, family).model_dump()
        merged = deep_merge(base, {**getattr(cfg.block("ablation", family), stage), "seed": seed})
        try:
            recipes[stage] = model.model_validate(merged)
            if resolve and isinstance(recipes[stage], DistillImages):
                recipes[stage] = recipes[stage].resolved()
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise ValueError(f"ablation.{family}.{stage} does not give a valid {stage}.{family}: {problems}") from None
    return recipes


def check(cfg: Config, family: str) -> None:
    """What no single section of ``family`` can check: QAT's float modules and the feature pairs (of the stage blocks
    and of the ablation's recipes, the blocks with its overrides), the ingest's repeats."""
    kd, qat, teacher = (cfg.block(key, family) for key in ("distill", "qat", "teacher"))
    _check_recipe(kd, qat, teacher, f"distill.{family}", f"qat.{family}", f"teacher.{family}")
    if cfg.ablation is not None and (ablation := getattr(cfg.ablation, family, None)) is not None:
        recipes = ablation_recipes(cfg, ablation.seeds[0], family, resolve=False)
        _check_recipe(recipes["distill"], recipes["qat"], teacher, f"ablation.{family}.distill",
                      f"ablation.{family}.qat", f"teacher.{family}")
    ingest = getattr(getattr(cfg, "ingest", None), family, None)
    held = cfg.block("data", family).batch_test_fraction
    if ingest is not None and ingest.max_repeated_fraction + held > 1:   # prepare holds out no repeated image
        raise ValueError(f"ingest.{family}.max_repeated_fraction ({ingest.max_repeated_fraction}) plus "
                         f"data.{family}.batch_test_fraction ({held}) exceeds 1: a batch of repeats could not give "
                         "its test rows")


def _check_recipe(kd: DistillImages, qat: QatImages, teacher: TrainTeacherImages, at_kd: str, at_qat: str,
                  at_teacher: str) -> None:
    """A distillation and QAT recipe against the student and teacher they train (``at_*``: where each is in params)."""
    blocks = len(kd.student.widths)
    for i, name in enumerate(qat.float_modules):
        if name.startswith("blocks.") and int(name.split(".")[1]) >= blocks:
            raise ValueError(f"{at_qat}.float_modules.{i}: {name} does not exist (the student has blocks "
                             f"0..{blocks - 1})")
    stages = teacher.feature_stages()
    offered = f"stages 0..{stages - 1}" if stages else f"no feature maps: name them in {at_teacher}.pretrained.features"
    for i, pair in enumerate(kd.feature_pairs):
        if pair.teacher >= stages:
            raise ValueError(f"{at_kd}.feature_pairs.{i}.teacher: teacher stage {pair.teacher} does not exist (the "
                             f"teacher has {offered})")
        if pair.student >= blocks:
            raise ValueError(f"{at_kd}.feature_pairs.{i}.student: student block {pair.student} does not exist (the "
                             f"student has blocks 0..{blocks - 1})")
    if kd.feature_pairs and kd.weights.feature == 0:
        raise ValueError(f"{at_kd}.weights.feature is 0 but feature_pairs are set; set a weight or drop the pairs")
    if kd.weights.feature > 0 and not kd.feature_pairs:
        raise ValueError(f"{at_kd}.weights.feature > 0 needs at least one entry in {at_kd}.feature_pairs")
