"""``slimming``: network slimming (Liu et al. 2017).

Training adds λ·Σ|γ| over every BatchNorm scale so unimportant channels' γ shrink toward zero; the
channels with the smallest |γ| are then removed under one global threshold across layers.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pruneflow.methods import register_method
from pruneflow.methods.base import MethodUnsuitable, PruneResult, PruningMethod
from pruneflow.plan import PrunePlan
from pruneflow.task import Batches
from pruneflow.training import Regularizer


class SlimmingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sparsity: float = Field(1e-4, ge=0, description="λ of the L1 penalty on BN γ during baseline training")


@register_method
class Slimming(PruningMethod):
    name = "slimming"
    description = "BN scale |γ| after L1 sparsity training, one global threshold (Liu et al. 2017)"
    Params = SlimmingParams
    global_pruning = True

    def regularizer(self) -> Regularizer:
        strength = self.params.sparsity

        def bn_l1(model: nn.Module) -> torch.Tensor:
            gammas = [m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
            return strength * torch.stack(gammas).sum() if gammas else torch.zeros(())

        return bn_l1

    def importance(self) -> tp.importance.Importance:
        # Raw |γ| (no per-layer normalisation): slimming's one threshold compares channels across layers.
        return tp.importance.BNScaleImportance(normalizer=None)

    def prune(self, model: nn.Module, example_inputs: torch.Tensor, plan: PrunePlan,
              calib_batches: Batches | None = None) -> PruneResult:
        """Refuse a model whose γ cannot rank channels: with none, or all equal (as BatchNorm initialises them, in a
        model trained without the sparsity term), every channel would tie and the threshold remove nothing."""
        gammas = [m.weight.detach().abs().flatten() for m in model.modules()
                  if isinstance(m, nn.BatchNorm2d) and m.affine]
        if not gammas:
            raise MethodUnsuitable(f"method slimming ranks channels by their BatchNorm scale γ, and "
                                   f"{type(model).__name__} has no BatchNorm layer: choose another method")
        values = torch.cat(gammas)
        if bool((values == values[0]).all()):
            raise MethodUnsuitable(f"method slimming ranks channels by their BatchNorm scale |γ|, and every γ of "
                                   f"this model is {values[0].item():g}: it was not trained with slimming's sparsity "
                                   "term; prune a baseline trained with methods.slimming in params (pruneflow run "
                                   "trains it so)")
        return super().prune(model, example_inputs, plan, calib_batches)
