"""How well does the measured latency table predict whole pruned nets? ResNet-20/56 and MobileNetV2 (CIFAR input).

For each model (untrained weights, BatchNorm given trained-looking statistics so the exported convolutions
carry biases as a trained net's do) and each batch (1 and the large one), ``--nets`` random pruned nets are
made from the exported baseline: every prunable channel group keeps a random share of its channels, rounded
to no multiple, 4, 8 or 16 in turn, and every fourth net also loses two random residual blocks. Each net is
predicted from the table (``pruneflow.latency``) and measured: all nets and the baseline are timed
interleaved in one call, with the table's anchor graphs beside them to put them on the table's scale.

Predicted = the table's prediction (the nets' units and layout conversions, placed on the line through the
measured unpruned and half-width models: ``LatencyTable.predict_variants``; "one point": in proportion to the
unpruned model alone, as before the half-width point), on the scale of the baseline timed in the same call
("same call"); or on the scale of the baseline timed when the table was built, so nothing is timed at
prediction time ("stored"). Wall times are 10th percentiles of the interleaved runs, as
in the table; CPU is the process's CPU time per run. A check that slicing the baseline's ONNX equals exporting
a Torch-Pruning-pruned net, and a plot of every group's latency against its channels (the staircase), come
with it.

    .venv/bin/python benchmarks/latency_model.py                 # writes docs/benchmarks/latency-model.md
    .venv/bin/python benchmarks/latency_model.py --models resnet20 --nets 4 --out /tmp/lm.md   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from scipy.stats import spearmanr
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.latency import machine  # noqa: E402
from pruneflow.concurrency import file_lock  # noqa: E402
from pruneflow.export import CPU, export_onnx  # noqa: E402
from pruneflow.latency import LatencyTable, ModelGraph, Variant, group_curves, plot_curves, read_graph  # noqa: E402
from pruneflow.latency.graph import sliced_model  # noqa: E402
from pruneflow.latency.table import graph_hash  # noqa: E402
from pruneflow.latency.target import prunable_groups  # noqa: E402
from pruneflow.latency.units import optimized  # noqa: E402
from pruneflow.methods import create_method  # noqa: E402
from pruneflow.methods.blocks import find_residual_blocks  # noqa: E402
from pruneflow.models import build_model  # noqa: E402
from pruneflow.plan import PrunePlan  # noqa: E402

ANALYSIS = "## What this shows"  # a rerun rewrites the file above this heading and keeps what follows it
SHAPE = (3, 32, 32)
ROUNDINGS = (None, 4, 8, 16)


@dataclass
class Check:
    model: str
    batch: int
    measured: list[float]  # wall (p10, table scale), per net
    same_call: list[float]  # predicted, on the scale of the baseline timed beside the nets
    one_point: list[float]  # same call, placed in proportion to the unpruned model only (no half-width point)
    stored: list[float]  # predicted, on the scale of the baseline timed when the table was built
    measured_cpu: list[float]
    predicted_cpu: list[float]
    labels: list[str]
    build_s: float  # wall time spent measuring table entries for this check
    build_cpu_s: float
    new_entries: int

    @staticmethod
    def errors(predicted: list[float], measured: list[float]) -> tuple[float, float, float]:
        """Mean and max absolute error (%), and Spearman's rank correlation."""
        error = np.abs(np.array(predicted) - np.array(measured)) / np.array(measured) * 100
        return float(error.mean()), float(error.max()), float(spearmanr(predicted, measured)[0])


