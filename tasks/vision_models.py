"""Vision model architectures: the residual CNN teacher."""
from __future__ import annotations

import torch
from torch import nn

from tasks.config import ResNetArch


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
    """A small ResNet for 1x28x28 inputs; every stage halves the resolution.

    ``features`` returns the feature map of each stage, so distillation can align them later.
    """

    def __init__(self, arch: ResNetArch, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, arch.stem, 3, 1, 1, bias=False), nn.BatchNorm2d(arch.stem),
                                  nn.ReLU(inplace=True))
        stages, cin = [], arch.stem
        for width, blocks in zip(arch.widths, arch.blocks):
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

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps, y = [], self.stem(x)
        for stage in self.stages:
            y = stage(y)
            maps.append(y)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)[-1].mean(dim=(2, 3)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
