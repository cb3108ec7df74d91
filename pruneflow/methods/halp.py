"""``halp``: channels and whole residual blocks allocated under a latency budget (HALP, Shen et al. NeurIPS 2022).

HALP ("Structural Pruning via Latency-Saliency Knapsack") prunes against *measured* latency instead of MACs: a
table gives every layer's latency on the target at each channel count, and the channels kept are those worth
most importance per unit of latency, a knapsack under the budget. Here the table is ``pruneflow.latency`` (ONNX
Runtime on this machine, cached), the importance is first-order Taylor on calibration batches (as in the paper,
grouped by Torch-Pruning's dependency groups and mean-normalised per group *[ours]*), and the knapsack is
``latency.allocate``: channel counts move only between the step edges of each group's latency curve, and with
``blocks: true`` (default) a residual block found by tracing may go whole when that costs less importance per
millisecond saved (issue #12's depth-for-width trade) *[ours]*. The paper solves the knapsack per pruning step
and prunes gradually during training; here it is solved once on the trained baseline, then fine-tuned.

The budget comes from the run's target, so there is no ratio to search (the search stage is skipped): a
``speedup`` target is a floor on the predicted speed-up over the baseline, ``latency_ms`` a ceiling at
``evaluate.latency_batch``, a ``macs_reduction`` target ``r`` the speed-up its MACs promise, ``1/(1 − r)``, and
``prune.ratio`` ``r`` the same (that share of the baseline's latency goes). The prune stage resolves the budget
into the plan's exact ``kept_channels`` and ``removed_blocks`` (``allocate``); ``prune`` then does the surgery.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pruneflow.methods import register_method
from pruneflow.methods.base import Batches, PruneResult, remove_blocks
from pruneflow.methods.blocks import removable_blocks
from pruneflow.methods.groups import channel_groups
from pruneflow.methods.taylor import Taylor
from pruneflow.plan import PrunePlan

if TYPE_CHECKING:
    from pruneflow.latency.allocate import Allocation
    from pruneflow.latency.measured import Measure
    from pruneflow.latency.target import LatencyPredictor


class HalpParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    blocks: bool = Field(True, description="let the knapsack remove whole residual blocks as well as channels")


@register_method
class Halp(Taylor):
    name = "halp"
    description = ("channels and residual blocks kept by Taylor importance per ms of measured latency, under the "
                   "run's latency budget (HALP, Shen et al. 2022)")
    Params = HalpParams
    params: HalpParams
    accepts_layer_ratios = False
    allocates_latency = True

    def allocate(self, model: nn.Module, example_inputs: torch.Tensor, plan: PrunePlan, predictor: LatencyPredictor,
                 calib_batches: Batches | None = None, measure: Measure | None = None) -> tuple[PrunePlan, Allocation]:
        """The plan with kept channels per group and the blocks to remove whose predicted latency meets the
        plan's budget (``BudgetError`` if no allocation does). ``model`` is the unpruned net ``predictor`` was
        built on; it keeps its weights (only gradients are added, for the importance). With ``measure`` (an
        allocated plan timed against the baseline) the budget is met as measured, not as predicted
        (``latency.measured``: up to four allocations, each asking the table for the speed-up corrected by the
        last one's measurement)."""
        from pruneflow.latency.allocate import importance_scores  # it imports the methods' package
        from pruneflow.latency.measured import measured_allocation

        if calib_batches is None:
            raise ValueError(f"method {self.name} scores channels by Taylor importance and needs calibration batches")
        self.calibrate(model, calib_batches)
        scores = importance_scores(model, example_inputs, self.importance(), predictor.graph)
        model.zero_grad(set_to_none=True)
        blocks = removable_blocks(model, example_inputs) if self.params.blocks else []

        def allocate(budget: PrunePlan) -> tuple[PrunePlan, Allocation]:
            return allocated_plan(model, example_inputs, budget, predictor, scores, blocks)

        if measure is None:
            return allocate(plan)
        kept, allocation, _ = measured_allocation(allocate, plan, predictor.baseline_ms, measure)
        return kept, allocation

    def prune(self, model: nn.Module, example_inputs: torch.Tensor, plan: PrunePlan,
              calib_batches: Batches | None = None) -> PruneResult:
        """The surgery of an allocated plan (``allocate``: its kept channels and removed blocks)."""
        if not (plan.kept_channels or plan.removed_blocks):
            raise ValueError(f"method {self.name} prunes a latency budget it allocated: the prune stage turns the "
                             "plan's latency_ms or speedup into kept channels first (Halp.allocate, on the latency "
                             "table); run it through the pipeline")
        return super().prune(model, example_inputs, plan, calib_batches)


def allocated_plan(model: nn.Module, example_inputs: torch.Tensor, plan: PrunePlan, predictor: LatencyPredictor,
                   scores: dict[int, torch.Tensor], blocks: list[str]) -> tuple[PrunePlan, Allocation]:
    """``plan`` with the kept channels (by each group's root convolution) and removed blocks of the knapsack on
    ``scores`` (per-channel values keyed by the latency graph's groups) under the plan's latency budget."""
    from pruneflow.latency.allocate import allocate  # it imports the methods' package

    budget = plan.budget_ms(predictor.baseline_ms)
    graph = predictor.graph
    allocation = allocate(predictor.table, graph, scores, budget, predictor.batch, blocks,
                          min_keep=1.0 - plan.max_layer_ratio)
    units = graph.unit_by_name
    kept = {}  # by the groups' roots once the blocks are gone (a root inside a removed block names no group)
    for group in channel_groups(remove_blocks(copy.deepcopy(model), allocation.removed_blocks), example_inputs):
        counts = {allocation.counts[graph.group_of[units[member.name].out]] for member in group.producers
                  if member.name in units and graph.group_of[units[member.name].out] in allocation.counts}
        if counts:
            kept[group.name] = min(counts)
    note = (f"HALP knapsack: predicted {allocation.predicted_ms:.3f} ms for a budget of {budget:.3f} ms "
            f"(baseline {predictor.baseline_ms:.3f} ms at batch {predictor.batch}), {len(allocation.log)} steps")
    if plan.origin.note:
        note = f"{plan.origin.note}; {note}"
    allocated = replace(plan, ratio=0.0, layer_ratios={}, kept_channels=kept,
                        removed_blocks=list(allocation.removed_blocks), round_to=None,
                        origin=replace(plan.origin, note=note))
    return allocated, allocation
