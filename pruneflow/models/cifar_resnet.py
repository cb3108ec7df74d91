"""CIFAR ResNets (He et al. 2016, section 4.2): the 6n+2-layer nets the pruning literature reports on.

A 3x3 stem with 16 channels, three stages of n BasicBlocks with 16/32/64 channels (the last two start
with a stride-2 block), global average pooling and one linear layer. Downsampling blocks use a 1x1
conv + BN shortcut ("option B", as Torch-Pruning's CIFAR benchmarks do; the paper's zero-padding option A
has no weights to prune consistently). ResNet-56 at 32x32: 0.86 M params, 127.4 M MACs by
``count_macs_params`` (it also counts BN and ReLU; the conv/linear layers alone hold 125.7 M).
Global average pooling makes any input size work (tests use 8x8 images).
"""

from __future__ import annotations

import torch
from torch import nn

from pruneflow.models import MODELS


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        # Two ReLU modules, not one reused: activation-based methods hook each post-ReLU output separately.
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU(inplace=True)

    @property
    def keeps_shape(self) -> bool:
        """True when output shape equals input shape, so the whole block may be replaced by identity."""
        return isinstance(self.shortcut, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, c_in = [], width
        for index, c_out in enumerate((width, 2 * width, 4 * width)):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(*(BasicBlock(c_in if b == 0 else c_out, c_out, stride if b == 0 else 1)
                                          for b in range(blocks))))
            c_in = c_out
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def removable_blocks(self) -> list[str]:
        """Blocks the ``cascade`` method may replace by identity: all but each stage's downsampling block."""
        return [name for name, module in self.named_modules() if isinstance(module, BasicBlock) and module.keeps_shape]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


@MODELS.register("resnet20")
def resnet20(in_channels: int = 3, num_classes: int = 10, width: int = 16) -> nn.Module:
    return CifarResNet(20, in_channels, num_classes, width)


@MODELS.register("resnet56")
def resnet56(in_channels: int = 3, num_classes: int = 10, width: int = 16) -> nn.Module:
    return CifarResNet(56, in_channels, num_classes, width)


@MODELS.register("resnet110")
def resnet110(in_channels: int = 3, num_classes: int = 10, width: int = 16) -> nn.Module:
    return CifarResNet(110, in_channels, num_classes, width)
