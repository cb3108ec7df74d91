"""``info_richness``: abnormal information richness (Wei 2023) — entropy and weight magnitude, outliers tamed.

[ours] Per layer (a channel group, as in ``layer_entropy``) two indicators: the weight entropy H_l and
L̄1_l = mean_j ‖W_{l,j}‖₁ / (c_in·k²), the mean absolute weight of its filters. Across layers each is
clipped to Tukey's fences [Q1 − 1.5·IQR, Q3 + 1.5·IQR] (one abnormal layer must not squash the rest into
a corner), min-max normalised, and fused: I_l = β·Ĥ_l + (1 − β)·L̂1_l. I'_l = 0.1 + 0.9·I_l then replaces
H_l in ``layer_entropy``'s allocation (λ_l = λ_min·I'_max/I'_l, bisected to the target), so the poorest
layer loses up to ten times the share of the richest. ``grafting: true`` retrains by joint grafting.
"""

from __future__ import annotations

import torch
from pydantic import Field

from pruneflow.methods import register_method
from pruneflow.methods.grafting import GraftingParams
from pruneflow.methods.groups import ChannelGroup
from pruneflow.methods.layer_entropy import LayerEntropy


class InfoRichnessParams(GraftingParams):
    beta: float = Field(0.5, ge=0, le=1, description="weight of the entropy against the mean |W| in I_l")
    fence: float = Field(1.5, ge=0, description="Tukey fence, in IQRs beyond the quartiles")
    floor: float = Field(0.1, gt=0, lt=1, description="I' = floor + (1 − floor)·I keeps every layer's richness > 0")


def fenced_minmax(values: torch.Tensor, fence: float) -> torch.Tensor:
    """Clip to Tukey's fences, then scale to [0, 1] (all zeros when the layers do not differ)."""
    q1, q3 = torch.quantile(values, 0.25), torch.quantile(values, 0.75)
    clipped = values.clamp(q1 - fence * (q3 - q1), q3 + fence * (q3 - q1))
    span = clipped.max() - clipped.min()
    return (clipped - clipped.min()) / span if span > 0 else torch.zeros_like(clipped)


@register_method
class InfoRichness(LayerEntropy):
    name = "info_richness"
    description = "entropy + mean |W| per layer, Tukey-clipped and fused, in ALE's allocation (Wei 2023)"
    Params = InfoRichnessParams
    params: InfoRichnessParams

    def richness(self, groups: list[ChannelGroup]) -> list[float]:
        if not groups:
            return []
        entropy = torch.tensor(super().richness(groups), dtype=torch.float64)
        magnitude = torch.tensor([torch.cat([p.module.weight.detach().abs().flatten(1).mean(1) for p in g.producers])
                                  .mean().item() for g in groups], dtype=torch.float64)
        beta, fence, floor = self.params.beta, self.params.fence, self.params.floor
        fused = beta * fenced_minmax(entropy, fence) + (1 - beta) * fenced_minmax(magnitude, fence)
        return (floor + (1 - floor) * fused).tolist()
