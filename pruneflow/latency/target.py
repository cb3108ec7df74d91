"""Latency targets met through the table: the predicted latency of pruned PyTorch models of one baseline.

A search with ``search.target.metric: latency_ms`` (a ceiling, ms) or ``speedup`` (a floor: baseline ÷ pruned)
scores every trial, and bisects every trial's fit to the target (``search.fit_to_target``), on the latency the
table predicts for the pruned net: no ONNX export and no timing in the trial, so trials of several method
chains may run at once. The final model's latency is still measured (the evaluate stage), and the prediction
is logged beside it with its error.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

from pruneflow.latency.graph import ModelGraph, conv_call_order, read_graph
from pruneflow.latency.table import LatencyTable, Prediction
from pruneflow.methods.groups import channel_groups

LATENCY_METRICS = ("latency_ms", "speedup")


class LatencyPredictor:
    """Predicted latency of pruned versions of one baseline on one table, at one batch.

    The baseline is measured once, with a half-width form of it (``LatencyTable.calibrate``: the table keeps
    what their units miss), so its prediction is its measured latency and ``speedup`` is the baseline's latency
    over the prediction."""

    def __init__(self, baseline: nn.Module, example_inputs: torch.Tensor, exported: Path | onnx.ModelProto,
                 table: LatencyTable, batch: int = 1) -> None:
        self.graph = read_graph(exported, conv_call_order(baseline, example_inputs))
        self.table, self.batch = table, batch
        table.calibrate(self.graph, batch, prunable=prunable_groups(baseline, example_inputs, self.graph))
        self.baseline_ms = table.predict(self.graph, {}, batch).ms

    def predict(self, model: nn.Module) -> Prediction:
        """The pruned ``model``'s latency: its convolutions' channel counts, and the units of removed blocks
        (convolutions the baseline has and ``model`` lacks) gone."""
        channels = {name: (module.in_channels, module.out_channels) for name, module in model.named_modules()
                    if isinstance(module, nn.Conv2d)}
        removed = [unit.name for unit in self.graph.units if unit.name not in channels]
        return self.table.predict(self.graph, self.graph.counts_of(channels), self.batch, removed)

    def costs(self, model: nn.Module) -> dict[str, float]:
        """``latency_ms`` and ``speedup`` as the search reads them."""
        ms = self.predict(model).ms
        return {"latency_ms": ms, "speedup": self.baseline_ms / ms}


def prunable_groups(model: nn.Module, example_inputs: torch.Tensor, graph: ModelGraph) -> list[int]:
    """The groups of ``graph`` that Torch-Pruning prunes in ``model``: written by a convolution of one of its
    dependency groups (so not the stem's input nor what feeds the classifier)."""
    units = graph.unit_by_name
    found = {graph.group_of[units[member.name].out] for group in channel_groups(model, example_inputs)
             for member in group.producers if member.name in units}
    return sorted(found)
