"""Do fewer MACs mean less time, and does a speed-up target deliver it? Pruned CIFAR and ImageNet-sized nets, timed.

For each model (untrained weights with trained-looking BatchNorm: speed does not depend on the weights):

* **MACs targets** (1.5×, 2×, 3× fewer MACs): ``l1`` at the ratio bisection finds (``targeting.bisect_ratio``),
  with the channel rounding ``round_to: auto`` (the default: each group's count raised to a multiple of the
  runtime's channel block at a step edge of its latency curve, as the prune stage does, inside every bisection
  step) and with ``round_to`` 16, 8 and none;
* **speed-up targets** (1.5×, 2×, 3× faster, predicted on the latency table): ``halp`` (the knapsack allocator,
  channels and residual blocks, each allocation timed and the ask corrected as the prune stage does), ``bound``
  (the same knapsack valuing each channel by its MACs: the cuts that save most time per MAC, whatever they cost
  in accuracy; a greedy estimate of the ceiling of speed-up ÷ MACs),
  and ``l1`` with each rounding at the ratio whose *predicted* speed-up meets the target (bisected, as the search
  fits a trial on predicted latency).

Then every pruned net and the baseline are exported to ONNX and timed interleaved in one
``pruneflow.export.measure_latency`` call per batch (ONNX Runtime, CPU provider): batch 1 and the large batch,
wall time (median) beside the process's CPU time. Each row sets the measured speed-up beside the MACs ratio and
beside the speed-up the table predicted, with the prediction's error (measured ÷ predicted speed-up − 1).

Timings are only meaningful on a quiet machine: the load average is recorded before and after, and the run
refuses to start above ``--max-load`` unless ``--force``. The report is rewritten after every model, so a run
stopped early keeps what finished.

    .venv/bin/python benchmarks/latency.py                       # writes docs/benchmarks/latency.md
    .venv/bin/python benchmarks/latency.py --quick --force       # smoke: ResNet-20 at 2x only, to .cache/
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pruneflow.concurrency import file_lock  # noqa: E402
from pruneflow.export import export_onnx, measure_latency  # noqa: E402
from pruneflow.latency import LatencyTable  # noqa: E402
from pruneflow.latency.allocate import BudgetError, importance_scores  # noqa: E402
from pruneflow.latency.graph import ModelGraph  # noqa: E402
from pruneflow.latency.measured import timed_against  # noqa: E402
from pruneflow.latency.rounding import step_rounded  # noqa: E402
from pruneflow.latency.table import cpu_model  # noqa: E402
from pruneflow.latency.target import LatencyPredictor  # noqa: E402
from pruneflow.methods import PruningMethod, create_method  # noqa: E402
from pruneflow.methods.blocks import removable_blocks  # noqa: E402
from pruneflow.methods.halp import allocated_plan  # noqa: E402
from pruneflow.metrics import count_macs_params  # noqa: E402
from pruneflow.models import build_model  # noqa: E402
from pruneflow.plan import PrunePlan  # noqa: E402
from pruneflow.targeting import bisect_ratio  # noqa: E402

ANALYSIS = "## What this shows"  # a rerun rewrites the file above this heading and keeps what follows it
INPUTS = {"resnet20": (3, 32, 32), "resnet56": (3, 32, 32), "mobilenet_v2": (3, 32, 32),
          "torchvision:resnet18": (3, 224, 224)}
CLASSES = {"torchvision:resnet18": 1000}
GOALS = {"b1": 1.0, "large": 0.85}  # efficiency at ~2x fewer MACs with default settings (ResNet-20/56)
SPEEDUP_GOAL = 0.95  # asked for s x, deliver >= 0.95 s (1.9x of 2x)


@dataclass
class Row:
    model: str
    target: str  # "macs 2x" or "speedup 2x"
    setting: str  # "auto" (the default), "16", "8", "none", "halp", "bound" (the most time per MAC)
    ratio: float | None  # the l1 ratio found (None: halp)
    macs_ratio: float  # baseline MACs / pruned MACs
    predicted_speedup: float  # baseline ÷ predicted on the table, batch 1
    predicted_ms: float
    note: str = ""
    measured: dict[str, dict[str, float]] = field(default_factory=dict)  # batch -> ms, cpu_ms, p10_ms, speedups

    @property
    def name(self) -> str:
        return f"{self.model}|{self.target}|{self.setting}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(INPUTS), choices=list(INPUTS))
    parser.add_argument("--factors", nargs="+", type=float, default=[1.5, 2.0, 3.0], help="MACs reduction targets, x")
    parser.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0, 3.0], help="speed-up targets, x")
    parser.add_argument("--settings", nargs="+", default=["auto", "16", "8", "none"],
                        help="channel roundings of l1 at the MACs targets (auto is the default)")
    parser.add_argument("--speedup-settings", nargs="+", default=["halp", "bound", "auto", "16", "8", "none"],
                        help="halp, the time-per-MAC bound, and the roundings of l1, at the speed-up targets")
    parser.add_argument("--large-batch", type=int, default=32)
    parser.add_argument("--large-batch-224", type=int, default=8, help="the large batch of 224x224 models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per net at batch 1")
    parser.add_argument("--repeats-large", type=int, default=15, help="timed runs per net at the large batch")
    parser.add_argument("--table", type=Path, default=ROOT / ".cache" / "latency-tables",
                        help="latency table folder (reused across runs)")
    parser.add_argument("--lock", type=Path, help="hold this file lock (flock) while timing the nets")
    parser.add_argument("--max-load", type=float, default=0.75 * (os.cpu_count() or 2),
                        help="refuse to start above this 1-minute load (default: 0.75 per core)")
    parser.add_argument("--force", action="store_true", help="run even on a busy machine (numbers are then noisier)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: resnet20, 2x targets, auto and 16, few repeats, report to .cache/")
    parser.add_argument("--render", action="store_true", help="only rewrite the report from the .json beside it")
    parser.add_argument("--out", type=Path, help="the report (default docs/benchmarks/latency.md; --quick: .cache/); "
                                                 "its rows are kept in the .json file beside it")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.factors, args.speedups = ["resnet20"], [2.0], [2.0]
        args.settings, args.speedup_settings = ["auto", "16"], ["halp", "auto"]
        args.repeats, args.repeats_large, args.warmup = 10, 3, 2
    args.out = args.out or (ROOT / ".cache" / "latency-quick.md" if args.quick
                            else ROOT / "docs" / "benchmarks" / "latency.md")
    return args


def trained_looking(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Distinct BatchNorm scales and running statistics, as training leaves them (l1 and Taylor then rank)."""
    generator = torch.Generator().manual_seed(0)
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        norm.weight.data = torch.rand(norm.num_features, generator=generator) * 0.9 + 0.1
        norm.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, *shape, generator=generator))
    return model.eval()


