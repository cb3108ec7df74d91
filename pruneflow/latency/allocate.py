"""Channels (and whole residual blocks) allocated under a latency budget: HALP's knapsack on the measured table.

HALP (Shen et al., "Structural Pruning via Latency-Saliency Knapsack", NeurIPS 2022) keeps, for every layer,
the channels worth most importance per unit of latency, where a layer's latency at each channel count comes
from a table measured on the target: pruning then follows the target's staircase instead of MACs. Here:

* a channel group's options are its step edges (``steps.GroupCurve.edges``), so no option costs the same as
  a larger one; its value at ``k`` channels is the sum of its ``k`` highest importance scores (Torch-Pruning's
  importances are normalised per group, so scores of different groups compare);
* a removable residual block's option is to go whole, worth what its inner channels are worth now;
* starting from the whole model, the option losing least value per millisecond saved (each re-predicted on
  the full model, so the interplay of neighbouring groups and layout conversions counts) is taken until the
  prediction meets the budget, then the best additions that still fit are put back.

This greedy solves the knapsack's fractional relaxation exactly and is within one option of the optimum; the
paper solves the integer problem per pruning step with a dynamic program over a discretised budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pruneflow.latency.graph import ModelGraph
from pruneflow.latency.steps import group_curves, group_name
from pruneflow.latency.table import LatencyTable, Variant
from pruneflow.methods.base import ignored_layers
from pruneflow.methods.groups import build_graph
from pruneflow.metrics import PRUNABLE


class BudgetError(ValueError):
    """No allocation reaches the latency budget."""


def importance_scores(model: nn.Module, example_inputs: torch.Tensor, importance, graph: ModelGraph
                      ) -> dict[int, torch.Tensor]:
    """Per-channel scores of each group a Torch-Pruning pruner would rank (stem and classifier left alone),
    keyed by the group of ``graph`` that the group's root convolution writes."""
    dependency = build_graph(model, example_inputs)
    ignored = [sub for layer in ignored_layers(model) for sub in layer.modules()]
    names = {module: name for name, module in model.named_modules()}
    units = graph.unit_by_name
    scores = {}
    for group in dependency.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE):
        root = names.get(group[0].dep.target.module)
        if root not in units:
            continue  # a linear layer's group: the table times convolutions only
        with torch.no_grad():
            value = importance(group)
        if value is not None:
            scores[graph.group_of[units[root].out]] = value.detach().float().cpu()
    return scores


@dataclass
class Allocation:
    counts: dict[int, int]  # kept channels per group of the latency graph
    removed_blocks: list[str]
    predicted_ms: float
    budget_ms: float
    names: dict[int, str] = field(repr=False)
    log: list[str] = field(default_factory=list, repr=False)

    def kept(self) -> dict[str, int]:
        """Kept channels per group, by the name of a convolution writing it."""
        return {self.names[group]: count for group, count in self.counts.items()}


@dataclass
class _GroupStep:
    """Move a channel group to another step edge of its curve."""

    group: int
    count: int
    value: float  # importance lost (a cut) or gained (a raise)


@dataclass
class _BlockRemoval:
    block: str
    value: float  # importance lost


_Option = _GroupStep | _BlockRemoval


def block_units(graph: ModelGraph, blocks: list[str]) -> dict[str, frozenset[str]]:
    """The units inside each block (convolutions named under it)."""
    return {block: frozenset(u.name for u in graph.units if u.name.startswith(block + ".")) for block in blocks}


