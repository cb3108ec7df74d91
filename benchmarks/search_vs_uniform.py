"""Does searching the pruning ratios beat one uniform ratio? And what does the trial pruner save?

On the CIFAR-10 JPEG folder with a ResNet-20 baseline, every arm prunes to the same MACs target and gets
the same final fine-tune budget:

- ``uniform l1``: one ratio, bisected (``pruneflow.targeting``) so that ≈ the target MACs are gone;
- ``l1 per_stage``: the pipeline's Optuna search with one ratio per stage, median pruner on;
- ``l1 per_stage, no pruner``: the same search with ``pruner: none`` (same seed), to price the pruner;
- ``layer_entropy``: the search over its global ratio (it allocates per-layer ratios itself).

Searches score trials on a validation split after ``--trial-epochs`` of fine-tuning; the chosen trial is
then pruned again, fine-tuned for ``--finetune-epochs`` and scored on the test set. Everything goes
through ``pruneflow.stages`` (the pipeline's own search, prune, retrain and evaluate).

    .venv/bin/python benchmarks/search_vs_uniform.py                 # the documented run
    .venv/bin/python benchmarks/search_vs_uniform.py --subset 512 --epochs 1 --trials 2 --out .cache/search-smoke \\
        --doc .cache/search-smoke/report.md                           # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
import torch  # noqa: E402

from pruneflow import stages  # noqa: E402
from pruneflow.checkpoint import load_model  # noqa: E402
from pruneflow.config import PipelineConfig  # noqa: E402
from pruneflow.layout import ProjectLayout, ProjectRun  # noqa: E402
from pruneflow.methods import create_method  # noqa: E402
from pruneflow.targeting import ratio_for_macs_reduction  # noqa: E402
from pruneflow.versioning import DataVersion  # noqa: E402

ARMS = {  # name -> (method, search overrides or None for a bisected uniform ratio)
    "uniform l1": ("l1", None),
    "l1 per_stage": ("l1", {"space": "per_stage", "pruner": "median"}),
    "l1 per_stage, no pruner": ("l1", {"space": "per_stage", "pruner": "none"}),
    "layer_entropy": ("layer_entropy", {"space": "global", "pruner": "median"}),
}


ANALYSIS = "## What this shows"  # a rerun rewrites the report above this heading and keeps what follows


def log(message: str, _start=[time.perf_counter()]) -> None:  # noqa: B006 (the run's start, fixed once)
    print(f"[{(time.perf_counter() - _start[0]) / 60:6.1f} min] {message}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".cache/cifar10-jpg/cifar10", help="image folder with train/ and test/")
    parser.add_argument("--out", default=".cache/bench-search")
    parser.add_argument("--doc", default="docs/benchmarks/search.md")
    parser.add_argument("--subset", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=10, help="baseline epochs")
    parser.add_argument("--target", type=float, default=0.5, help="MACs reduction every arm must reach")
    parser.add_argument("--trials", type=int, default=6, help="trials per search")
    parser.add_argument("--trial-epochs", type=int, default=2, help="fine-tune epochs inside each trial")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="final fine-tune of every arm")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def config(args: argparse.Namespace, method: str, search: dict) -> PipelineConfig:
    return PipelineConfig(
        project={"seed": args.seed},
        model={"name": "resnet20"},
        data={"dataset": "imagefolder", "path": str(Path(args.data).resolve()), "subset": args.subset,
              "augment": "crop_flip", "batch_size": 128, "val_fraction": 0.1},
        methods={method: {}},
        train={"epochs": args.epochs, "lr": 0.1},
        retrain={"epochs": args.finetune_epochs, "lr": 0.01},
        search={"n_trials": args.trials, "finetune_epochs": args.trial_epochs, "ratio_low": 0.1, "ratio_high": 0.8,
                "target": {"metric": "macs_reduction", "value": args.target}, **search},
        prune={"round_to": 8},
        evaluate={"latency_repeats": 100},
    )


def run_arm(args: argparse.Namespace, name: str, baseline: Path, out: Path) -> dict:
    """One arm through the pipeline's stages, in ``<out>/<arm>/<method>/``."""
    method, search = ARMS[name]
    cfg = config(args, method, {**(search or {}), "storage": f"sqlite:///{(out / 'optuna.db').resolve()}"})
    start = time.perf_counter()
    if search is None:  # the uniform arm: its bisected ratio, as a fixed prune.ratio
        model, spec, _ = load_model(baseline / "model.pt")
        cfg.prune.ratio = ratio_for_macs_reduction(create_method(method), model, spec.example_inputs(), args.target,
                                                   round_to=cfg.prune.round_to, scan=8).ratio
    run = ProjectRun(ProjectLayout(out, cfg), DataVersion(Path(cfg.data.path), "cifar10-jpg"), baseline,
                     out / name.replace(" ", "_").replace(",", "")).method(method)
    chosen = stages.search_ratio(run, log=log)
    search_info = {"trials": 0, "pruned": 0, "epochs": 0}
    if chosen.searched:
        trials = optuna.load_study(study_name=chosen.study_name, storage=cfg.search.storage).trials
        search_info = {"trials": len(trials), "pruned": chosen.pruned_trials,
                       "epochs": sum(t.user_attrs.get("epochs_run", 0) for t in trials),
                       "epochs_saved": chosen.finetune_epochs_saved}
    search_seconds = time.perf_counter() - start
    stages.prune_model(run, log=log)
    stages.retrain_model(run, log=log)
    metrics = stages.evaluate_model(run, log=log)
    return {"arm": name, "ratio": chosen.plan.ratio, "layer_ratios": chosen.plan.layer_ratios,
            "search_seconds": search_seconds, **search_info, **metrics}


