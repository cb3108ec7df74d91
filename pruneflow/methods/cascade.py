"""``cascade``: remove whole blocks or branches (generalising Zhong 2022's super-resolution branch removal).

A model declares what may go with ``removable_blocks() -> list[str]`` (submodule names that can be replaced
by identity: a residual stage's shape-keeping blocks, a cascade's downsampled branches). Each declared block
is scored by the loss on the calibration batches when it alone is removed; the blocks whose removal costs
least go first, until ``target.ratio`` of the declared blocks are gone (rounded up) — or, when
``target.macs_reduction`` is set, until that share of MACs is. ``blocks: [...]`` removes exactly the named
ones instead, no data needed (the SR study's "drop one branch" / "drop both").

The loss is cross-entropy for integer labels (classifiers) and MSE for float targets (super-resolution).
Removal is ``remove_blocks``; ``PruneResult.removed_blocks`` lets checkpoints replay it on load.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pruneflow.methods import register_method
from pruneflow.methods.base import Batches, PruneResult, PruneTarget, PruningMethod, remove_blocks
from pruneflow.metrics import count_macs_params, layer_changes, layer_stats


class CascadeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    blocks: list[str] | None = Field(None, description="remove exactly these declared blocks (no scoring)")


def declared_blocks(model: nn.Module) -> list[str]:
    declare = getattr(model, "removable_blocks", None)
    if not callable(declare):
        raise ValueError(f"method cascade needs a model that declares removable_blocks(); "
                         f"{type(model).__name__} does not")
    return list(declare())


@torch.no_grad()
def loss_without(model: nn.Module, block: str, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss over ``batches`` of a copy of ``model`` with ``block`` replaced by identity."""
    trial = remove_blocks(copy.deepcopy(model), [block]).eval()
    total = count = 0
    for inputs, targets in batches:
        outputs = trial(inputs)
        loss = F.mse_loss(outputs, targets) if targets.is_floating_point() else F.cross_entropy(outputs, targets)
        total, count = total + loss.item() * len(inputs), count + len(inputs)
    return total / count


@register_method
class Cascade(PruningMethod):
    name = "cascade"
    accepts_layer_ratios = False
    description = "removes whole declared blocks/branches, cheapest validation-loss increase first (Zhong 2022)"
    Params = CascadeParams
    needs_calibration = True

    def choose(self, model: nn.Module, example_inputs: torch.Tensor, target: PruneTarget, declared: list[str],
               calib_batches: Batches | None) -> tuple[list[str], str]:
        """The blocks to remove (in removal order) and a note on how they were chosen."""
        if self.params.blocks is not None:
            unknown = sorted(set(self.params.blocks) - set(declared))
            if unknown:
                raise ValueError(f"method cascade: {', '.join(unknown)} not among the removable blocks "
                                 f"{', '.join(declared)} of {type(model).__name__}")
            return list(self.params.blocks), "blocks named in params"
        if calib_batches is None:
            raise ValueError("method cascade scores blocks on calibration batches; give some or name params.blocks")
        batches = list(calib_batches)
        losses = {block: loss_without(model, block, batches) for block in declared}
        order = sorted(declared, key=losses.__getitem__)
        note = "loss without each block: " + ", ".join(f"{block}={losses[block]:.4f}" for block in order)
        if target.macs_reduction is None:
            return order[:math.ceil(target.ratio * len(order) - 1e-9)], note
        base_macs, chosen = count_macs_params(model, example_inputs[:1])[0], []
        trial = copy.deepcopy(model)
        for block in order:
            if 1 - count_macs_params(trial, example_inputs[:1])[0] / base_macs >= target.macs_reduction:
                break
            remove_blocks(trial, [block])
            chosen.append(block)
        return chosen, note

    def prune(self, model: nn.Module, example_inputs: torch.Tensor, target: PruneTarget,
              calib_batches: Batches | None = None) -> PruneResult:
        declared = declared_blocks(model)
        chosen, note = self.choose(model, example_inputs, target, declared, calib_batches)
        before = layer_stats(model, example_inputs)
        remove_blocks(model, chosen)
        summary = f"removed {len(chosen)} of {len(declared)} blocks: {', '.join(chosen) or 'none'}; {note}"
        return PruneResult(model, [], layer_changes(before, layer_stats(model, example_inputs)), removed_blocks=chosen,
                           notes=summary)
