"""An image family's model architectures, as params give them and every model file records them (``arch``):
the ResNet teacher and the MobileNet-style student."""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from tasks.config_types import ModelArch, Positive


class ResNetArch(ModelArch):
    MODEL: ClassVar[str] = "tasks.images.models:ResNetTeacher"
    stem: Positive
    widths: list[Positive] = Field(min_length=1)
    blocks: list[Positive] = Field(min_length=1)
    # Flip test-time augmentation: in eval mode the logits and feature maps are the average of the image's and its
    # mirror's (maps mirrored back), so its scores, its soft targets for students and its ONNX file all see both;
    # training is unchanged. Twice the teacher's inference cost. Only for data whose mirror keeps the label.
    flip_average: bool = False

    @model_validator(mode="after")
    def _same_length(self) -> ResNetArch:
        if len(self.widths) != len(self.blocks):
            raise ValueError(f"widths ({len(self.widths)}) and blocks ({len(self.blocks)}) must have the same length")
        return self


class MobileArch(ModelArch):
    """MobileNet-style blocks; channel counts are scaled by ``width_multiplier``.

    Each block is ``separable`` (depthwise 3x3 + pointwise 1x1) or ``fused`` (one regular 3x3 convolution, the
    Fused-MBConv of EfficientNetV2 without expansion); ``kinds`` omitted means all separable.
    """

    MODEL: ClassVar[str] = "tasks.images.models:MobileStudent"
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
