"""MobileNetV2 (Sandler et al. 2018), CIFAR variant as in the common CIFAR ports.

The ImageNet net downsamples 32x; on 32x32 images that leaves 1x1 maps after the third stage. As in
the usual CIFAR ports, the stem and the 24-channel stage use stride 1 instead of 2, so the net
downsamples 8x (32x32 -> 4x4). Blocks are the paper's inverted residuals (1x1 expand, 3x3 depthwise,
1x1 linear projection, ReLU6), with the identity shortcut only where stride is 1 and channels match;
no extra 1x1 shortcut convs. 2.24 M params, 92.8 M MACs at 32x32.
"""

from __future__ import annotations

import torch
from torch import nn

from pruneflow.models import MODELS

# (expansion t, output channels c, blocks n, stride of the first block s); strides 1, 1 where ImageNet has 2, 2.
CIFAR_SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1))


def conv_bn_relu6(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU6(inplace=True)]


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        expand = conv_bn_relu6(c_in, hidden) if expansion != 1 else []
        self.conv = nn.Sequential(*expand, *conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                                  nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(*conv_bn_relu6(in_channels, 32, 3))]
        c_in = 32
        for expansion, c_out, blocks, stride in CIFAR_SETTING:
            for index in range(blocks):
                layers.append(InvertedResidual(c_in, c_out, stride if index == 0 else 1, expansion))
                c_in = c_out
        layers.append(nn.Sequential(*conv_bn_relu6(c_in, 1280)))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def removable_blocks(self) -> list[str]:
        """Inverted residuals with an identity shortcut: the ``cascade`` method may replace them by identity."""
        return [name for name, module in self.named_modules()
                if isinstance(module, InvertedResidual) and module.residual]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@MODELS.register("mobilenet_v2")
def mobilenet_v2(in_channels: int = 3, num_classes: int = 10, dropout: float = 0.2) -> nn.Module:
    return MobileNetV2(in_channels, num_classes, dropout)
