"""``magnitude_unstructured``: global magnitude weight pruning (Han et al. 2015), a mask, not surgery.

The smallest |w| across all conv/linear weights (except the stem conv and the output layer, as for every
method) are set to zero under one global threshold, with ``torch.nn.utils.prune``, and the mask is made
permanent. Every channel stays, so the dense MACs and the speed on dense runtimes do not change: the
result says so, and the search reads this method's target as weight sparsity (``structured = False``).

The zeros are the mask: retraining re-applies it from them, or SGD would grow the pruned weights back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import prune

from pruneflow.methods import register_method
from pruneflow.methods.base import Batches, PruneResult, PruningMethod, ignored_layers
from pruneflow.metrics import PRUNABLE, layer_changes, layer_stats, zero_weight_share
from pruneflow.plan import PrunePlan
from pruneflow.training import train


def masked_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The (module, "weight") pairs the mask covers: every conv/linear but the ignored layers."""
    kept_dense = set(ignored_layers(model))
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE) and m not in kept_dense]


@register_method
class MagnitudeUnstructured(PruningMethod):
    name = "magnitude_unstructured"
    accepts_layer_ratios = False
    description = "global |w| weight masking (Han et al. 2015); zeros weights, no dense speed-up"
    structured = False

    def prune(self, model: nn.Module, example_inputs: torch.Tensor, plan: PrunePlan,
              calib_batches: Batches | None = None) -> PruneResult:
        if plan.layer_ratios or plan.macs_reduction is not None:
            raise ValueError(f"method {self.name} ranks all weights under one threshold: it takes only plan.ratio")
        before = layer_stats(model, example_inputs)
        weights = masked_weights(model)
        prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=plan.ratio)
        for module, name in weights:
            prune.remove(module, name)
        notes = (f"Unstructured: {zero_weight_share(model):.1%} of conv/linear weights are zero, but every channel is "
                 "kept, so dense MACs are unchanged and there is no speed-up on dense runtimes.")
        return PruneResult(model, [], layer_changes(before, layer_stats(model, example_inputs)), plan, notes)

    def retrain(self, model: nn.Module, train_batches: Batches, val_batches: Batches, cfg,
                on_epoch_end: Callable | None = None) -> list:
        """The standard loop with the zeros held at zero (``prune.custom_from_mask``), removed again after."""
        weights = masked_weights(model)
        for module, name in weights:
            prune.custom_from_mask(module, name, getattr(module, name) != 0)
        try:
            return train(model, train_batches, cfg, val_batches=val_batches, on_epoch_end=on_epoch_end)
        finally:
            for module, name in weights:
                prune.remove(module, name)
