"""Latency against channels kept, per channel group, and the counts worth keeping on a given target.

A group's curve is the model's predicted latency as that group's count varies (every other group as given),
so it includes every unit the group feeds and leaves, and the layout conversions it causes. On ONNX Runtime's
CPU provider the curve is a staircase (output channels are padded to the NCHWc block; input counts off a
multiple of 4 fall back to plain NCHW kernels), and a count is worth keeping only at the *low edge* of a step:
where every larger count is slower. Any other count costs as much as a larger one, and is rounded up to the
next edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pruneflow.latency.graph import ModelGraph
from pruneflow.latency.table import LatencyTable


@dataclass
class GroupCurve:
    name: str  # a convolution writing the group's channels (the group's name in reports)
    group: int
    counts: list[int]
    ms: list[float]  # predicted model latency with the group at each count

    def at(self, count: int) -> float:
        """Latency at ``count``, read off the nearest swept count at or above it (steps are right-closed)."""
        above = [c for c in self.counts if c >= count]
        return self.ms[self.counts.index(min(above) if above else max(self.counts))]

    def edges(self, tolerance: float = 0.01) -> list[int]:
        """Counts where every larger count is slower by more than ``tolerance`` of the curve's span."""
        slack = tolerance * (max(self.ms) - min(self.ms))
        edges, fastest_above = [], float("inf")
        for count, ms in sorted(zip(self.counts, self.ms, strict=True), reverse=True):
            if ms < fastest_above - slack:
                edges.append(count)
            fastest_above = min(fastest_above, ms)
        return sorted(edges)


def sweep_counts(channels: int, points: int = 64) -> list[int]:
    """Every count up to ``points`` channels; above that, evenly spaced counts on a power-of-two stride."""
    stride = 1
    while channels / stride > points:
        stride *= 2
    return sorted(set(range(stride, channels + 1, stride)) | {channels})


def group_name(graph: ModelGraph, group: int) -> str:
    writers = [unit.name for unit in graph.units if graph.group_of[unit.out] == group]
    return writers[0] if writers else f"group{group}"


def group_curves(table: LatencyTable, graph: ModelGraph, groups: list[int], batch: int = 1,
                 counts: dict[int, int] | None = None, points: int = 64,
                 sweeps: dict[int, list[int]] | None = None) -> list[GroupCurve]:
    """Each group's curve, the other groups at ``counts`` (default: whole), at the counts of ``sweeps`` (default:
    ``sweep_counts``); measures what the table lacks."""
    counts, sweeps = counts or {}, sweeps or {}
    configs = [(group, count) for group in groups
               for count in sweeps.get(group) or sweep_counts(graph.sizes[group], points)]
    predictions = table.predict_many(graph, [{**counts, group: count} for group, count in configs], batch)
    curves = []
    for group in groups:
        swept = [(count, p.ms) for (g, count), p in zip(configs, predictions, strict=True) if g == group]
        curves.append(GroupCurve(group_name(graph, group), group, [c for c, _ in swept], [ms for _, ms in swept]))
    return curves


@dataclass
class Rounding:
    name: str
    asked: int  # the count the method's ratio gave
    kept: int  # the count kept
    reason: str


def round_to_edge(curve: GroupCurve, asked: int, tolerance: float = 0.01, block: int = 1) -> Rounding:
    """The step edge to keep instead of ``asked`` channels, and why: the smallest edge at or above ``asked``.

    It never costs more than ``asked`` (within ``tolerance`` of the curve's span): a count that is not an edge
    is as slow as some larger count, and the fastest larger count is the next edge. So rounding up to it keeps
    more channels for no time, where a fixed ``round_to`` would round to a multiple that may be slower. With a
    ``block`` (the curve then holds only its multiples), a count off it is first raised to the next multiple.
    """
    up = min((e for e in curve.edges(tolerance) if e >= asked), default=max(curve.counts))
    if up == asked:
        return Rounding(curve.name, asked, asked, f"{asked} is a step edge (model {curve.at(asked):.3f} ms)")
    aligned = min((c for c in curve.counts if c >= asked), default=up)
    if block > 1 and up == aligned:
        return Rounding(curve.name, asked, up, f"{asked}→{up}: the runtime computes channels in blocks of {block}, "
                                               f"and {up} is the step edge above (model {curve.at(up):.3f} ms)")
    how = "no more than" if curve.at(up) <= curve.at(aligned) else f"within {tolerance:.0%} of the curve's span of"
    return Rounding(curve.name, asked, up, f"{asked}→{up}: {up} channels cost {how} {aligned} "
                                           f"(model {curve.at(up):.3f} vs {curve.at(aligned):.3f} ms)")


def plot_curves(curves: list[GroupCurve], path: Path, title: str, tolerance: float = 0.01) -> Path:
    """One panel per group: predicted latency against channels kept, step edges marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(curves))
    rows = -(-len(curves) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.5 * rows), squeeze=False)
    for axis, curve in zip(axes.flat, curves, strict=False):  # the grid's last row may have spare axes
        axis.step(curve.counts, curve.ms, where="post", lw=1)
        edges = curve.edges(tolerance)
        axis.plot(edges, [curve.at(e) for e in edges], "o", ms=3, color="tab:red")
        axis.set_title(curve.name, fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in axes.flat[len(curves):]:
        axis.axis("off")
    figure.supxlabel("channels kept (red: step edges)", fontsize=9)
    figure.supylabel("predicted model latency (ms)", fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
