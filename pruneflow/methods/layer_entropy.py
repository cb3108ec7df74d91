"""``layer_entropy``: adaptive layer entropy (Wei 2023, ALE) — layers whose weights carry less information lose more.

[public] A layer's entropy H_l is the entropy of its weights over 10 equal-width bins spanning [min, max]
(weights only, no data). [ours] A "layer" is a Torch-Pruning channel group (groups.py): one conv in a plain
chain; for a residual stage, whose shortcut and last convs share their channels, H_l is the mean of those
convs' entropies (one histogram over all of them would mix differently scaled layers).

[ours] Layer l loses λ_l = λ_min·H_max/H_l of its channels, clipped to ``plan.max_layer_ratio`` and keeping
at least one filter (and a multiple of ``round_to``); λ_min is bisected so the removed share of the groups'
channels — or of the model's MACs, counted as the search counts them, when ``plan.macs_reduction`` is set —
lands as close to the target as whole channels allow. Within a layer the filters with the largest L1 norm
stay. The per-layer counts reach Torch-Pruning as exact ``layer_ratios``, so what the bisection computed is
what gets removed.

[public] ``grafting: true`` retrains by joint grafting (grafting.py) instead of the standard loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch_pruning as tp
from pydantic import BaseModel
from torch import nn

from pruneflow.bisection import bisect
from pruneflow.methods import register_method
from pruneflow.methods.base import Batches, PruneResult, PruningMethod, exact_ratio, kept_channels
from pruneflow.methods.grafting import GraftingParams, graft_retrain, weight_entropy
from pruneflow.methods.groups import ChannelGroup, Member, ScoreImportance, channel_groups
from pruneflow.metrics import layer_macs
from pruneflow.plan import PrunePlan

BISECTION_STEPS = 50


def filter_l1(member: Member) -> torch.Tensor:
    """‖W_j‖₁ of each output filter: the within-layer ranking (the largest stay)."""
    return member.module.weight.detach().abs().flatten(1).sum(1)


def share_removed(groups: list[ChannelGroup], macs: dict[str, int] | None) -> Callable[[list[int]], float]:
    """What an allocation (kept channels per group) removes: a share of the groups' channels, or, given every leaf
    module's MACs as ``metrics.layer_macs`` counts them, a share of the model's MACs as the search measures it.
    A conv/linear layer's MACs scale with its kept output and input channels (a depthwise conv's only with its
    output), a normalisation layer's with its channels; activations and pooling are counted as they are.
    """
    if macs is None:
        total_channels = sum(group.channels for group in groups)
        return lambda kept: 1 - sum(kept) / total_channels
    total_macs = sum(macs.values())

    def macs_removed(kept: list[int]) -> float:
        factor = dict.fromkeys(macs, 1.0)
        for group, count in zip(groups, kept, strict=True):
            for member in group.producers + group.consumers + group.norms:
                if member.name in factor:
                    factor[member.name] *= count / group.channels
        return 1 - sum(macs[name] * f for name, f in factor.items()) / total_macs

    return macs_removed


def allocate(groups: list[ChannelGroup], richness: list[float], plan: PrunePlan,
             removed: Callable[[list[int]], float]) -> tuple[list[int], float]:
    """Kept channels per group for λ_l = λ_min·max(richness)/richness_l, and the λ_min bisected to the target.

    ``removed`` only grows with λ_min, so bisection brackets the goal; of the bracket's two ends the one
    closer to it wins (channel counts are integers, so the goal itself is rarely reachable exactly).
    """
    if not groups:
        return [], 0.0
    top, cap = max(richness), plan.max_layer_ratio
    goal = plan.macs_reduction if plan.macs_reduction is not None else plan.ratio

    def kept_at(lambda_min: float) -> list[int]:
        return [kept_channels(group.channels, min(lambda_min * top / max(value, 1e-12), cap), plan.round_to)
                for group, value in zip(groups, richness, strict=True)]

    # at λ_min = cap every layer is clipped to the cap
    ends = bisect(lambda lambda_min: -1 if removed(kept_at(lambda_min)) < goal else 1, 0.0, cap, BISECTION_STEPS)
    best = min(ends, key=lambda lambda_min: abs(removed(kept_at(lambda_min)) - goal))
    return kept_at(best), best


@register_method
class LayerEntropy(PruningMethod):
    name = "layer_entropy"
    accepts_layer_ratios = False
    description = "per-layer ratios from weight entropy bisected to the target, L1 filters within (Wei 2023, ALE)"
    Params = GraftingParams
    params: GraftingParams

    def __init__(self, params: BaseModel | dict | None = None) -> None:
        super().__init__(params)
        self.scorer = ScoreImportance()  # given to the pruner, filled by prune() before it ranks

    def richness(self, groups: list[ChannelGroup]) -> list[float]:
        """How much information each layer holds; the richer, the fewer channels it loses."""
        return [sum(weight_entropy(p.module.weight, self.params.bins) for p in group.producers) / len(group.producers)
                for group in groups]

    def importance(self) -> tp.importance.Importance:
        return self.scorer

    def prune(self, model: nn.Module, example_inputs: torch.Tensor, plan: PrunePlan,
              calib_batches: Batches | None = None) -> PruneResult:
        if plan.layer_ratios:
            raise ValueError(f"method {self.name} allocates per-layer ratios itself; plan.layer_ratios must be empty")
        groups = channel_groups(model, example_inputs)
        macs = layer_macs(model, example_inputs) if plan.macs_reduction is not None else None
        kept, lambda_min = allocate(groups, self.richness(groups), plan, share_removed(groups, macs))
        self.scorer.scores = {group.module: group.per_channel(filter_l1) for group in groups}
        ratios = {group.name: exact_ratio(group.channels, count) for group, count in zip(groups, kept, strict=True)}
        result = super().prune(model, example_inputs, replace(plan, layer_ratios=ratios), calib_batches)
        result.notes = f"λ_min={lambda_min:.4f}; layer ratios: " + ", ".join(
            f"{group.name}={1 - count / group.channels:.3f}" for group, count in zip(groups, kept, strict=True))
        return result

    def retrain(self, model: nn.Module, train_batches: Batches, val_batches: Batches, cfg, on_epoch_end=None):
        if not self.params.grafting:
            return None
        return graft_retrain(model, train_batches, val_batches, cfg, self.params, on_epoch_end)
