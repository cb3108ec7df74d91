"""Joint filter grafting (Meng et al. 2020), the retraining recipe of ``layer_entropy`` and ``info_richness``.

K copies of the pruned net train side by side at different learning rates; after every epoch each conv
of copy i becomes α·W_i + (1 − α)·W_next (the next copy in a ring), α leaning towards the copy whose
weights carry more information: α = (A/π)·arctan(c·(H(W_i) − H(W_next))) + 0.5. The BatchNorm that
follows the conv (γ, β, running mean and variance) takes the same α, so the pair stays consistent.

Copy i (i = 1..K) trains at lr·(1 + cos(π(K − i)/K))/2: the last copy at the full rate, the others lower.
[ours] Each copy's epoch is one call of ``pruneflow.training.train`` (one loop for the whole project),
so within an epoch the rate anneals from that epoch's peak to zero, and the peaks follow a cosine over
the epochs; momentum restarts every epoch. After the last graft the model passed in holds the result.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pruneflow import training
from pruneflow.config import TrainConfig
from pruneflow.methods.base import Batches
from pruneflow.methods.groups import following_norms

NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


class GraftingParams(BaseModel):
    """The grafting knobs, shared by the methods that retrain with it."""

    model_config = ConfigDict(extra="forbid")
    grafting: bool = Field(False, description="retrain by joint grafting instead of the standard loop")
    copies: int = Field(2, ge=2, description="K, the number of copies grafted in a ring")
    graft_a: float = Field(0.4, gt=0, le=1, description="A: how far α may lean from 0.5")
    graft_c: float = Field(500.0, gt=0, description="c: how sharply α follows the entropy difference")
    bins: int = Field(10, ge=2, description="histogram bins of the weight entropy")


def weight_entropy(weights: torch.Tensor, bins: int = 10) -> float:
    """H = −Σ p ln p over equal-width bins spanning [min, max] of the weights (0 for constant weights)."""
    values = weights.detach().flatten().float()
    low, high = values.min().item(), values.max().item()
    if low == high:
        return 0.0
    counts = torch.histc(values, bins=bins, min=low, max=high)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


@torch.no_grad()
def graft(nets: list[nn.Module], pairs: dict[str, str | None], a: float, c: float, bins: int) -> None:
    """One ring of grafts; every copy reads the others' weights as they were before this ring."""
    before = [{key: value.clone() for key, value in net.state_dict().items()} for net in nets]
    for index, net in enumerate(nets):
        mine, other = before[index], before[(index + 1) % len(nets)]
        state = net.state_dict()
        for conv, norm in pairs.items():
            gap = weight_entropy(mine[f"{conv}.weight"], bins) - weight_entropy(other[f"{conv}.weight"], bins)
            alpha = a / math.pi * math.atan(c * gap) + 0.5
            keys = [f"{conv}.weight", f"{conv}.bias"] + [f"{norm}.{t}" for t in NORM_TENSORS if norm]
            for key in keys:
                if key in mine:
                    state[key].copy_(alpha * mine[key] + (1 - alpha) * other[key])


def graft_retrain(model: nn.Module, train_batches: Batches, val_batches: Batches | None, cfg: TrainConfig,
                  params: GraftingParams, on_epoch_end: Callable[[training.EpochResult], None] | None = None,
                  ) -> list[training.EpochResult]:
    """Retrain ``model`` in place by joint grafting; one result per epoch, validated after the graft."""
    k = params.copies
    nets = [copy.deepcopy(model) for _ in range(k - 1)] + [model]
    peaks = [cfg.lr * (1 + math.cos(math.pi * (k - i) / k)) / 2 for i in range(1, k + 1)]
    pairs = following_norms(model, next(iter(train_batches))[0][:1])
    history = []
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        decay = (1 + math.cos(math.pi * (epoch - 1) / cfg.epochs)) / 2
        losses = [training.train(net, train_batches, cfg.model_copy(update={"epochs": 1, "lr": peak * decay}))[-1]
                  .train_loss for net, peak in zip(nets, peaks, strict=True)]
        graft(nets, pairs, params.graft_a, params.graft_c, params.bins)
        metric = training.evaluate(model, val_batches) if val_batches is not None else None
        result = training.EpochResult(epoch, sum(losses) / k, metric, time.perf_counter() - start)
        history.append(result)
        if on_epoch_end:
            on_epoch_end(result)
    return history
