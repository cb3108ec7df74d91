"""``statistical``: statistics of parameters during training (Yang, Lan, Chen 2018).

A filter's magnitude at one moment is noisy; its average over the end of training says more. The
baseline stage runs ``recorder()`` after every epoch and saves what it kept; ``use_records()`` hands it
back at prune time.

[ours] s_k(t) = mean|W_k| of every conv/linear filter at the end of each of the last E (=10) epochs;
score_k = mean_t s_k(t), averaged over the filters that produce one channel of a group (groups.py).
Rules: ``ratio`` removes each layer's lowest scores at the uniform ratio; ``threshold`` removes filters
with score < μ_l − α·σ_l (per layer, α = 1), so ``plan.ratio`` is then ignored and α sets the amount.
Optional stability filter: filters whose std_t/mean_t is not below ``stability`` (e.g. 0.05) are still
moving and rank after every stable one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Literal

import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pruneflow.methods import register_method
from pruneflow.methods.base import Batches, PruneResult, PruningMethod, TrainingRecorder, exact_ratio, kept_channels
from pruneflow.methods.groups import ChannelGroup, Member, ScoreImportance, channel_groups
from pruneflow.metrics import PRUNABLE
from pruneflow.plan import PrunePlan


class StatisticalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(10, ge=1, description="E, the last epochs of baseline training whose statistics count")
    rule: Literal["ratio", "threshold"] = Field("ratio", description="lowest scores by ratio, or below μ − α·σ")
    alpha: float = Field(1.0, ge=0, description="α of the threshold rule")
    stability: float | None = Field(None, gt=0, description="filters with std/mean at or above this rank last")


class FilterStatistics(TrainingRecorder):
    """mean|W_k| of every conv/linear filter after each of the last ``epochs`` epochs."""

    def __init__(self, epochs: int) -> None:
        self.window: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=epochs)

    @torch.no_grad()
    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        self.window.append((epoch, {name: m.weight.detach().abs().flatten(1).mean(1).cpu()
                                    for name, m in model.named_modules() if isinstance(m, PRUNABLE)}))

    def state(self) -> dict:
        names = self.window[0][1] if self.window else {}
        return {"epochs": [epoch for epoch, _ in self.window],
                "filters": {name: torch.stack([snapshot[name] for _, snapshot in self.window]) for name in names}}


def variation(series: torch.Tensor) -> torch.Tensor:
    """std_t / mean_t per filter of an [epochs, filters] series."""
    return series.std(0, unbiased=False) / series.mean(0).clamp_min(1e-12)


@register_method
class Statistical(PruningMethod):
    name = "statistical"
    description = "mean |W| per filter averaged over the last baseline epochs, lowest first (Yang et al. 2018)"
    Params = StatisticalParams
    params: StatisticalParams

    def __init__(self, params: BaseModel | dict | None = None) -> None:
        super().__init__(params)
        self.filters: dict[str, torch.Tensor] = {}  # layer name -> [epochs, filters], from use_records()
        self.scorer = ScoreImportance()

    def recorder(self) -> FilterStatistics:
        return FilterStatistics(self.params.epochs)

    def use_records(self, records: dict) -> None:
        self.filters = dict(records["filters"])

    def importance(self) -> tp.importance.Importance:
        return self.scorer

    def history(self, member: Member) -> torch.Tensor:
        """The recorded [epochs, filters] statistics of one layer, checked against the layer."""
        if member.name not in self.filters:
            raise ValueError(f"method {self.name}: no statistics recorded for layer {member.name}")
        recorded = self.filters[member.name]
        if recorded.shape[1] != member.module.weight.shape[0]:
            raise ValueError(f"method {self.name}: {member.name} has {member.module.weight.shape[0]} filters but "
                             f"{recorded.shape[1]} were recorded (statistics of another model?)")
        return recorded

    def scores(self, group: ChannelGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel: the mean statistic, and whether it is stable (all True without the stability filter)."""
        score = group.per_channel(lambda member: self.history(member).mean(0))
        if self.params.stability is None:
            return score, torch.ones_like(score, dtype=torch.bool)
        return score, group.per_channel(lambda member: variation(self.history(member))) < self.params.stability

    def prune(self, model: nn.Module, example_inputs: torch.Tensor, plan: PrunePlan,
              calib_batches: Batches | None = None) -> PruneResult:
        if not self.filters:
            raise ValueError(f"method {self.name} scores filters by their training history: pass the baseline's "
                             "records to use_records() first (the baseline stage records them)")
        self.scorer.scores, ratios = {}, {}
        for group in channel_groups(model, example_inputs):
            score, stable = self.scores(group)
            self.scorer.scores[group.module] = score + (~stable) * score.max()  # unstable filters rank last
            if self.params.rule == "threshold":
                below = (score < score.mean() - self.params.alpha * score.std(unbiased=False)) & stable
                share = min(below.float().mean().item(), plan.max_layer_ratio)
                ratios[group.name] = exact_ratio(group.channels, kept_channels(group.channels, share, plan.round_to))
        return super().prune(model, example_inputs, replace(plan, layer_ratios={**plan.layer_ratios, **ratios}),
                             calib_batches)
