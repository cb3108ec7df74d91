"""``lamp``: layer-adaptive magnitude pruning (Lee et al. 2021), one global ranking across layers.

LAMP rescales each group's squared norms by the mass of the channels at least as large, which makes the
scores of different layers comparable; that is what lets one global threshold pick per-layer ratios
(Torch-Pruning's ``LAMPImportance`` with global pruning, as the class is meant to be used).
"""

from __future__ import annotations

import torch_pruning as tp

from pruneflow.methods import register_method
from pruneflow.methods.base import PruningMethod


@register_method
class LAMP(PruningMethod):
    name = "lamp"
    description = "LAMP-normalised magnitude, one global ranking across layers (Lee et al. 2021)"
    global_pruning = True

    def importance(self) -> tp.importance.Importance:
        return tp.importance.LAMPImportance()
