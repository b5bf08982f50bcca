"""Vision model architectures: the residual CNN teacher and the MobileNet-style student (separable / fused blocks).

Both expose ``forward_features(x) -> (logits, [feature map per stage or block])`` so distillation can align
features without a second forward pass.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tasks.images.arch_config import MobileArch, ResNetArch


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetTeacher(nn.Module):
    """A small ResNet for (C, H, W) images (``input_shape``, the data's; Fashion-MNIST's by default, the shape of
    model files written before it was saved with them); every stage halves the resolution.

    ``features`` returns the feature map of each stage, so distillation can align them later.
    """

    def __init__(self, arch: ResNetArch, num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28)) -> None:
        super().__init__()
        self.num_classes, self.input_shape = num_classes, tuple(input_shape)
        self.flip_average = arch.flip_average
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], arch.stem, 3, 1, 1, bias=False), nn.BatchNorm2d(arch.stem),
                                  nn.ReLU(inplace=True))
        stages, cin = [], arch.stem
        for width, blocks in zip(arch.widths, arch.blocks, strict=True):
            layers = [BasicBlock(cin if i == 0 else width, width, 2 if i == 0 else 1) for i in range(blocks)]
            stages.append(nn.Sequential(*layers))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for block in self.modules():
            if isinstance(block, BasicBlock):
                nn.init.zeros_(block.bn2.weight)  # each residual branch starts as identity: trains faster

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.flip_average and not self.training:
            (logits, maps), (mirrored, mirror_maps) = self._features(x), self._features(x.flip(-1))
            return (logits + mirrored) / 2, [(m + f.flip(-1)) / 2 for m, f in zip(maps, mirror_maps, strict=True)]
        return self._features(x)

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps, y = [], self.stem(x)
        for stage in self.stages:
            y = stage(y)
            maps.append(y)
        return self.head(y.mean(dim=(2, 3))), maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


class MobileBlock(nn.Module):
    """A student block: a branch whose last (conv, batch norm) pair makes the output channels, then ReLU, adding the
    input first when the block is residual (by default whenever the shape is kept)."""

    def __init__(self, cin: int, cout: int, stride: int, residual: bool | None) -> None:
        super().__init__()
        fits = stride == 1 and cin == cout
        if residual and not fits:
            raise ValueError(f"a residual block needs stride 1 and equal widths, got {cin} -> {cout} at stride {stride}")
        self.residual = fits if residual is None else residual
        self.relu = nn.ReLU(inplace=True)

    @property
    def producer(self) -> nn.Sequential:
        """The (conv, batch norm) pair that makes this block's output channels."""
        raise NotImplementedError

    @property
    def reader(self) -> nn.Conv2d:
        """The convolution whose input columns read the incoming channels (the producer's, in both kinds)."""
        return self.producer[0]

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(x)
        return self.relu(y + x if self.residual else y)


class SeparableBlock(MobileBlock):
    """Depthwise 3x3 then pointwise 1x1, each with batch norm (ReLU after the depthwise one)."""

    def __init__(self, cin: int, cout: int, stride: int, residual: bool | None = None) -> None:
        super().__init__(cin, cout, stride, residual)
        self.depthwise = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                                       nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.pointwise = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    @property
    def producer(self) -> nn.Sequential:
        return self.pointwise

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class FusedBlock(MobileBlock):
    """One regular 3x3 convolution with batch norm (Fused-MBConv without expansion). Dearer in FP32 than a
    separable block, but INT8 (VNNI) kernels speed it up ~3x, while depthwise convolutions run no faster in INT8
    than in FP32 on this CPU."""

    def __init__(self, cin: int, cout: int, stride: int, residual: bool | None = None) -> None:
        super().__init__(cin, cout, stride, residual)
        self.conv = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))

    @property
    def producer(self) -> nn.Sequential:
        return self.conv

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


BLOCKS = {"separable": SeparableBlock, "fused": FusedBlock}


def scaled(channels: int, multiplier: float) -> int:
    return max(4, int(round(channels * multiplier)))


class MobileStudent(nn.Module):
    """A small MobileNet-style CNN for (C, H, W) images (``input_shape``: as ``ResNetTeacher``)."""

    def __init__(self, arch: MobileArch, num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28)) -> None:
        super().__init__()
        self.num_classes, self.input_shape = num_classes, tuple(input_shape)
        cin = scaled(arch.stem, arch.width_multiplier)
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], cin, 3, arch.stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(cin),
                                  nn.ReLU(inplace=True))
        blocks = []
        residual = arch.residual or [None] * len(arch.widths)
        for width, stride, kind, res in zip(arch.widths, arch.strides, arch.block_kinds(), residual, strict=True):
            cout = scaled(width, arch.width_multiplier)
            blocks.append(BLOCKS[kind](cin, cout, stride, res))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(cin, num_classes)
        # Small images can leave a 1x1 map before the head, where torch's INT8 model cannot take the mean of a
        # quantized map ("required rank 4 tensor to use channels_last format", seen on 8x8 digits): flatten it.
        h, w = input_shape[1:]
        for stride in (arch.stem_stride, *arch.strides):
            h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
        self.one_pixel = h * w == 1

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps, y = [], self.stem(x)
        for block in self.blocks:
            y = block(y)
            maps.append(y)
        return self.head(y.flatten(1) if self.one_pixel else y.mean(dim=(2, 3))), maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]
