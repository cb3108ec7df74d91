"""A measured latency model of the export target, and pruning that spends a latency budget.

    graph.py     the model as ONNX Runtime runs it: convolution units, tensors, channel groups
    units.py     the small graphs that time one unit as it runs inside the model
    table.py     the measured table (cached per machine and runtime) and whole-model prediction
    steps.py     latency against channels per group, step edges, rounding a count to one
    allocate.py  channels and residual blocks allocated under a latency budget (HALP's knapsack)

Typical use: ``graph = read_graph(exported_onnx)``; ``table = LatencyTable(cache_folder, threads=2)``;
``table.calibrate(graph, batch, prunable=groups)`` once (measures the unpruned model and a half-width one:
what their units miss);
``table.predict(graph, counts, batch).ms`` for any channel counts, ``group_curves`` / ``round_to_edge`` for
counts worth keeping, ``allocate`` for a budget. benchmarks/latency_model.py checks the predictions.
"""

from pruneflow.latency.allocate import Allocation, BudgetError, allocate, importance_scores
from pruneflow.latency.graph import ModelGraph, Unit, read_graph, sliced_model
from pruneflow.latency.steps import GroupCurve, Rounding, group_curves, plot_curves, round_to_edge
from pruneflow.latency.table import LatencyTable, Prediction, Variant

__all__ = ["Allocation", "BudgetError", "GroupCurve", "LatencyTable", "ModelGraph", "Prediction", "Rounding", "Unit",
           "Variant", "allocate", "group_curves", "importance_scores", "plot_curves", "read_graph", "round_to_edge",
           "sliced_model"]
