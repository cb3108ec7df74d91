"""How much faster do method chains finish on more worker processes? A 4-method pipeline, timed end to end.

Each variant is one ``pruneflow run`` (a fresh process, so a cluster's start-up is counted) on a fresh project
that starts from the same trained baseline (copied in, so only the method chains and their evaluation differ):

- ``in process``: ``project.max_parallel_methods: 1``, the chains one after another in the pipeline's process;
- ``N workers``: a local Dask cluster of N worker processes (``max_parallel_methods: N``);
- ``threads (main)``: the code of git ref ``--threads-ref`` (the pipeline before the cluster: chains as threads
  of one process, two at a time), extracted with ``git archive`` and run the same way.

The variants run interleaved, round after round, in a rotating order, so a machine shared with other work slows
them alike; wall time and CPU time (of the whole process tree) are recorded per run. Each run's measured
latency efficiency (``speedup_efficiency``, the methods' mean) shows whether the chains disturbed the timing.

    flock /work/notes/timing.lock .venv/bin/python benchmarks/scaling.py        # writes docs/benchmarks/scaling.md
    .venv/bin/python benchmarks/scaling.py --rounds 1 --variants 1 2 --out /tmp/scaling.md   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from tabulate import tabulate

ROOT = Path(__file__).resolve().parent.parent
ANALYSIS = "## What this shows"  # a rerun rewrites the file above this heading and keeps what follows it
PARAMS = {
    "methods": {"l1": {}, "random": {}, "taylor": {}, "fpgm": {}},  # none changes the baseline (no training hook)
    "train": {"epochs": 2},
    # chains with some training in them (4 trials of 3 fine-tune epochs, 30 retrain epochs: ~40 s of compute
    # each on digits), so the benchmark weighs running chains side by side, not only the start-up of workers
    "search": {"n_trials": 4, "finetune_epochs": 3, "ratio_low": 0.3, "ratio_high": 0.6,
               "target": {"metric": "macs_reduction", "value": 0.3}},
    "retrain": {"epochs": 30, "lr": 0.01},
    "evaluate": {"latency_repeats": 50, "latency_warmup": 5},
}


START = time.perf_counter()  # the run's start, for log's elapsed time


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


def run_pipeline(source: Path, project: Path, overrides: list[str]) -> dict[str, Any]:
    """One ``pruneflow run`` of ``source``'s code on ``project``: wall and CPU seconds, the methods' efficiency."""
    env = {**os.environ, "PYTHONPATH": str(source), "PREFECT_LOGGING_LEVEL": "WARNING"}
    # the code of the thread-based pipeline has flows/ at the top level; this checkout installs it as pruneflow.flows
    module = "pruneflow.flows.cli" if source == ROOT else "flows.cli"
    command = [sys.executable, "-m", module, "run", "--params", str(project / "params.yaml"),
               *[arg for override in overrides for arg in ("-S", override)]]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"error: {shlex.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    metrics = [json.loads(path.read_text()) for path in project.glob("runs/*/*/metrics.json")
               if path.parent.parent.name != "baselines"]  # the methods' evaluations, runs/<parent run>/<method>
    return {"wall": wall, "cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "efficiency": statistics.mean(m["speedup_efficiency"] for m in metrics),
            "latency_ms": statistics.mean(m["latency_ms"] for m in metrics), "methods": len(metrics)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["threads", "1", "2", "4"],
                        help="'threads' (the --threads-ref code) and numbers of worker processes (1: in process)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads-ref", default="42a3096^",
                        help="git ref of the thread-based pipeline (the commit before the Dask cluster)")
    parser.add_argument("--retrain-epochs", type=int, default=PARAMS["retrain"]["epochs"],
                        help="retrain epochs per chain: the chains' length, against which a cluster's start-up weighs")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "scaling.md"))
    args = parser.parse_args()
    params = {**PARAMS, "retrain": {**PARAMS["retrain"], "epochs": args.retrain_epochs}}
    scratch = Path(tempfile.mkdtemp(prefix="pruneflow-scaling-"))
    sources = {"cluster": ROOT}
    if "threads" in args.variants:
        sources["threads"] = scratch / "threads-src"
        sources["threads"].mkdir()
        archive = subprocess.run(["git", "archive", args.threads_ref], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(sources["threads"])], input=archive.stdout, check=True)
    template = scratch / "template"
    template.mkdir()
    (template / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log(f"training the baseline once in {template}")
    run_pipeline(ROOT, template, ["project.max_parallel_methods=1", "methods={l1: {}}", "prune.ratio=0.3"])

    def fresh(name: str) -> Path:
        project = scratch / name
        shutil.rmtree(project, ignore_errors=True)
        project.mkdir()
        shutil.copy(template / "params.yaml", project)
        shutil.copytree(template / "runs" / "baselines", project / "runs" / "baselines")
        return project

    load = [os.getloadavg()[0]]  # a machine shared with other work: recorded, since it slows every variant
    results: dict[str, list[dict[str, Any]]] = {variant: [] for variant in args.variants}
    order = list(args.variants)
    for round_ in range(args.rounds):
        for variant in order:
            source = sources["threads" if variant == "threads" else "cluster"]
            overrides = ["project.max_parallel_methods=2"] if variant == "threads" else \
                [f"project.max_parallel_methods={variant}"]
            result = run_pipeline(source, fresh(f"{variant}-{round_}"), overrides)
            results[variant].append(result)
            log(f"round {round_ + 1}: {variant}: {result['wall']:.1f} s wall, {result['cpu']:.1f} s CPU, "
                f"efficiency {result['efficiency']:.2f}")
        order = order[1:] + order[:1]
    shutil.rmtree(scratch, ignore_errors=True)
    load.append(os.getloadavg()[0])
    out = Path(args.out)
    analysis = out.read_text().partition(ANALYSIS)[2] if out.is_file() else ""
    out.write_text(report(args, params, results, load) + (f"\n{ANALYSIS}{analysis}" if analysis else ""))
    log(f"wrote {args.out}")


def report(args: argparse.Namespace, params: dict[str, Any], results: dict[str, list[dict[str, Any]]],
           load: list[float]) -> str:
    def mean_std(values: list[float], digits: int = 1) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"

    serial = statistics.mean(r["wall"] for r in results["1"]) if "1" in results else None
    names = {"threads": "threads (before the cluster, 2 chains)", "1": "in process (1 chain at a time)"}
    rows = []
    for variant, runs in results.items():
        wall = [r["wall"] for r in runs]
        rows.append([names.get(variant, f"{variant} worker processes"), mean_std(wall),
                     mean_std([r["cpu"] for r in runs]), f"{statistics.mean(wall) / serial:.2f}" if serial else "—",
                     mean_std([r["efficiency"] for r in runs], 2), mean_std([r["latency_ms"] for r in runs], 3)])
    table = tabulate(rows, ["variant", "wall (s)", "CPU (s)", "wall vs in process", "latency efficiency",
                            "latency (ms)"], tablefmt="github", disable_numparse=True)
    return "\n".join([
        "# Method chains on 1, 2 and 4 worker processes",
        "",
        "Generated by `benchmarks/scaling.py`; rerun it to regenerate this file.",
        "",
        "```bash",
        shlex.join(["flock", "/work/notes/timing.lock", ".venv/bin/python", "benchmarks/scaling.py", *sys.argv[1:]]),
        "```",
        "",
        f"- Pipeline: digits, `small_cnn`, methods {', '.join(params['methods'])}; search "
        f"{params['search']['n_trials']} trials of {params['search']['finetune_epochs']} fine-tune epoch(s), retrain "
        f"{params['retrain']['epochs']} epochs; every run starts from the same baseline (copied in), in a fresh "
        "project.",
        f"- Machine: {platform.platform()}, {os.cpu_count()} cores; {args.rounds} round(s), the variants interleaved "
        "in a rotating order; mean ± std over the rounds. Wall time is the whole `pruneflow run` (Prefect's "
        "temporary server, data versioning, a cluster's start-up included); CPU time is its process tree's. "
        f"Load average (1 min) at the start and the end: {load[0]:.1f}, {load[1]:.1f}.",
        "- Latency efficiency: the methods' mean `speedup_efficiency` (measured speed-up × MACs ratio) of each run.",
        "",
        table,
        "",
    ])


if __name__ == "__main__":
    main()
