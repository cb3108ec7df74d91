"""A latency budget met by measurement: allocate on the table, time the pruned net, correct what is asked, again.

The table predicts a pruned net's speed-up only to within 10–30 % (docs/benchmarks/latency-model.md), and the
error has a sign per model: on an Intel Xeon the knapsack's ResNet-56 asked for 2× measured 1.88×, and its
MobileNetV2 asked for 2× measured 2.94× (pruned further than needed, so accuracy lost for nothing). NetAdapt
(Yang et al., ECCV 2018) checks each proposal by measuring it on the target; here each allocation is pruned,
exported and timed interleaved with the baseline (the caller's ``measure``), and the next round asks the table
for a corrected speed-up (``next_ask``), up to ``rounds`` allocations. The plan kept is the least pruned one
that measured at the goal (within 2 %, what two timings of one net differ by), else the fastest one measured.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn

from pruneflow.export import CPU, export_onnx, measure_latency
from pruneflow.latency.allocate import Allocation, BudgetError
from pruneflow.plan import PrunePlan
from pruneflow.task import Batches

if TYPE_CHECKING:
    from pruneflow.methods.base import PruningMethod

Allocate = Callable[[PrunePlan], tuple[PrunePlan, Allocation]]  # a budget plan → the knapsack's plan
Measure = Callable[[PrunePlan], tuple[float, float]]  # an allocated plan → (pruned ms, baseline ms), timed now


@dataclass
class Attempt:
    asked: float  # the speed-up asked of the table
    predicted: float  # the speed-up the table predicts for the allocation
    measured: float  # baseline ÷ pruned, timed interleaved
    plan: PrunePlan = field(repr=False)
    allocation: Allocation = field(repr=False)

    def describe(self) -> str:
        return f"asked {self.asked:.2f}x of the table, predicted {self.predicted:.2f}x, measured {self.measured:.2f}x"


def measured_allocation(allocate: Allocate, plan: PrunePlan, baseline_ms: float, measure: Measure,
                        rounds: int = 4, slack: float = 0.05, noise: float = 0.02
                        ) -> tuple[PrunePlan, Allocation, list[Attempt]]:
    """The allocation of ``plan``'s budget whose *measured* speed-up meets it, and every attempt.

    ``baseline_ms`` is the baseline's predicted latency (the table's scale), which turns the budget into a
    speed-up; the goal is the plan's ``speedup``, or for a ``latency_ms`` ceiling the baseline's measured time
    over it. A round measured at ``goal·(1 − noise)`` or more meets it (two timings of one net differ by about
    that much), and one within ``[goal·(1 − noise), goal·(1 + slack)]`` stops the loop; a corrected ask the
    table finds out of reach (``BudgetError``), one of no speed-up at all, or an allocation already measured stops
    it too. The first allocation's ``BudgetError`` is raised: the budget is out of reach on the table."""
    asked = baseline_ms / plan.budget_ms(baseline_ms)
    attempts: list[Attempt] = []
    current, goal = plan, 0.0
    for _ in range(rounds):
        try:
            allocated, allocation = allocate(current)
        except BudgetError:
            if not attempts:
                raise
            break
        if any(a.allocation.counts == allocation.counts and a.allocation.removed_blocks == allocation.removed_blocks
               for a in attempts):
            break
        pruned_ms, measured_baseline_ms = measure(allocated)
        goal = goal or goal_speedup(plan, measured_baseline_ms)
        attempts.append(Attempt(asked, baseline_ms / allocation.predicted_ms, measured_baseline_ms / pruned_ms,
                                allocated, allocation))
        if goal * (1 - noise) <= attempts[-1].measured <= goal * (1 + slack):
            break
        asked = next_ask(attempts, goal)
        if asked <= 1.0:  # the table would prune nothing: the first allocation already measured far above the goal
            break
        current = replace(plan, speedup=asked, latency_ms=None)
    met = [a for a in attempts if a.measured >= goal * (1 - noise)]
    best = min(met, key=lambda a: a.measured) if met else max(attempts, key=lambda a: a.measured)
    note = (f"measured {best.measured:.2f}x for a goal of {goal:.2f}x "
            f"({'; '.join(f'round {k + 1}: {a.describe()}' for k, a in enumerate(attempts))})")
    kept = replace(best.plan, speedup=plan.speedup, latency_ms=plan.latency_ms,
                   origin=replace(best.plan.origin, note="; ".join(filter(None, (best.plan.origin.note, note)))))
    return kept, best.allocation, attempts


def next_ask(attempts: list[Attempt], goal: float) -> float:
    """The speed-up to ask of the table next: between the nearest allocations measured below and above the goal,
    interpolated on their predicted speed-ups; else the last one's prediction scaled by the goal over its
    measurement (the table's error on that net). Whole blocks make measured speed-up jump between allocations,
    so a ratio alone overshoots once it has one to each side."""
    below = [a for a in attempts if a.measured < goal]
    above = [a for a in attempts if a.measured > goal]
    if below and above:
        low, high = max(below, key=lambda a: a.measured), min(above, key=lambda a: a.measured)
        return low.predicted + (goal - low.measured) * (high.predicted - low.predicted) / (high.measured - low.measured)
    last = attempts[-1]
    return last.predicted * goal / last.measured


def goal_speedup(plan: PrunePlan, measured_baseline_ms: float) -> float:
    """The speed-up a budget plan asks for as measured now: its ``speedup``, or the baseline's measured time over
    its ``latency_ms`` (the tighter of the two if both are set)."""
    goals = [g for g in (plan.speedup, None if plan.latency_ms is None else measured_baseline_ms / plan.latency_ms)
             if g is not None]
    return max(goals)


def timed_against(pruner: PruningMethod, model: nn.Module, example_inputs: torch.Tensor, baseline_onnx: Path,
                  calib: Batches | None, inputs: np.ndarray, warmup: int, repeats: int, threads: int,
                  provider: str = CPU, opset: int = 18,
                  statistic: Literal["median_ms", "p10_ms"] = "median_ms") -> Measure:
    """A ``Measure``: ``model`` pruned by the plan (a copy), exported, and timed on ``inputs`` interleaved with
    ``baseline_onnx`` in one ``measure_latency`` call; ``statistic`` is the time compared (the pipeline's evaluate
    reports medians, the benchmarks 10th percentiles)."""

    def measure(plan: PrunePlan) -> tuple[float, float]:
        pruned = copy.deepcopy(model)
        pruner.prune(pruned, example_inputs, plan, calib)
        with tempfile.TemporaryDirectory(prefix="pruneflow-measured-") as scratch:
            path = export_onnx(pruned.eval(), example_inputs, Path(scratch) / "pruned.onnx", opset)
            timing = measure_latency({"baseline": baseline_onnx, "pruned": path}, inputs, warmup, repeats, threads,
                                     provider)
        return getattr(timing["pruned"], statistic), getattr(timing["baseline"], statistic)

    return measure