def rounding(setting: str) -> int | str | None:
    return {"auto": "auto", "none": None}.get(setting, int(setting) if setting.isdigit() else setting)


class Model:
    """One baseline, its latency predictor, and l1/halp prunes of it."""

    def __init__(self, name: str, table: LatencyTable, scratch: Path, args: argparse.Namespace) -> None:
        self.name, self.shape, self.scratch, self.args = name, INPUTS[name], scratch, args
        torch.manual_seed(0)
        self.base = trained_looking(build_model(name, 3, CLASSES.get(name, 10)), self.shape)
        self.example = torch.randn(2, *self.shape)
        self.macs = count_macs_params(self.base, self.example[:1])[0]
        self.onnx = export_onnx(self.base, self.example, scratch / f"{name.replace(':', '_')}.onnx")
        self.predictor = LatencyPredictor(self.base, self.example[:1], self.onnx, table, 1)
        self.table, self.l1 = table, create_method("l1")

    def l1_pruned(self, ratio: float, setting: str) -> nn.Module:
        plan = PrunePlan(ratio=ratio, round_to=rounding(setting))
        if setting == "auto":
            plan, _ = step_rounded(self.l1, self.base, self.example, plan, self.table,
                                   exported=self.predictor.graph.model)
        pruned = copy.deepcopy(self.base)
        self.l1.prune(pruned, self.example, plan)
        return pruned.eval()

    def row(self, target: str, setting: str, ratio: float | None, pruned: nn.Module,
            note: str = "") -> tuple[Row, nn.Module]:
        predicted = self.predictor.predict(pruned).ms
        return Row(self.name, target, setting, ratio, self.macs / count_macs_params(pruned, self.example[:1])[0],
                   self.predictor.baseline_ms / predicted, predicted, note), pruned

    def at_macs(self, factor: float, setting: str) -> tuple[Row, nn.Module]:
        """l1 at the ratio whose MACs reduction, after the rounding, is closest to the goal (with ``auto`` the
        rounding is part of every bisection step, as it is of every search trial in the pipeline)."""
        def reduction_at(ratio: float) -> float:
            return 1 - count_macs_params(self.l1_pruned(ratio, setting), self.example[:1])[0] / self.macs

        found = bisect_ratio(reduction_at, 1 - 1 / factor, high=0.9, steps=5, scan=0 if setting == "none" else 4,
                             tolerance=0.01)
        return self.row(f"macs {factor:g}x", setting, found.ratio, self.l1_pruned(found.ratio, setting))

    def at_speedup(self, speedup: float, setting: str) -> tuple[Row, nn.Module]:
        if setting == "halp":
            halp = create_method("halp")
            generator = torch.Generator().manual_seed(1)
            calib = [(torch.randn(8, *self.shape, generator=generator), torch.randint(0, 10, (8,), generator=generator))
                     for _ in range(2)]
            rounds: list[tuple[float, float]] = []  # (asked of the table, measured) per allocation
            plan, allocation = halp.allocate(self.base, self.example, PrunePlan(speedup=speedup, round_to=None),
                                             self.predictor, calib, self.measured(halp, calib, rounds))
            pruned = copy.deepcopy(self.base)
            halp.prune(pruned, self.example, plan, calib)
            gone = allocation.removed_blocks
            asked = "asked " + " → ".join(f"{a:.2f}x (measured {m:.2f}x)" for a, m in rounds)
            return self.row(f"speedup {speedup:g}x", "halp", None, pruned.eval(),
                            f"−{len(gone)} blocks ({', '.join(gone)}); {asked}" if gone else asked)
        if setting == "bound":
            return self.time_per_mac(speedup)

        def reduction_at(ratio: float) -> float:
            return 1 - self.predictor.predict(self.l1_pruned(ratio, setting)).ms / self.predictor.baseline_ms

        found = bisect_ratio(reduction_at, 1 - 1 / speedup, high=0.9, steps=5,
                             scan=0 if setting == "none" else 4, tolerance=0.01)
        return self.row(f"speedup {speedup:g}x", setting, found.ratio, self.l1_pruned(found.ratio, setting))

    def measured(self, method: PruningMethod, calib: list, rounds: list[tuple[float, float]]
                 ) -> Callable[[PrunePlan], tuple[float, float]]:
        """halp's measurement at batch 1, by 10th percentiles (as the report's speed-ups), each call kept in
        ``rounds``."""
        inputs = torch.randn(1, *self.shape, generator=torch.Generator().manual_seed(2)).numpy()
        measure = timed_against(method, self.base, self.example, self.onnx, calib, inputs, self.args.warmup,
                                self.args.repeats, self.args.threads, statistic="p10_ms")

        def recorded(plan: PrunePlan) -> tuple[float, float]:
            pruned_ms, baseline_ms = measure(plan)
            rounds.append((plan.speedup or 0.0, baseline_ms / pruned_ms))
            return pruned_ms, baseline_ms

        return recorded

    def time_per_mac(self, speedup: float) -> tuple[Row, nn.Module]:
        """Close to the most time per MAC removed that the table allows: the knapsack of ``halp`` with every channel
        worth the MACs it accounts for, so it takes the cuts that lose fewest MACs per predicted millisecond saved
        (blocks or channels) until the speed-up. A greedy, so an estimate of the ceiling of speed-up ÷ MACs, not a
        proof of it; accuracy is not considered: not a method."""
        graph = self.predictor.graph
        per_channel = macs_per_channel(graph)
        # the groups halp would score (importance_scores' keys); their values are the MACs, not an importance
        groups = importance_scores(self.base, self.example, lambda group: torch.ones(len(group[0].idxs)), graph)
        scores = {g: torch.full((graph.sizes[g],), per_channel[g]) for g in groups}
        plan, allocation = allocated_plan(self.base, self.example, PrunePlan(speedup=speedup, round_to=None),
                                          self.predictor, scores, removable_blocks(self.base, self.example))
        pruned = copy.deepcopy(self.base)
        self.l1.prune(pruned, self.example, plan)
        gone = allocation.removed_blocks
        return self.row(f"speedup {speedup:g}x", "bound", None, pruned.eval(),
                        f"−{len(gone)} blocks ({', '.join(gone)})" if gone else "")


