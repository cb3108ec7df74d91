"""Super-resolution models: ESPCN (Shi et al. 2016) and the three-level cascade of Zhong 2022 built from it.

``espcn`` is the classic PyTorch sub-pixel example: conv 1→64 5×5, 64→64 3×3, 64→32 3×3, 32→r² 3×3, then
PixelShuffle(r); ReLU after the first three; orthogonal init. 59,657 params at r = 3. Input: the Y channel
of the low-resolution image in [0, 1]; output: the Y channel r times larger.

``espcn_cascade`` (Zhong 2022, as ``../shared/docs/METHODS.md`` specifies it): three identical ESPCN
branches on the full input and on its ½ and ¼ bicubic downscales; the two downscaled branches' outputs are
bicubically resized to the full output and the branches are averaged. 178,971 params at r = 3 (3 × ESPCN).
It declares the two downscaled branches as removable (``removable_blocks``), and removing one drops it from
the average (``remove_block``), so ``cascade`` pruning yields the paper's two- and one-branch models. With
both gone the model computes exactly an ESPCN.

Channel pruning keeps each branch's first conv (the stem rule every method follows) and its last conv,
whose r² output channels are the sub-pixels PixelShuffle rearranges: removing one would break the image.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from pruneflow.models import MODELS


class ESPCN(nn.Module):
    def __init__(self, in_channels: int = 1, upscale_factor: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 5, padding=2)
        self.relu1 = nn.ReLU()  # one ReLU module per layer: activation-based methods hook each output
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(64, 32, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(32, in_channels * upscale_factor**2, 3, padding=1)
        self.pixel_shuffle = nn.PixelShuffle(upscale_factor)
        self.upscale_factor = upscale_factor
        for conv in (self.conv1, self.conv2, self.conv3):
            nn.init.orthogonal_(conv.weight, nn.init.calculate_gain("relu"))
        nn.init.orthogonal_(self.conv4.weight)

    def pruneflow_ignored_layers(self) -> list[nn.Module]:
        """The stem keeps its channels, and the last conv its r² sub-pixel channels."""
        return [self.conv1, self.conv4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu3(self.conv3(self.relu2(self.conv2(self.relu1(self.conv1(x))))))
        return self.pixel_shuffle(self.conv4(x))


class CascadeESPCN(nn.Module):
    """Branches keyed by level: ``full`` sees the input, ``down2``/``down4`` its ½ and ¼ downscales."""

    LEVELS = {"full": 1, "down2": 2, "down4": 4}  # ModuleDict keys: "half" is taken by .half()

    def __init__(self, in_channels: int = 1, upscale_factor: int = 3) -> None:
        super().__init__()
        self.branches = nn.ModuleDict({level: ESPCN(in_channels, upscale_factor) for level in self.LEVELS})
        self.upscale_factor = upscale_factor

    def removable_blocks(self) -> list[str]:
        """The downscaled branches still present (the full-resolution one always stays)."""
        return [f"branches.{level}" for level in self.branches if self.LEVELS[level] > 1]

    def remove_block(self, name: str) -> None:
        """Drop a branch: the output becomes the average of the branches left."""
        if name not in self.removable_blocks():
            raise ValueError(f"{name} is not a removable branch of this cascade; removable: "
                             f"{', '.join(self.removable_blocks()) or 'none'}")
        del self.branches[name.removeprefix("branches.")]

    def pruneflow_ignored_layers(self) -> list[nn.Module]:
        branches = cast("list[ESPCN]", list(self.branches.values()))  # nn.ModuleDict is not generic
        return [layer for branch in branches for layer in branch.pruneflow_ignored_layers()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        size = (height * self.upscale_factor, width * self.upscale_factor)
        outputs = []
        for level, branch in self.branches.items():
            factor = self.LEVELS[level]
            if factor == 1:
                outputs.append(branch(x))
                continue
            small = F.interpolate(x, size=(height // factor, width // factor), mode="bicubic", align_corners=False)
            outputs.append(F.interpolate(branch(small), size=size, mode="bicubic", align_corners=False))
        return sum(outputs) / len(outputs)


@MODELS.register("espcn")
def espcn(in_channels: int = 1, upscale_factor: int = 3) -> nn.Module:
    return ESPCN(in_channels, upscale_factor)


@MODELS.register("espcn_cascade")
def espcn_cascade(in_channels: int = 1, upscale_factor: int = 3) -> nn.Module:
    return CascadeESPCN(in_channels, upscale_factor)
