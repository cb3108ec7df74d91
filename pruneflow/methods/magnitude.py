"""Weight-magnitude criteria: ``l1``/``l2`` score each filter by its own weights, ``group_l1``/``group_l2`` by the
whole dependency group's. One configurable class (as Torch-Pruning's ``GroupMagnitudeImportance`` is), four names.

``l1`` — [paper] Li et al. 2017 ("Pruning Filters for Efficient ConvNets"): filter j of a conv scores
s_j = Σ|W_j|, the sum of its kernel weights' absolute values; the filters with the smallest s_j go, the same
share of every layer. For a residual stage, whose shortcut and last convs share their output channels, the paper
lets the shortcut projection's filters decide which go. Torch-Pruning 1.6 computes exactly this with
``GroupMagnitudeImportance(p=1, group_reduction="first", normalizer=None)`` limited to conv/linear layers: the
group's *first* member is its root conv's output channels, i.e. the pruned conv's own filters (and in a CIFAR
ResNet's residual group the root is the stage's shortcut conv, as in the paper). ``l2`` is the same with
Σ W_j² (the squared L2 norm: the same ranking as the norm), which weighs a filter's few large weights more.

``group_l1`` / ``group_l2`` — [public] DepGraph (Fang et al. 2023), Torch-Pruning's default
``MagnitudeImportance(p)``: a channel's score is the mean, over every member of its dependency group, of the
norm of that member's weights for the channel — the producing convs' filters, the BatchNorm's γ, and the next
layers' input slices — each group's scores then divided by their mean. It judges a channel by everything that
goes when it goes, not by one filter; on a ResNet-20 the two rankings differ in every group.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch_pruning as tp
from torch import nn

from pruneflow.methods import register_method
from pruneflow.methods.base import PruningMethod


class Magnitude(PruningMethod):
    """The norm ``p`` of the pruned conv's own filters (``scope = "filter"``) or of the whole group's weights."""

    p: ClassVar[int] = 1
    scope: ClassVar[Literal["filter", "group"]] = "filter"

    def importance(self) -> tp.importance.Importance:
        if self.scope == "filter":
            return tp.importance.GroupMagnitudeImportance(p=self.p, group_reduction="first", normalizer=None,
                                                         target_types=[nn.modules.conv._ConvNd, nn.Linear])
        return tp.importance.GroupMagnitudeImportance(p=self.p)  # mean over the group, mean-normalised


@register_method
class L1(Magnitude):
    name = "l1"
    description = "L1 norm of each filter, uniform ratio per layer (Li et al. 2017)"


@register_method
class L2(Magnitude):
    name = "l2"
    description = "L2 norm of each filter, uniform ratio per layer"
    p = 2


@register_method
class GroupL1(Magnitude):
    name = "group_l1"
    description = "L1 norm over the channel's whole dependency group (convs, BN, next layers), uniform ratio (DepGraph)"
    scope = "group"


@register_method
class GroupL2(Magnitude):
    name = "group_l2"
    description = "L2 norm over the channel's whole dependency group, uniform ratio (DepGraph, Torch-Pruning's default)"
    p = 2
    scope = "group"