def macs_per_channel(graph: ModelGraph) -> dict[int, float]:
    """The MACs one channel of each group accounts for: its share of every convolution reading or writing it."""
    per_channel = dict.fromkeys(graph.sizes, 0.0)
    for unit in graph.units:
        c_in, c_out, (height, width) = graph.shapes[unit.x][0], graph.shapes[unit.out][0], graph.shapes[unit.out][1:3]
        kernel = unit.kernel[0] * unit.kernel[1] * height * width
        if unit.depthwise:  # one group in and out, one filter per channel
            per_channel[graph.group_of[unit.out]] += kernel
        else:
            per_channel[graph.group_of[unit.x]] += c_out * kernel
            per_channel[graph.group_of[unit.out]] += c_in * kernel
    return per_channel


def time_nets(model: Model, nets: dict[str, nn.Module], scratch: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Baseline and every net timed interleaved, one call per batch; per net: ms (median), p10, CPU ms, speed-ups."""
    paths = {"baseline": model.onnx}
    for key, net in nets.items():
        paths[key] = export_onnx(net, model.example, scratch / f"net{len(paths)}.onnx")
    large = args.large_batch_224 if model.shape[-1] >= 224 else args.large_batch
    results: dict[str, dict] = {key: {} for key in nets}
    for batch, repeats in ((1, args.repeats), (large, args.repeats_large)):
        inputs = torch.randn(batch, *model.shape, generator=torch.Generator().manual_seed(2)).numpy()
        timing = measure_latency(paths, inputs, args.warmup, repeats, args.threads)
        base = timing["baseline"]
        for key in nets:
            t = timing[key]
            results[key][f"b{batch}"] = {"ms": t.median_ms, "p10_ms": t.p10_ms, "cpu_ms": t.cpu_ms,
                                         "speedup": base.median_ms / t.median_ms, "speedup_cpu": base.cpu_ms / t.cpu_ms,
                                         "baseline_ms": base.median_ms, "baseline_p10_ms": base.p10_ms}
    return results


def run_model(name: str, table: LatencyTable, args: argparse.Namespace, log: Callable[[str], None]
              ) -> tuple[list[Row], list[str]]:
    """The model's rows, timed, and the targets its allocations could not reach."""
    with tempfile.TemporaryDirectory(prefix="pruneflow-latency-") as folder:
        scratch = Path(folder)
        started = time.perf_counter()
        model = Model(name, table, scratch, args)
        log(f"{name}: baseline predicted {model.predictor.baseline_ms:.3f} ms ({time.perf_counter() - started:.0f} s)")
        rows, nets, unreachable = [], {}, []
        jobs = [(model.at_macs, factor, setting) for factor in args.factors for setting in args.settings]
        jobs += [(model.at_speedup, speedup, setting) for speedup in args.speedups for setting in args.speedup_settings]
        for make, target, setting in jobs:
            try:
                row, net = make(target, setting)
            except BudgetError as error:  # a target the allocation cannot reach on this table: said, not timed
                unreachable.append(f"{make.__name__.removeprefix('at_')} {target:g}x {setting}: {error}")
                log(f"{name}: {unreachable[-1]}")
                continue
            rows.append(row)
            nets[row.name] = net
            log(f"{row.name}: ratio {row.ratio if row.ratio is not None else '-'}, MACs /{row.macs_ratio:.2f}, "
                f"predicted x{row.predicted_speedup:.2f} {row.note} ({time.perf_counter() - started:.0f} s, "
                f"table +{table.measured})")
        lock = open(args.lock, "w") if args.lock else None  # noqa: SIM115 - held across the timing below
        try:
            if lock is not None:
                import fcntl

                fcntl.flock(lock, fcntl.LOCK_EX)
            measured = time_nets(model, nets, scratch, args)
        finally:
            if lock is not None:
                lock.close()
        for row in rows:
            row.measured = measured[row.name]
        log(f"{name}: timed {len(nets)} nets ({time.perf_counter() - started:.0f} s)")
    return rows, unreachable


def machine() -> str:
    return (f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; Python "
            f"{platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}")


def render(rows: list[Row], runs: dict[str, dict]) -> str:
    """The report: what was run per model (``runs``: its command and conditions), then one line per row."""
    mark = {True: "✓", False: "✗"}
    lines = [
        "# Latency: do fewer MACs mean less time, and does a speed-up target deliver it?",
        "",
        "Generated by `benchmarks/latency.py` (rewritten by every run, except the section *What this shows*; the "
        "rows come from `latency.json` beside it, where a run replaces the rows of the models it ran). "
        "Models with untrained weights and trained-looking BatchNorm (speed does not depend on the weights): "
        "CIFAR ResNet-20, ResNet-56 and MobileNetV2 at 3×32×32, torchvision ResNet-18 at 3×224×224. "
        "**MACs targets**: `l1` at the ratio bisection finds for 1.5×, 2×, 3× fewer MACs, with the "
        "rounding `round_to: auto` (every group's count raised to a multiple of the runtime's channel block at a "
        "step edge of its measured latency curve, inside every bisection step) and with `round_to` 16, 8 and none. "
        "**Speed-up targets**: `halp` (the latency knapsack: channels and whole residual blocks, each allocation "
        "timed and the ask corrected until it measures at the target; the note lists the rounds), `bound` (the same "
        "knapsack with every channel valued by its MACs: the most time per MAC removed, accuracy ignored; a greedy "
        "estimate of the efficiency's ceiling) "
        "and `l1` with "
        "a rounding at the ratio whose speed-up "
        "*predicted* on the latency table meets 1.5×, 2×, 3×. Every net of a model and its baseline are timed "
        "interleaved in one `pruneflow.export.measure_latency` call per batch (ONNX Runtime, CPU provider).",
        "",
        "## Regenerate",
        "",
        "```bash",
        ".venv/bin/python benchmarks/latency.py --lock /work/notes/timing.lock     # every model, target and setting",
        "```",
        "",
        "The rows below came from these runs (each model's nets timed in one process, interleaved):",
        "",
    ]
    for model, run in runs.items():
        lines.append(f"- {model}: `{run['command']}`: {run['machine']}; {run['threads']} threads, warm-up "
                     f"{run['warmup']}, {run['repeats']} timed runs per net at batch 1 and {run['repeats_large']} at "
                     f"batch {run['large_batch']}; 1-minute load {run['load_before']:.2f} before, "
                     f"{run['load_after']:.2f} after; {run['minutes']:.1f} min ({run['cpu_minutes']:.1f} min CPU)."
                     + "".join(f" Out of reach: {line}." for line in run.get("unreachable", [])))
    lines += [
        "",
        "## Results",
        "",
        "MACs ratio = baseline MACs ÷ pruned MACs. Speed-up = baseline ÷ pruned in the same interleaved call: wall "
        "time, 10th percentile of the runs (on a shared machine others' load only adds time; the medians, in "
        "`latency.json`, carry that load), and the process's median CPU time per run in brackets. b1 ms: the pruned "
        "net's 10th percentile. Efficiency = wall speed-up ÷ MACs ratio. Predicted: "
        "the speed-up the latency table predicts at batch 1. Pred. error: the predicted latency, put on the scale of "
        "the baseline timed in the same call, against the measured 10th percentile (the table's times are 10th "
        "percentiles): measured ÷ predicted speed-up − 1, so a machine faster or slower today than when its table "
        "was measured does not count as error. Goals: at 2× fewer MACs with the rounding "
        "that is the default (auto), "
        f"efficiency ≥ {GOALS['b1']} at batch 1 and ≥ {GOALS['large']} at the large batch (ResNet-20/56); asked for "
        f"a speed-up s, a measured batch-1 speed-up ≥ {SPEEDUP_GOAL} s.",
        "",
        "| model | target | setting | l1 ratio | MACs ratio | predicted b1 | b1 ms | b1 speed-up | b1 eff. | "
        "large speed-up | large eff. | pred. error | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b1, large = r.measured["b1"], next(v for k, v in r.measured.items() if k != "b1")
        for timing in (b1, large):  # the least disturbed runs: on a shared machine others' load only adds time
            timing["speedup"] = timing["baseline_p10_ms"] / timing["p10_ms"]
        eff1, eff_large = b1["speedup"] / r.macs_ratio, large["speedup"] / r.macs_ratio
        goal = ""
        if r.target == "macs 2x" and r.setting == "auto" and r.model in ("resnet20", "resnet56"):
            goal = f"{mark[eff1 >= GOALS['b1']]} / {mark[eff_large >= GOALS['large']]}"
        elif r.target.startswith("speedup"):
            asked = float(r.target.split()[1].rstrip("x"))
            goal = mark[b1["speedup"] >= SPEEDUP_GOAL * asked]
        error = 100 * (b1["speedup"] / r.predicted_speedup - 1)
        lines.append(
            f"| {r.model} | {r.target} | {r.setting}{' ' + r.note if r.note else ''} | "
            f"{'' if r.ratio is None else f'{r.ratio:.3f}'} | {r.macs_ratio:.2f} | {r.predicted_speedup:.2f}× | "
            f"{b1['p10_ms']:.3f} | {b1['speedup']:.2f} ({b1['speedup_cpu']:.2f}) | {eff1:.2f} | "
            f"{large['speedup']:.2f} ({large['speedup_cpu']:.2f}) | {eff_large:.2f} | {error:+.1f} % | {goal} |")
    baselines = {r.model: (r.measured["b1"]["baseline_p10_ms"],
                           next(v["baseline_p10_ms"] for k, v in r.measured.items() if k != "b1")) for r in rows}
    lines += ["", "Baselines (10th percentile ms, batch 1 / large batch): "
              + "; ".join(f"{m} {a:.3f} / {b:.2f}" for m, (a, b) in baselines.items()) + "."]
    lines += ["", "Accuracy at equal measured latency (halp against uniform `l1` with `round_to` 16 after the same "
              "CIFAR-10 fine-tune, from a trained baseline) is `benchmarks/latency_accuracy.py`'s: "
              "[latency-accuracy.md](latency-accuracy.md)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        write_report(args, args.out.with_suffix(".json"))
        return
    load_before = os.getloadavg()[0]
    if load_before > args.max_load and not args.force:
        raise SystemExit(f"1-minute load average {load_before:.2f} > --max-load {args.max_load}: timings would be "
                         "noise; wait for a quiet machine or pass --force")
    torch.set_num_threads(args.threads)
    table = LatencyTable(args.table, threads=args.threads)
    command = shlex.join([".venv/bin/python", "benchmarks/latency.py", *(argv if argv is not None else sys.argv[1:])])
    store = args.out.with_suffix(".json")
    started = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {line}", flush=True)

    for name in args.models:
        load, began, began_cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
        rows, unreachable = run_model(name, table, args, log)
        with file_lock(ROOT / ".cache" / "latency-report.lock"):  # runs of other models may write it meanwhile
            write_report(args, store, name, rows, {
                "command": command, "machine": machine(), "threads": args.threads, "warmup": args.warmup,
                "repeats": args.repeats, "repeats_large": args.repeats_large,
                "large_batch": args.large_batch_224 if INPUTS[name][-1] >= 224 else args.large_batch,
                "load_before": load, "load_after": os.getloadavg()[0], "minutes": (time.perf_counter() - began) / 60,
                "cpu_minutes": (time.process_time() - began_cpu) / 60, "unreachable": unreachable})
        log(f"wrote {args.out} and {store.name}")


def write_report(args: argparse.Namespace, store: Path, name: str | None = None, rows: list[Row] | None = None,
                 run: dict | None = None) -> None:
    """Replace ``name``'s rows and run in the store (none: keep the store as it is), and render the report from
    every model's."""
    data = json.loads(store.read_text()) if store.is_file() else {"runs": {}, "rows": []}
    if name is not None:
        data["rows"] = [r for r in data["rows"] if r["model"] != name] + [asdict(r) for r in rows or []]
        data["runs"][name] = run
        order = {model: index for index, model in enumerate(INPUTS)}
        data["rows"].sort(key=lambda r: order[r["model"]])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(data, indent=1) + "\n")
    analysis = args.out.read_text().partition(ANALYSIS)[2] if args.out.is_file() else ""
    runs = {model: data["runs"][model] for model in INPUTS if model in data["runs"]}
    report = render([Row(**r) for r in data["rows"]], runs)
    args.out.write_text(report + (f"\n{ANALYSIS}{analysis}" if analysis else ""))


if __name__ == "__main__":
    main()
