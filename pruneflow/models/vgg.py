"""VGG-16 with batch norm, CIFAR variant (as in Li et al. 2017 and network slimming's code).

The 13 conv-BN-ReLU layers of configuration D with their five 2x2 max-pools, then global average
pooling and a single ``Linear(512, num_classes)``: ImageNet VGG's 4096-wide classifier would hold most
of the weights and dwarf the convolutions that pruning targets. 14.7 M params, 314 M MACs at 32x32.
The pools use ``ceil_mode`` so inputs smaller than 32x32 (8x8 in tests) stay at least 1x1; at 32x32
that changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from pruneflow.models import MODELS

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, config: tuple, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(c_in, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                c_in = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@MODELS.register("vgg16_bn")
def vgg16_bn(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    return VGG(VGG16, in_channels, num_classes)
