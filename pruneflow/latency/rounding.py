"""``prune.round_to: auto``: every channel group keeps a count at a step edge of its own measured latency curve.

A fixed ``round_to`` gives every layer one multiple, and which multiple is fast depends on the machine: ONNX
Runtime's CPU provider computes convolutions in NCHWc blocks of 16 channels with AVX-512 and of 8 with AVX2,
and a layer whose count is off the block leaves that layout (two conversions around a slower kernel). Here
the method prunes a copy of the model unrounded (``round_to`` none) to learn the count it asks of each group;
the candidates are the multiples of the runtime's block at or above it (read from the runtime itself,
``LatencyTable.channel_block``); each group's curve is predicted from the table over those candidates, the
other groups at their asked counts raised to the block; and the count is raised to the smallest step edge
(``steps.round_to_edge``): never fewer channels than asked, and never a count that costs as much as a larger
one. The counts go into the plan as ``kept_channels`` (so the plan logged is the plan pruned), and each
group's rounding, with why, goes into the prune report.

Why only block multiples: the table is optimistic about counts off the block (docs/benchmarks/latency.md),
so edges read off every count picked slow ones (odd counts like 9, 21, 35 in ResNet-20, and the nets were
slower than with ``round_to`` 8). A runtime without the layout (a GPU provider) has block 1: every count.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from pruneflow.export import export_onnx
from pruneflow.latency.graph import conv_call_order, read_graph
from pruneflow.latency.steps import group_curves, round_to_edge
from pruneflow.latency.table import LatencyTable
from pruneflow.methods.base import PruningMethod
from pruneflow.methods.groups import channel_groups
from pruneflow.plan import PrunePlan
from pruneflow.task import Batches

AUTO = "auto"
WINDOW = 32
TOLERANCE = 0.05


def cache_folder() -> Path:
    """Where this machine's latency tables live: ``$PRUNEFLOW_LATENCY_CACHE``, else ``~/.cache/pruneflow/latency``
    (outside any run folder, so every run, trial and worker of the machine shares them)."""
    return Path(os.environ.get("PRUNEFLOW_LATENCY_CACHE", Path.home() / ".cache" / "pruneflow" / "latency"))


def step_rounded(method: PruningMethod, model: nn.Module, example_inputs: torch.Tensor, plan: PrunePlan,
                 table: LatencyTable, calib_batches: Batches | None = None, batch: int = 1,
                 exported: Path | onnx.ModelProto | None = None, opset: int = 18, window: int = WINDOW,
                 tolerance: float = TOLERANCE) -> tuple[PrunePlan, list[dict[str, Any]]]:
    """The plan with every channel group's kept count at a step edge, and per group what it was rounded to and why.

    A group's curve is swept over the block multiples from its asked count up to ``window`` channels more (two
    NCHWc blocks of AVX-512): the next step edge lies within, and the table grows by a few entries per group.
    The whole count is swept too, so ``tolerance`` (a share of what the group costs between its asked and whole
    count) separates steps from timing noise: a count is kept only if every larger one is slower by more.

    ``model`` is left as it is (a copy is pruned); ``exported`` is its ONNX file or graph if there is one (else
    it is exported to a scratch folder, which costs more than the rounding: the pipeline passes the baseline's).
    A plan that removes no channels comes back unchanged."""
    trial = copy.deepcopy(model)
    first = method.prune(trial, example_inputs, replace(plan, round_to=None), calib_batches)
    modules = dict(trial.named_modules())
    asked = {group.name: (group.channels, modules[group.name].weight.shape[0])
             for group in channel_groups(model, example_inputs) if group.name in modules}
    if all(before == after for before, after in asked.values()):
        return replace(first.plan, round_to=None), []
    with tempfile.TemporaryDirectory(prefix="pruneflow-round-") as scratch:
        path = exported or export_onnx(model, example_inputs, Path(scratch) / "model.onnx", opset)
        graph = read_graph(path, conv_call_order(model, example_inputs))
    units = graph.unit_by_name
    timed = {name: graph.group_of[units[name].out] for name in asked if name in units}
    block = table.channel_block() or 1
    counts = {timed[name]: asked[name][1] for name in timed}
    aligned = {group: min(graph.sizes[group], -(-count // block) * block) for group, count in counts.items()}
    sweeps = {group: sorted({*range(aligned[group], min(graph.sizes[group], count + window) + 1, block),
                             graph.sizes[group]})
              for group, count in counts.items()}
    curves = {curve.group: curve
              for curve in group_curves(table, graph, sorted(counts), batch, aligned, sweeps=sweeps)}
    kept, rounding = {}, []
    for name, (channels, count) in asked.items():
        if name in timed:
            step = round_to_edge(curves[timed[name]], count, tolerance, block)
            kept[name] = min(step.kept, channels)
            rounding.append({**asdict(step), "name": name, "channels": channels})
        else:
            kept[name] = count
            rounding.append({"name": name, "channels": channels, "asked": count, "kept": count,
                             "reason": "not a convolution the table times: kept as asked"})
    note = f"{plan.origin.note}; " if plan.origin.note else ""
    rounded = replace(first.plan, layer_ratios={}, kept_channels=kept, round_to=None,
                      origin=replace(plan.origin, note=f"{note}counts at latency step edges (round_to: auto)"))
    return rounded, rounding


def rounding_table(rounding: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows (group, channels, asked, kept, why) for a report, groups whose count changed first."""
    rows = sorted(rounding, key=lambda r: r["asked"] == r["kept"])
    return [[r["name"], r["channels"], r["asked"], r["kept"], r["reason"]] for r in rows]