def machine() -> str:
    """Where training ran (the GPU, if any) and the CPU that pruned, exported and timed."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    gpu = f"training on {torch.cuda.get_device_name()}, " if torch.cuda.is_available() else "training on the CPU, "
    return f"{gpu}{cpu} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def render(args: argparse.Namespace, baseline: dict, rows: list[dict], seconds: float) -> str:
    command = ".venv/bin/python benchmarks/search_vs_uniform.py " + shlex.join(sys.argv[1:])
    lines = [
        "# Search vs uniform ratios (CIFAR-10, ResNet-20)", "",
        f"Regenerate: `{command.strip()}` (total {seconds / 60:.1f} min; {machine()}).", "",
        f"Budget: {args.subset} training images of the CIFAR-10 JPEG folder (10 % of them the validation split the"
        f" search scores on), full 10k test set; baseline {args.epochs} epochs; every arm pruned to ≥ "
        f"{args.target:.0%} fewer MACs (round_to 8) and fine-tuned {args.finetune_epochs} epochs; each search "
        f"{args.trials} trials of {args.trial_epochs} fine-tune epochs. Baseline test accuracy "
        f"{baseline['accuracy']:.2f} %. Short schedules on JPEG CIFAR: compare arms with each other, not with papers.",
        "", "| arm | test acc. | Δ vs baseline | MACs −% | params −% | search trials (pruned) | search fine-tune epochs |"
        " search time | latency ms (×) |", "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['arm']} | {row['accuracy']:.2f} | {-row['accuracy_drop']:+.2f} | {row['macs_reduction']:.1%} | "
            f"{row['params_reduction']:.1%} | {row['trials']} ({row['pruned']}) | {row['epochs']} | "
            f"{row['search_seconds'] / 60:.1f} min | {row['latency_ms']:.3f} (×{row['speedup']:.2f}) |")
    lines += ["", "Chosen ratios (layers sharing a searched ratio listed together):", ""]
    for row in rows:
        shared: dict[float, list[str]] = {}
        for layer, ratio in row["layer_ratios"].items():
            shared.setdefault(round(ratio, 3), []).append(layer)
        lines.append(f"- {row['arm']}: " + ("; ".join(f"{r:.2f} for {', '.join(names)}" for r, names in shared.items())
                                           or f"global ratio {row['ratio']:.3f}"))
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    baseline = out / "baseline"
    if not (baseline / "metrics.json").is_file():
        log("training the baseline")
        cfg = config(args, "l1", {})
        data = DataVersion(Path(cfg.data.path), "cifar10-jpg")
        stages.train_baseline(ProjectRun(ProjectLayout(out, cfg), data, baseline, out), log=log)
    base_metrics = stages.read_json(baseline / "metrics.json")
    rows = []
    for name in ARMS:
        log(f"arm {name}")
        rows.append(run_arm(args, name, baseline, out))
        (out / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    analysis = doc.read_text().partition(ANALYSIS)[2] if doc.is_file() else ""  # hand-written: kept
    doc.write_text(render(args, base_metrics, rows, time.perf_counter() - start)
                   + (f"\n{ANALYSIS}{analysis}" if analysis else ""))
    log(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
