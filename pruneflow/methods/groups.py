"""Torch-Pruning's channel groups seen as the *layers* of methods that score or allocate per layer.

In a plain chain a layer's output channels belong to one conv; in a residual stage the channels of the
shortcut conv and of every block's last conv are one dependency group and can only go together. Methods
that decide per layer (a ratio from a layer statistic, a precomputed score per channel) decide per group,
so what they decide is exactly what the DependencyGraph can remove. A group is named by its root module:
the name ``PrunePlan.layer_ratios`` and ``PrunePlan.kept_channels`` take.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pruneflow.methods.base import ignored_layers
from pruneflow.metrics import PRUNABLE


@dataclass(frozen=True)
class Member:
    """One module of a group: which of its channels are which of the group's channels."""

    name: str
    module: nn.Conv2d | nn.Linear | _BatchNorm  # a producer or consumer (PRUNABLE), or a norm
    idxs: list[int]  # the module's own channel indices ...
    root_idxs: list[int]  # ... and the group channels they are (the same, except across concat/split)


@dataclass
class ChannelGroup:
    name: str  # the root module's name
    module: nn.Module  # the root module (Torch-Pruning's key for the group)
    channels: int
    producers: list[Member]  # conv/linear layers whose output channels these are (depthwise convs too)
    norms: list[Member]  # normalisation layers over these channels
    consumers: list[Member]  # dense conv/linear layers that read them as input channels

    def per_channel(self, statistic: Callable[[Member], torch.Tensor]) -> torch.Tensor:
        """A per-output-channel statistic of each producer, averaged onto the group's channels."""
        total = torch.zeros(self.channels, dtype=torch.float64)
        count = torch.zeros(self.channels, dtype=torch.float64)
        for producer in self.producers:
            where = torch.tensor(producer.root_idxs)
            total.index_add_(0, where, statistic(producer).detach().double()[producer.idxs])
            count.index_add_(0, where, torch.ones(len(where), dtype=torch.float64))
        return (total / count.clamp_min(1)).float()


def build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """The dependency graph, leaving the model in the train/eval mode it had (tracing switches it to eval)."""
    was_training = model.training
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    finally:
        model.train(was_training)


def channel_groups(model: nn.Module, example_inputs: torch.Tensor) -> list[ChannelGroup]:
    """The groups a Torch-Pruning pruner would rank, with the same ignored stem and classifier."""
    graph = build_graph(model, example_inputs)
    ignored = [sub for layer in ignored_layers(model) for sub in layer.modules()]
    names = {module: name for name, module in model.named_modules()}
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE):
        producers: list[Member] = []
        norms: list[Member] = []
        consumers: list[Member] = []
        for item in group:
            module = item.dep.target.module
            if module not in names or any(i is None for i in item.root_idxs):
                continue  # functional ops (adds, reshapes) carry no weights
            member = Member(names[module], module, list(item.idxs), list(item.root_idxs))
            if graph.is_out_channel_pruning_fn(item.dep.handler):
                if isinstance(module, PRUNABLE):
                    producers.append(member)
                elif isinstance(module, _BatchNorm):
                    norms.append(member)
            elif isinstance(module, PRUNABLE) and getattr(module, "groups", 1) == 1:
                consumers.append(member)
        root = group[0].dep.target.module
        groups.append(ChannelGroup(names[root], root, len(group[0].idxs), producers, norms, consumers))
    return groups


def following_norms(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, str | None]:
    """Each conv's name → the name of the normalisation layer its output feeds directly (None if none)."""
    graph = build_graph(model, example_inputs)
    names = {module: name for name, module in model.named_modules()}
    pairs: dict[str, str | None] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module in graph.module2node:
            norms = [n.module for n in graph.module2node[module].outputs if isinstance(n.module, _BatchNorm)]
            pairs[name] = names[norms[0]] if norms else None
    return pairs


class ScoreImportance(tp.importance.Importance):
    """Per-channel scores computed before pruning, keyed by each group's root module; low goes first.

    Groups without a score are skipped by the pruner, i.e. left whole.
    """

    def __init__(self) -> None:
        self.scores: dict[nn.Module, torch.Tensor] = {}

    def __call__(self, group) -> torch.Tensor | None:
        scores = self.scores.get(group[0].dep.target.module)
        return None if scores is None else scores[list(group[0].idxs)]
