"""``cascade``: remove whole blocks or branches (generalising Zhong 2022's super-resolution branch removal).

What may go are the model's residual blocks, found by tracing (``blocks.find_residual_blocks``: submodules
computing ``x + f(x)`` with matching shapes, e.g. in torchvision's ResNet, RegNet, MobileNet, EfficientNet), or
what the model declares with ``removable_blocks() -> list[str]`` (a multi-branch model's extra branches) and,
where replacing a unit by identity is not what removing it means, how to remove one (``remove_block(name)``:
a cascade drops the branch from its average); see ``remove_blocks``. Each removable block is scored by the
loss on the calibration batches when it alone is removed; the blocks whose removal costs least go first, until
``plan.ratio`` of the removable blocks are gone (rounded up) — or, when ``plan.macs_reduction`` is set, until
that share of MACs is. Two params fix the result instead, so the pipeline skips the ratio search: ``drop: n``
removes the n cheapest blocks (the SR study's "drop one branch" / "drop both"), ``blocks: [...]`` exactly the named ones
(no data needed).

The loss is the task's (``pruneflow.task``): cross-entropy for class labels, MSE for super-resolution images.
``PruneResult.removed_blocks`` lets checkpoints replay the removal on load.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from pruneflow.methods import register_method
from pruneflow.methods.base import Batches, MethodUnsuitable, PruneResult, PruningMethod, remove_blocks
from pruneflow.methods.blocks import removable_blocks
from pruneflow.metrics import count_macs_params, layer_changes, layer_stats
from pruneflow.plan import PrunePlan
from pruneflow.task import Task, task_of


class CascadeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    blocks: list[str] | None = Field(None, description="remove exactly these blocks (no scoring)")
    drop: int | None = Field(None, ge=1, description="remove this many removable blocks, the cheapest first "
                                                     "(the ratio is then ignored)")

    @model_validator(mode="after")
    def _one_rule(self) -> CascadeParams:
        if self.blocks is not None and self.drop is not None:
            raise ValueError("give blocks or drop, not both")
        return self


def blocks_of(model: nn.Module, example_inputs: torch.Tensor) -> list[str]:
    blocks = removable_blocks(model, example_inputs)
    if not blocks:
        raise MethodUnsuitable(f"method cascade: {type(model).__name__} has no removable blocks (no submodule "
                               "computes x + f(x) with its input's shape, and the model declares no "
                               "removable_blocks())")
    return blocks


@torch.no_grad()
def loss_without(model: nn.Module, block: str, batches: list[tuple[torch.Tensor, torch.Tensor]], task: Task) -> float:
    """Mean loss over ``batches`` of a copy of ``model`` with ``block`` removed."""
    trial = remove_blocks(copy.deepcopy(model), [block]).eval()
    total, count = 0.0, 0
    for inputs, targets in batches:
        loss = task.loss(trial(inputs), targets)
        total, count = total + loss.item() * len(inputs), count + len(inputs)
    return total / count


@register_method
class Cascade(PruningMethod):
    name = "cascade"
    accepts_layer_ratios = False
    description = "removes whole residual blocks/branches, cheapest validation-loss increase first (Zhong 2022)"
    Params = CascadeParams
    params: CascadeParams
    needs_calibration = True

    def fixed_by_params(self) -> bool:
        return self.params.blocks is not None or self.params.drop is not None

    def choose(self, model: nn.Module, example_inputs: torch.Tensor, plan: PrunePlan, removable: list[str],
               calib_batches: Batches | None) -> tuple[list[str], str]:
        """The blocks to remove (in removal order) and a note on how they were chosen."""
        if self.params.blocks is not None:
            unknown = sorted(set(self.params.blocks) - set(removable))
            if unknown:
                raise ValueError(f"method cascade: {', '.join(unknown)} not among the removable blocks "
                                 f"{', '.join(removable)} of {type(model).__name__}")
            return list(self.params.blocks), "blocks named in params"
        if calib_batches is None:
            raise ValueError("method cascade scores blocks on calibration batches; give some or name params.blocks")
        if self.params.drop is not None and self.params.drop > len(removable):
            raise ValueError(f"method cascade: drop={self.params.drop}, but {type(model).__name__} has only "
                             f"{len(removable)} removable blocks ({', '.join(removable)})")
        task, batches = task_of(calib_batches), list(calib_batches)
        losses = {block: loss_without(model, block, batches, task) for block in removable}
        order = sorted(removable, key=losses.__getitem__)
        note = "loss without each block: " + ", ".join(f"{block}={losses[block]:.4f}" for block in order)
        if self.params.drop is not None:
            return order[:self.params.drop], note
        if plan.macs_reduction is None:
            return order[:math.ceil(plan.ratio * len(order) - 1e-9)], note
        base_macs, chosen = count_macs_params(model, example_inputs[:1])[0], []
        trial = copy.deepcopy(model)
        for block in order:
            if 1 - count_macs_params(trial, example_inputs[:1])[0] / base_macs >= plan.macs_reduction:
                break
            remove_blocks(trial, [block])
            chosen.append(block)
        return chosen, note

    def prune(self, model: nn.Module, example_inputs: torch.Tensor, plan: PrunePlan,
              calib_batches: Batches | None = None) -> PruneResult:
        removable = blocks_of(model, example_inputs)
        chosen, note = self.choose(model, example_inputs, plan, removable, calib_batches)
        before = layer_stats(model, example_inputs)
        remove_blocks(model, chosen)
        summary = f"removed {len(chosen)} of {len(removable)} blocks: {', '.join(chosen) or 'none'}; {note}"
        return PruneResult(model, [], layer_changes(before, layer_stats(model, example_inputs)),
                           replace(plan, removed_blocks=chosen), summary)