def allocate(table: LatencyTable, graph: ModelGraph, scores: dict[int, torch.Tensor], budget_ms: float,
             batch: int = 1, blocks: Sequence[str] = (), min_keep: float = 0.1, tolerance: float = 0.01,
             log: Callable[[str], None] | None = None) -> Allocation:
    """Kept channels per scored group, and blocks to remove, whose predicted latency meets ``budget_ms``.

    A group keeps at least ``int(min_keep · channels)`` channels, at a step edge: Torch-Pruning, capped at
    ``max_pruning_ratio = 1 − min_keep`` (``prune.max_layer_ratio``), would raise a smaller count to that one."""
    groups = sorted(scores)
    values = {g: torch.sort(scores[g], descending=True).values.cumsum(0) for g in groups}

    def value(group: int, count: int) -> float:
        return float(values[group][count - 1]) if count > 0 else 0.0

    curves = {curve.group: curve for curve in group_curves(table, graph, groups, batch)}
    edges = {}
    for g in groups:
        found = curves[g].edges(tolerance)
        least = int(min_keep * graph.sizes[g] + 1e-9)  # what Torch-Pruning's max_pruning_ratio leaves a group
        edges[g] = [e for e in found if e >= least]  # fewer would be raised to ``least``: off its edge
    inner = block_units(graph, list(blocks))
    inside = {block: [g for g in groups if _group_units(graph, g) <= units] for block, units in inner.items()}
    table.ensure_grid(graph, edges, batch)

    counts = {g: graph.sizes[g] for g in groups}
    removed: list[str] = []
    steps: list[str] = []

    def variant(option: _Option | None = None) -> Variant:
        trial, gone = dict(counts), set().union(*(inner[b] for b in removed)) if removed else set()
        if isinstance(option, _GroupStep):
            trial[option.group] = option.count
        elif isinstance(option, _BlockRemoval):
            gone |= inner[option.block]
        return Variant(trial, frozenset(gone))

    def frozen(group: int) -> bool:
        return any(group in inside[b] for b in removed)

    def predict(options: Sequence[_Option | None]) -> list[float]:
        return [p.ms for p in table.predict_variants(graph, [variant(o) for o in options], batch)]

    def removals(every: bool = False) -> list[_Option]:
        """Each group one edge down (``every``: to each lower edge), and each block whole."""
        options: list[_Option] = []
        for g in groups:
            lower = [e for e in edges[g] if e < counts[g]]
            for edge in (lower if every else lower[-1:]) if not frozen(g) else []:
                options.append(_GroupStep(g, edge, value(g, counts[g]) - value(g, edge)))
        for block in inner:
            if block not in removed and inner[block]:
                options.append(_BlockRemoval(block, sum(value(g, counts[g]) for g in inside[block])))
        return options

    def apply(option: _Option) -> None:
        if isinstance(option, _GroupStep):
            counts[option.group] = option.count
        else:
            removed.append(option.block)

    current = predict([None])[0]
    smallest = _smallest(table, graph, groups, edges, inner, batch)
    if smallest > budget_ms:
        raise BudgetError(f"latency budget {budget_ms:.3f} ms is below the {smallest:.3f} ms that the smallest "
                          f"pruned net reaches (every group at its fewest channels"
                          f"{', every removable block gone' if inner else ''}) on this target")
    while current > budget_ms:
        for every in (False, True):  # one edge down saves nothing where a layout change costs: try deeper cuts
            options = removals(every)
            saved = [current - ms for ms in predict(options)]
            useful = [(o, s) for o, s in zip(options, saved, strict=True) if s > 0]
            if useful:
                break
        if not useful:
            raise BudgetError(f"latency budget {budget_ms:.3f} ms not reached: the allocation stopped at "
                              f"{current:.3f} ms, where no cut of a group or block saves time on this target")
        best, gain = min(useful, key=lambda item: item[0].value / item[1])
        apply(best)
        current -= gain
        steps.append(_describe(best, graph, current))
    while True:  # put back what still fits, most value per millisecond first
        options = []
        for g in groups:
            higher = [e for e in edges[g] if e > counts[g]]
            if higher and not frozen(g):
                options.append(_GroupStep(g, min(higher), value(g, min(higher)) - value(g, counts[g])))
        costs = [ms - current for ms in predict(options)]
        fits = [(o, c) for o, c in zip(options, costs, strict=True) if current + c <= budget_ms]
        if not fits:
            break
        best, cost = max(fits, key=lambda item: item[0].value / max(item[1], 1e-9))
        apply(best)
        current += cost
        steps.append(_describe(best, graph, current, added=True))
    if log:
        for line in steps:
            log(line)
    names = {g: group_name(graph, g) for g in groups}
    return Allocation(dict(counts), removed, current, budget_ms, names, steps)


def _group_units(graph: ModelGraph, group: int) -> frozenset[str]:
    """The units that write or read a group's channels."""
    return frozenset(u.name for u in graph.units if group in (graph.group_of[u.x], graph.group_of[u.out]))


def _smallest(table: LatencyTable, graph: ModelGraph, groups: list[int], edges: dict[int, list[int]],
              inner: dict[str, frozenset[str]], batch: int) -> float:
    """The predicted latency of the smallest net the options allow."""
    gone = frozenset().union(*inner.values()) if inner else frozenset()
    return table.predict_variants(graph, [Variant({g: min(edges[g]) for g in groups}, gone)], batch)[0].ms


def _describe(option: _Option, graph: ModelGraph, ms: float, added: bool = False) -> str:
    what = f"remove block {option.block}" if isinstance(option, _BlockRemoval) else \
        f"{'raise' if added else 'cut'} {group_name(graph, option.group)} to {option.count}"
    return f"{what} (importance {'+' if added else '-'}{option.value:.3g}) -> {ms:.3f} ms"
