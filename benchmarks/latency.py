"""Do fewer MACs mean less time? CIFAR ResNet-20/56 pruned by l1 to 1.5x, 2x and 3x fewer MACs, timed.

For each model (untrained weights: speed does not depend on them) and each ``round_to`` (16, 8, and none), the
l1 ratio that removes 1 - 1/x of the MACs is found by bisection (``pruneflow.targeting``), the net is pruned
at it and exported to ONNX, and ``pruneflow.export.measure_latency`` times baseline and pruned, interleaved
on the same random 3x32x32 input, in ONNX Runtime (CPU) and in PyTorch eager, at batch 1 and batch 32.
The table sets the measured speed-up beside the MACs ratio; the goal is speed-up >= 0.8 x MACs ratio.

Timings are only meaningful on a quiet machine: the load average is recorded before and after, and the run
refuses to start above ``--max-load`` unless ``--force``.

    .venv/bin/python benchmarks/latency.py                  # writes docs/benchmarks/latency.md (~5 min, 2 cores)
    .venv/bin/python benchmarks/latency.py --repeats 10 --repeats-large 3 --out /tmp/latency.md --force   # smoke
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pruneflow.export import export_onnx, measure_latency  # noqa: E402
from pruneflow.methods import create_method  # noqa: E402
from pruneflow.metrics import count_macs_params  # noqa: E402
from pruneflow.models import build_model  # noqa: E402
from pruneflow.plan import PrunePlan  # noqa: E402
from pruneflow.targeting import ratio_for_macs_reduction  # noqa: E402

GOAL = 0.8  # speed-up must reach this share of the MACs ratio
ANALYSIS = "## What this shows"  # a rerun rewrites the file above this heading and keeps what follows it
SHAPE = (3, 32, 32)


@dataclass
class Row:
    model: str
    round_to: int | None
    factor: float            # the MACs reduction asked for (1.5x, 2x, 3x)
    ratio: float             # the l1 ratio bisection found
    macs_ratio: float        # baseline MACs / pruned MACs, as counted
    speedups: dict[str, float]   # "ort_b1", "ort_b32", "eager_b1", "eager_b32"
    pruned_ms: dict[str, float]
    baseline_ms: dict[str, float]

    def efficiency(self, key: str) -> float:
        return self.speedups[key] / self.macs_ratio


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    parser.add_argument("--factors", nargs="+", type=float, default=[1.5, 2.0, 3.0], help="MACs reduction, x")
    parser.add_argument("--round-to", nargs="+", type=int, default=[16, 8, 1], help="1 means no rounding")
    parser.add_argument("--large-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=100, help="timed runs per file at batch 1")
    parser.add_argument("--repeats-large", type=int, default=30, help="timed runs per file at the large batch")
    parser.add_argument("--max-load", type=float, default=0.75 * (os.cpu_count() or 2),
                        help="refuse to start above this 1-minute load (default: 0.75 per core)")
    parser.add_argument("--force", action="store_true", help="run even on a busy machine (numbers are then noise)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "latency.md")
    return parser.parse_args(argv)


def timings(base: torch.nn.Module, pruned: torch.nn.Module, base_onnx: Path, pruned_onnx: Path,
            args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """Baseline and pruned medians (ms) per runtime and batch. ONNX Runtime and PyTorch are timed in separate
    calls: each interleaves baseline with pruned, and neither's thread pool competes with the other's."""
    torch.manual_seed(0)
    batches = {"b1": (torch.randn(1, *SHAPE).numpy(), args.repeats),
               f"b{args.large_batch}": (torch.randn(args.large_batch, *SHAPE).numpy(), args.repeats_large)}
    base_ms, pruned_ms = {}, {}
    for suffix, (inputs, repeats) in batches.items():
        for runtime, targets in (("ort", {"base": base_onnx, "pruned": pruned_onnx}),
                                 ("eager", {"base": base, "pruned": pruned})):
            timing = measure_latency(targets, inputs, args.warmup, repeats, args.threads)
            base_ms[f"{runtime}_{suffix}"] = timing["base"].median_ms
            pruned_ms[f"{runtime}_{suffix}"] = timing["pruned"].median_ms
    return base_ms, pruned_ms


def run(args: argparse.Namespace, log) -> list[Row]:
    rows = []
    method = create_method("l1")
    example = torch.zeros(2, *SHAPE)
    with tempfile.TemporaryDirectory(prefix="pruneflow-latency-") as scratch:
        for name in args.models:
            torch.manual_seed(0)
            base = build_model(name, SHAPE[0], 10).eval()
            base_macs = count_macs_params(base, example[:1])[0]
            base_onnx = export_onnx(base, example, Path(scratch) / f"{name}.onnx")
            for round_to in [None if r == 1 else r for r in args.round_to]:
                for factor in args.factors:
                    found = ratio_for_macs_reduction(method, base, example, 1 - 1 / factor, round_to=round_to)
                    pruned = copy.deepcopy(base)
                    method.prune(pruned, example, PrunePlan(ratio=found.ratio, round_to=round_to))
                    pruned.eval()
                    macs_ratio = base_macs / count_macs_params(pruned, example[:1])[0]
                    pruned_onnx = export_onnx(pruned, example, Path(scratch) / f"{name}-{round_to}-{factor}.onnx")
                    base_ms, pruned_ms = timings(base, pruned, base_onnx, pruned_onnx, args)
                    row = Row(name, round_to, factor, found.ratio, macs_ratio,
                              {k: base_ms[k] / pruned_ms[k] for k in base_ms}, pruned_ms, base_ms)
                    rows.append(row)
                    log(f"{name} round_to={round_to} {factor}x: ratio {found.ratio:.3f}, MACs /{macs_ratio:.2f}, "
                        + ", ".join(f"{k} x{v:.2f}" for k, v in row.speedups.items()))
    return rows


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, "
            f"torch {torch.__version__}, onnxruntime {ort.__version__}")


def render(rows: list[Row], args: argparse.Namespace, command: str, loads: tuple[float, float], seconds: float) -> str:
    large = f"b{args.large_batch}"
    mark = {True: "✓", False: "✗"}
    lines = [
        "# Latency: do fewer MACs mean less time?",
        "",
        "Generated by `benchmarks/latency.py` (rewritten by every run, except the section *What this shows*). "
        "CIFAR ResNet-20/56",
        "(3×32×32, untrained weights), pruned by `l1` at the ratio bisection finds for 1.5×, 2× and 3× fewer MACs,",
        "with Torch-Pruning's channel rounding to multiples of 16 and 8, and without it. Baseline and pruned are timed",
        "interleaved on the same random input by `pruneflow.export.measure_latency`: ONNX Runtime (CPU execution",
        "provider) and, in separate calls, PyTorch eager; medians of one run.",
        "",
        "## Regenerate",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Machine: {machine()}. {args.threads} threads; warm-up {args.warmup}; {args.repeats} timed runs per file at",
        f"batch 1, {args.repeats_large} at batch {args.large_batch}. 1-minute load average {loads[0]:.2f} before, "
        f"{loads[1]:.2f} after; the run took {seconds / 60:.1f} min.",
        "",
        "## Baselines (ms, median)",
        "",
        f"| model | MACs (M) | ORT b1 | ORT {large} | eager b1 | eager {large} |",
        "|---|---|---|---|---|---|",
    ]
    for name in args.models:
        of_model = [r for r in rows if r.model == name]
        median = {k: statistics.median(r.baseline_ms[k] for r in of_model) for k in of_model[0].baseline_ms}
        macs = count_macs_params(build_model(name, SHAPE[0], 10).eval(), torch.zeros(1, *SHAPE))[0]
        lines.append(f"| {name} | {macs / 1e6:.1f} | {median['ort_b1']:.3f} | {median[f'ort_{large}']:.2f} | "
                     f"{median['eager_b1']:.3f} | {median[f'eager_{large}']:.2f} |")
    lines += [
        "",
        "## Pruned: MACs ratio vs measured speed-up",
        "",
        "MACs ratio = baseline MACs ÷ pruned MACs (counted); speed-up = baseline ms ÷ pruned ms (same call);",
        f"efficiency = speed-up ÷ MACs ratio. Goal: ORT speed-up ≥ {GOAL} × MACs ratio (efficiency ≥ {GOAL}).",
        "",
        f"| model | round_to | target | l1 ratio | MACs ratio | ORT b1 ms | ORT b1 speed-up | ORT {large} speed-up | "
        f"eager b1 speed-up | eager {large} speed-up | efficiency b1 / {large} | goal b1 / {large} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eff1, eff_large = r.efficiency("ort_b1"), r.efficiency(f"ort_{large}")
        lines.append(
            f"| {r.model} | {r.round_to or 'none'} | {r.factor:g}× | {r.ratio:.3f} | {r.macs_ratio:.2f} | "
            f"{r.pruned_ms['ort_b1']:.3f} | {r.speedups['ort_b1']:.2f} | {r.speedups[f'ort_{large}']:.2f} | "
            f"{r.speedups['eager_b1']:.2f} | {r.speedups[f'eager_{large}']:.2f} | {eff1:.2f} / {eff_large:.2f} | "
            f"{mark[eff1 >= GOAL]} / {mark[eff_large >= GOAL]} |")
    met = sum(r.efficiency(k) >= GOAL for r in rows for k in ("ort_b1", f"ort_{large}"))
    lines += ["", f"Goal met in {met} of {2 * len(rows)} (row, batch) cells."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    if load_before > args.max_load and not args.force:
        raise SystemExit(f"1-minute load average {load_before:.2f} > --max-load {args.max_load}: timings would be "
                         "noise; wait for a quiet machine or pass --force")
    started = time.perf_counter()
    rows = run(args, lambda line: print(line, flush=True))
    seconds = time.perf_counter() - started
    command = shlex.join([".venv/bin/python", "benchmarks/latency.py", *(argv if argv is not None else sys.argv[1:])])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    analysis = args.out.read_text().partition(ANALYSIS)[2] if args.out.is_file() else ""
    report = render(rows, args, command, (load_before, os.getloadavg()[0]), seconds)
    args.out.write_text(report + (f"\n{ANALYSIS}{analysis}" if analysis else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