@dataclass
class Outcome:
    checks: list[Check] = field(default_factory=list)
    slicing: dict[str, tuple[bool, float]] = field(default_factory=dict)  # model -> same graph, exported / sliced
    plots: dict[str, Path] = field(default_factory=dict)
    sweeps: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # model -> entries, wall s, CPU s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "mobilenet_v2"])
    parser.add_argument("--nets", type=int, default=20, help="random pruned nets per model and batch")
    parser.add_argument("--large-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=100, help="timed runs per net at batch 1")
    parser.add_argument("--repeats-large", type=int, default=20, help="timed runs per net at the large batch")
    parser.add_argument("--table-dir", type=Path, default=ROOT / ".cache" / "latency-tables")
    parser.add_argument("--lock", type=Path, help="hold this file lock while timing (shared machines)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "latency-model.md")
    return parser.parse_args(argv)


def trained_looking(model: nn.Module, seed: int) -> nn.Module:
    """BatchNorm with spread scales, shifts and statistics: folded into the convolutions, they give every
    convolution a bias, as training does (an untrained net exports bias-free convolutions, fused differently)."""
    generator = torch.Generator().manual_seed(seed)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        size = bn.num_features
        bn.weight.data = torch.rand(size, generator=generator) + 0.5
        bn.bias.data = torch.rand(size, generator=generator) * 0.2 - 0.1
        bn.running_mean = torch.rand(size, generator=generator) * 0.2 - 0.1
        bn.running_var = torch.rand(size, generator=generator) + 0.5
    return model.eval()


def random_nets(graph: ModelGraph, groups: list[int], blocks: list[str], count: int,
                rng: np.random.Generator) -> tuple[list[Variant], list[str]]:
    variants, labels = [], []
    for index in range(count):
        step = ROUNDINGS[index % len(ROUNDINGS)]
        counts = {}
        for group in groups:
            size = graph.sizes[group]
            kept = size * rng.uniform(0.25, 1.0)
            counts[group] = int(min(size, max(step or 1, (step or 1) * round(kept / (step or 1)))))
        removed: list[str] = []
        if index % 4 == 3 and len(blocks) >= 2:
            removed = list(rng.choice(blocks, 2, replace=False))
        units = frozenset(u.name for u in graph.units for b in removed if u.name.startswith(b + "."))
        variants.append(Variant(counts, units))
        labels.append(f"round_to {step or 'none'}" + (f", -{'/'.join(removed)}" if removed else ""))
    return variants, labels


def timing_lock(args: argparse.Namespace):
    return file_lock(args.lock) if args.lock else contextlib.nullcontext()


def check(name: str, model: nn.Module, graph: ModelGraph, batch: int, args: argparse.Namespace,
          scratch: Path, log) -> Check:
    table = LatencyTable(args.table_dir, threads=args.threads, repeats=30 if batch == 1 else 10)
    rng = np.random.default_rng(args.seed + batch)
    blocks = find_residual_blocks(model, torch.zeros(1, *SHAPE))
    groups = prunable_groups(model, torch.zeros(2, *SHAPE), graph)
    variants, labels = random_nets(graph, groups, blocks, args.nets, rng)
    repeats = args.repeats if batch == 1 else args.repeats_large
    started, started_cpu, before = time.perf_counter(), time.process_time(), len(table)
    with timing_lock(args):
        table.calibrate(graph, batch, repeats, prunable=groups)
        predictions = table.predict_variants(graph, [Variant({}), *variants], batch)
    build_s, build_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
    paths = {"baseline": scratch / f"{name}-baseline.onnx"}
    onnx.save(graph.model, str(paths["baseline"]))
    for index, variant in enumerate(variants):
        paths[str(index)] = scratch / f"{name}-{batch}-{index}.onnx"
        onnx.save(sliced_model(graph, variant.counts, variant.removed), str(paths[str(index)]))
    with timing_lock(args):
        timing, scale = table.time_models(paths, batch, repeats)
    # the same-call prediction: the variants' predictions over the baseline's, times the baseline timed beside them
    wall_ratio = timing["baseline"].p10_ms * scale.wall / predictions[0].ms
    cpu_ratio = timing["baseline"].cpu_ms * scale.cpu / predictions[0].cpu_ms
    nets = [str(i) for i in range(len(variants))]
    fixed = table.data["fixed"][f"{graph.structure_hash()}|b{batch}"]
    proportion = fixed["model_ms"] / fixed["units_ms"]  # the model before the half-width point (b5073e5)
    result = Check(name, batch, [timing[n].p10_ms * scale.wall for n in nets],
                   [p.ms * wall_ratio for p in predictions[1:]],
                   [(p.ms - (p.fixed_ms or 0.0)) * proportion * wall_ratio for p in predictions[1:]],
                   [p.ms for p in predictions[1:]],
                   [timing[n].cpu_ms * scale.cpu for n in nets], [p.cpu_ms * cpu_ratio for p in predictions[1:]],
                   labels, build_s, build_cpu_s, len(table) - before)
    mae, worst, rho = Check.errors(result.same_call, result.measured)
    log(f"{name} b{batch}: MAE {mae:.1f} % (max {worst:.1f}), Spearman {rho:.3f}; scale {scale.wall:.2f}; "
        f"{result.new_entries} new entries in {build_s:.0f} s")
    return result


def slicing_check(name: str, model: nn.Module, graph: ModelGraph, args: argparse.Namespace,
                  scratch: Path) -> tuple[bool, float]:
    """Whether the net Torch-Pruning makes (l1, half the channels, multiples of 8), exported, optimises to the
    same runtime graph as the baseline's ONNX sliced to its channel counts, and its latency over the sliced one's."""
    pruned = copy.deepcopy(model)
    create_method("l1").prune(pruned, torch.zeros(2, *SHAPE), PrunePlan(ratio=0.5, round_to=8))
    exported = export_onnx(pruned.eval(), torch.zeros(2, *SHAPE), scratch / f"{name}-exported.onnx")
    counts = graph.counts_of({n: (m.in_channels, m.out_channels) for n, m in pruned.named_modules()
                              if isinstance(m, nn.Conv2d)})
    sliced = scratch / f"{name}-sliced.onnx"
    onnx.save(sliced_model(graph, counts), str(sliced))
    runs = [optimized(onnx.load(str(path)), scratch / "optimized.onnx", args.threads, CPU)
            for path in (exported, sliced)]
    same = len({graph_hash(run, []) for run in runs}) == 1
    table = LatencyTable(args.table_dir, threads=args.threads, progress=False)
    with timing_lock(args):
        timing, _ = table.time_models({"exported": exported, "sliced": sliced}, 1, args.repeats)
    return same, timing["exported"].p10_ms / timing["sliced"].p10_ms


def run(args: argparse.Namespace, log) -> Outcome:
    outcome = Outcome()
    with tempfile.TemporaryDirectory(prefix="pruneflow-latency-model-") as scratch_dir:
        scratch = Path(scratch_dir)
        for name in args.models:
            torch.manual_seed(args.seed)
            model = trained_looking(build_model(name, SHAPE[0], 10), args.seed)
            path = export_onnx(model, torch.zeros(2, *SHAPE), scratch / f"{name}.onnx")
            graph = read_graph(path)
            for batch in (1, args.large_batch):
                outcome.checks.append(check(name, model, graph, batch, args, scratch, log))
            outcome.slicing[name] = slicing_check(name, model, graph, args, scratch)
            log(f"{name}: exported = sliced runtime graph: {outcome.slicing[name][0]}; latency ratio "
                f"{outcome.slicing[name][1]:.3f}")
            table = LatencyTable(args.table_dir, threads=args.threads)
            started, started_cpu, before = time.perf_counter(), time.process_time(), len(table)
            with timing_lock(args):
                curves = group_curves(table, graph, prunable_groups(model, torch.zeros(2, *SHAPE), graph), 1)
            outcome.sweeps[name] = (len(table) - before, time.perf_counter() - started,
                                    time.process_time() - started_cpu)
            plot = args.out.parent / f"latency-model-{name}.png"
            outcome.plots[name] = plot_curves(curves, plot, f"{name}, batch 1, {args.threads} threads: "
                                                            "predicted latency against each group's channels")
    return outcome


def render(outcome: Outcome, args: argparse.Namespace, command: str, loads: tuple[float, float],
           seconds: tuple[float, float]) -> str:
    table = LatencyTable(args.table_dir, threads=args.threads, progress=False)
    lines = [
        "# Latency model: predicted against measured",
        "",
        "Generated by `benchmarks/latency_model.py` (rewritten by every run, except the section *What this "
        "shows*). How `pruneflow.latency` predicts the ONNX Runtime (CPU) latency of pruned CIFAR nets (3×32×32, "
        "untrained weights with trained-looking BatchNorm): for each model and batch, "
        f"{args.nets} random pruned nets (every prunable channel group keeps 25-100 % of its channels, rounded to "
        "no multiple, 4, 8 or 16 in turn; every fourth net also loses two residual blocks), predicted from the "
        "table and timed interleaved with the baseline in one call.",
        "",
        "## Regenerate",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Machine: {machine()}. {args.threads} threads; {args.repeats} timed runs per net at batch 1, "
        f"{args.repeats_large} at batch {args.large_batch}. 1-minute load average {loads[0]:.2f} before, "
        f"{loads[1]:.2f} after; the run took {seconds[0] / 60:.1f} min ({seconds[1] / 60:.1f} min CPU).",
        "",
        "## Prediction error",
        "",
        "Wall: 10th percentile of the interleaved runs; CPU: the process's CPU time per run (median). *Same call*:",
        "the prediction on the scale of the baseline timed beside the nets; *one point*: the same, placed in "
        "proportion to the unpruned model's units alone (the model before the half-width calibration point); "
        "*stored*: on the scale of the "
        "baseline timed when the table was built (nothing timed at prediction). MAE: mean absolute error of "
        "predicted against measured, in % of measured; ρ: Spearman rank correlation. Aim: MAE ≤ 10 %, ρ ≥ 0.9.",
        "",
        "| model | batch | nets | wall MAE % (max) | wall ρ | one point: wall MAE % | stored: wall MAE % | "
        "CPU MAE % | CPU ρ | entries measured | build time (CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in outcome.checks:
        mae, worst, rho = Check.errors(c.same_call, c.measured)
        one_mae = Check.errors(c.one_point, c.measured)[0]  # ρ is the same: both rise with the units' sum
        stored_mae = Check.errors(c.stored, c.measured)[0]
        cpu_mae, _, cpu_rho = Check.errors(c.predicted_cpu, c.measured_cpu)
        lines.append(f"| {c.model} | {c.batch} | {len(c.measured)} | {mae:.1f} ({worst:.1f}) | {rho:.3f} | "
                     f"{one_mae:.1f} | {stored_mae:.1f} | {cpu_mae:.1f} | {cpu_rho:.3f} | "
                     f"{c.new_entries} | {c.build_s:.0f} s ({c.build_cpu_s:.0f} s) |")
    lines += ["", "Wall MAE % (same call) by the nets' rounding: the nets `round_to: auto` and `halp` make are "
              "multiples of the runtime's channel block (16 here).", "",
              "| model | batch | " + " | ".join(f"round_to {r or 'none'}" for r in ROUNDINGS) + " |",
              "|---|---|" + "---|" * len(ROUNDINGS)]
    for c in outcome.checks:
        by = {r: [i for i, label in enumerate(c.labels) if label.split(",")[0] == f"round_to {r or 'none'}"]
              for r in ROUNDINGS}
        lines.append(f"| {c.model} | {c.batch} | " + " | ".join(
            f"{Check.errors([c.same_call[i] for i in by[r]], [c.measured[i] for i in by[r]])[0]:.1f}"
            if len(by[r]) > 1 else "—" for r in ROUNDINGS) + " |")
    size = table.path.stat().st_size / 2**20 if table.path.is_file() else 0.0
    lines += [
        "",
        f"The table file (`{table.path.relative_to(ROOT) if table.path.is_relative_to(ROOT) else table.path}`) "
        f"now holds {len(table)} entries ({len(table.data['effective'])} distinct timed graphs), {size:.1f} MiB; "
        "*entries measured* counts those a check added (earlier checks and runs had measured the rest). "
        "The staircases below (every count of every group up to 64 channels, a power-of-two stride above) "
        "added " + "; ".join(f"{name}: {n} entries in {wall:.0f} s ({cpu:.0f} s CPU)"
                             for name, (n, wall, cpu) in outcome.sweeps.items()) + ".",
        "",
        "## Per net (wall, same call)",
        "",
        "| model | batch | net | measured ms | predicted ms | error % |",
        "|---|---|---|---|---|---|",
    ]
    for c in outcome.checks:
        for label, measured, predicted in zip(c.labels, c.measured, c.same_call, strict=True):
            lines.append(f"| {c.model} | {c.batch} | {label} | {measured:.3f} | {predicted:.3f} | "
                         f"{(predicted - measured) / measured * 100:+.1f} |")
    lines += [
        "",
        "## Slicing the baseline's ONNX stands for exporting the pruned net",
        "",
        "The nets above are the baseline's ONNX file with weights cut to the channel counts (no export per net). "
        "Torch-Pruning's l1 at half the channels (multiples of 8), exported, against the sliced baseline with "
        "the same counts: the graphs ONNX Runtime optimises them to (nodes, attributes, weight shapes), and their "
        "latency timed interleaved at batch 1:",
        "",
        "| model | same runtime graph | exported ÷ sliced latency |",
        "|---|---|---|",
        *[f"| {name} | {'yes' if same else 'NO'} | {ratio:.3f} |" for name, (same, ratio) in outcome.slicing.items()],
        "",
        "## The staircase",
        "",
        "Predicted model latency (batch 1) as one group's channels vary, the others whole; red: step edges, the "
        "counts `round_to: auto` keeps (every larger count is slower).",
        "",
        *[f"![{name}]({path.name})" for name, path in outcome.plots.items()],
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    started, started_cpu = time.perf_counter(), time.process_time()
    outcome = run(args, lambda line: print(line, flush=True))
    seconds = (time.perf_counter() - started, time.process_time() - started_cpu)
    command = shlex.join([".venv/bin/python", "benchmarks/latency_model.py",
                          *(argv if argv is not None else sys.argv[1:])])
    analysis = args.out.read_text().partition(ANALYSIS)[2] if args.out.is_file() else ""
    report = render(outcome, args, command, (load_before, os.getloadavg()[0]), seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + (f"\n{ANALYSIS}{analysis}" if analysis else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
