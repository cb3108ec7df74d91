"""``taylor``: first-order Taylor importance (Molchanov et al. 2019), uniform ratio per layer.

A channel's score is Σ|w·∂L/∂w| over its group's weights: the loss change a first-order expansion
predicts for removing it. Torch-Pruning's ``TaylorImportance`` reads the gradients from ``.grad``, so
``calibrate`` accumulates them there from the calibration batches (summed over batches; the per-layer
ranking does not depend on the scale). The model is in eval mode meanwhile, so BatchNorm's running
statistics stay as trained and the gradients are those of the network that will be pruned.
"""

from __future__ import annotations

import torch_pruning as tp
from torch import nn

from pruneflow.methods import register_method
from pruneflow.methods.base import Batches, PruningMethod
from pruneflow.task import task_of


@register_method
class Taylor(PruningMethod):
    name = "taylor"
    description = "first-order Taylor |w·∂L/∂w| on calibration batches, uniform ratio (Molchanov et al. 2019)"
    needs_calibration = True

    def importance(self) -> tp.importance.Importance:
        return tp.importance.TaylorImportance()

    def calibrate(self, model: nn.Module, batches: Batches) -> None:
        was_training = model.training
        model.eval()
        model.zero_grad(set_to_none=True)
        loss = task_of(batches).loss  # cross-entropy, or MSE for SR
        seen = 0
        try:
            for images, labels in batches:
                loss(model(images), labels).backward()
                seen += 1
        finally:
            model.train(was_training)
        if not seen:
            raise ValueError(f"method {self.name} got no calibration batches: it needs gradients of the loss")
