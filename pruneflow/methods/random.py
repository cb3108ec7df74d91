"""``random``: channels chosen at random — the sanity baseline every real criterion must beat."""

from __future__ import annotations

import torch_pruning as tp

from pruneflow.methods import register_method
from pruneflow.methods.base import PruningMethod


@register_method
class Random(PruningMethod):
    name = "random"
    description = "random channels, uniform ratio; a sanity baseline that should lose"

    def importance(self) -> tp.importance.Importance:
        return tp.importance.RandomImportance()
