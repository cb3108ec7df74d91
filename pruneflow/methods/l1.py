"""``l1``: filters with the smallest L1 norm go first, the same share in every layer (Li et al. 2017)."""

from __future__ import annotations

import torch_pruning as tp

from pruneflow.methods import register_method
from pruneflow.methods.base import PruningMethod


@register_method
class L1(PruningMethod):
    name = "l1"
    description = "L1 norm of each filter, uniform ratio per layer (Li et al. 2017)"

    def importance(self) -> tp.importance.Importance:
        return tp.importance.MagnitudeImportance(p=1)
