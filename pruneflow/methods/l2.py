"""``l2``: filters with the smallest L2 norm go first, the same share in every layer.

The squared norm weighs a filter's few large weights more than ``l1`` does; otherwise the two rank alike.
"""

from __future__ import annotations

import torch_pruning as tp

from pruneflow.methods import register_method
from pruneflow.methods.base import PruningMethod


@register_method
class L2(PruningMethod):
    name = "l2"
    description = "L2 norm of each filter, uniform ratio per layer"

    def importance(self) -> tp.importance.Importance:
        return tp.importance.MagnitudeImportance(p=2)
