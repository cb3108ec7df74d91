"""``fpgm``: filter pruning via geometric median (He et al. 2019), uniform ratio per layer.

A filter close to all the others in its layer is what they can replace, so the filters with the smallest
summed distance to the rest go first — even when their norm is large. This is Torch-Pruning's
``FPGMImportance``, which measures the distances between the filters' element-wise |w|², not w itself.
"""

from __future__ import annotations

import torch_pruning as tp

from pruneflow.methods import register_method
from pruneflow.methods.base import PruningMethod


@register_method
class FPGM(PruningMethod):
    name = "fpgm"
    description = "distance to the layer's geometric median: redundant filters go first (He et al. 2019)"

    def importance(self) -> tp.importance.Importance:
        return tp.importance.FPGMImportance()
