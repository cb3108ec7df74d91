"""``channel_sparsity``: regularised channel sparsity — channels that rarely fire and have small filters go first.

[ours] S_c is channel c's APoZ, the share of zeros in its post-ReLU output over N calibration batches,
measured exactly as ``apoz`` does (and, as there, a group with no ReLU after it — a residual sum — has no
APoZ and keeps its channels). With W_c the filter producing channel c (the group's root conv),
F_c = S_c + μ·(1 − ‖W_c‖₂ / max_layer ‖W‖₂); every layer loses its highest-F_c channels at the uniform ratio.
Fine-tuning (the retrain stage) adds λ·Σ‖W‖₂² over the conv/linear weights to the loss.
"""

from __future__ import annotations

import itertools

import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pruneflow import training
from pruneflow.methods import register_method
from pruneflow.methods.apoz import APoZImportance, record_apoz
from pruneflow.methods.base import Batches, PruningMethod
from pruneflow.metrics import PRUNABLE


class ChannelSparsityParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batches: int = Field(10, ge=1, description="N, calibration batches APoZ is measured on (at most what is given)")
    mu: float = Field(0.5, ge=0, description="μ, weight of the filter-norm term in F_c")
    weight_penalty: float = Field(1e-4, ge=0, description="λ of the Σ‖W‖₂² term added while fine-tuning")


class ChannelFunctionImportance(tp.importance.Importance):
    """−F_c, so the pruner (which removes the lowest importance) removes the highest F_c."""

    def __init__(self, mu: float) -> None:
        self.mu = mu
        self.activity = APoZImportance()  # 1 − S_c per channel, once calibrate() has filled it

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        firing = self.activity(group)
        if firing is None:
            return None
        norms = group[0].dep.target.module.weight.detach()[list(group[0].idxs)].flatten(1).norm(dim=1)
        function = (1 - firing) + self.mu * (1 - norms / norms.max().clamp_min(1e-12))
        return -function


@register_method
class ChannelSparsity(PruningMethod):
    name = "channel_sparsity"
    description = "APoZ + μ·(1 − relative filter L2) per channel, uniform ratio; L2-penalised fine-tune"
    Params = ChannelSparsityParams
    params: ChannelSparsityParams
    needs_calibration = True

    def __init__(self, params: BaseModel | dict | None = None) -> None:
        super().__init__(params)
        self.scorer = ChannelFunctionImportance(self.params.mu)

    def importance(self) -> tp.importance.Importance:
        return self.scorer

    def calibrate(self, model: nn.Module, batches: Batches) -> None:
        self.scorer.activity.apoz = record_apoz(model, itertools.islice(batches, self.params.batches))
        if not self.scorer.activity.apoz:
            raise ValueError(f"method {self.name} got no calibration batches: APoZ is measured on data")

    def retrain(self, model: nn.Module, train_batches: Batches, val_batches: Batches, cfg, on_epoch_end=None):
        strength = self.params.weight_penalty

        def weight_l2(net: nn.Module) -> torch.Tensor:
            squares = (m.weight.pow(2).sum() for m in net.modules() if isinstance(m, PRUNABLE))
            return strength * sum(squares, torch.zeros(()))

        return training.train(model, train_batches, cfg, val_batches=val_batches, regularizers=[weight_l2],
                              on_epoch_end=on_epoch_end)
