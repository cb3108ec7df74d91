"""Does searching the pruning ratios beat one uniform ratio, from a trained baseline? (#13, item 5)

Every arm prunes the same trained baseline to the same MACs target (``--target``) and is retrained for the same
``--finetune-epochs`` (with distillation from the baseline when ``--distill`` > 0), over ``--seeds``:

- ``uniform l1``: one ratio, bisected (``pruneflow.targeting``) so that ≈ the target MACs are gone;
- ``l1 <space>, finetune``: the pipeline's Optuna search, ``--trials`` trials each scored after ``--trial-epochs``
  of fine-tuning (``search.proxy: finetune``), for ``per_resolution`` and ``per_layer`` spaces;
- ``l1 <space>, adaptive_bn``: the same search with ``--bn-trials`` trials scored by adaptive BN, then the
  ``--top-k`` best fine-tuned for ``--trial-epochs`` (``search.proxy: adaptive_bn``);
- ``layer_entropy``: the search over its global ratio (it allocates per-layer ratios itself).

Everything goes through ``pruneflow.stages`` (the pipeline's own baseline, search, prune, retrain and
evaluate). The baseline is ``--checkpoint`` (e.g. the trained ResNet-56 ``../shared/models/resnet56-cifar10jpg.pt``,
through ``baseline.checkpoint``) or, without one, trained for ``--epochs`` once and shared by all seeds. The
report gives each arm's test accuracy as mean ± std over the seeds, its difference to uniform l1 (paired by
seed), MACs, measured latency, search wall time and candidates judged.

The full run needs a GPU (hours of training per seed on a CPU):

    .venv/bin/python benchmarks/search_vs_uniform.py --model resnet56 \\
        --checkpoint ../shared/models/resnet56-cifar10jpg.pt --mean 0.4914 0.4822 0.4465 --std 0.2470 0.2435 0.2616
    .venv/bin/python benchmarks/search_vs_uniform.py --model resnet20 --epochs 160   # ResNet-20 trained here

``--quick`` runs every arm end to end in minutes on a CPU (a few images per class, one seed, tiny budgets): it
checks the script, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from pruneflow import stages  # noqa: E402
from pruneflow.checkpoint import load_model  # noqa: E402
from pruneflow.config import PipelineConfig  # noqa: E402
from pruneflow.latency.table import cpu_model  # noqa: E402
from pruneflow.layout import ProjectLayout, ProjectRun  # noqa: E402
from pruneflow.methods import create_method  # noqa: E402
from pruneflow.targeting import ratio_for_macs_reduction  # noqa: E402
from pruneflow.versioning import DataVersion  # noqa: E402

ARMS = {  # name -> (method, search overrides or None for a bisected uniform ratio)
    "uniform l1": ("l1", None),
    "l1 per_resolution, finetune": ("l1", {"space": "per_resolution", "proxy": "finetune"}),
    "l1 per_resolution, adaptive_bn": ("l1", {"space": "per_resolution", "proxy": "adaptive_bn"}),
    "l1 per_layer, finetune": ("l1", {"space": "per_layer", "proxy": "finetune"}),
    "l1 per_layer, adaptive_bn": ("l1", {"space": "per_layer", "proxy": "adaptive_bn"}),
    "layer_entropy": ("layer_entropy", {"space": "global", "proxy": "finetune"}),
}
QUICK = {"subset": None, "epochs": 1, "trials": 2, "bn_trials": 4, "top_k": 2, "trial_epochs": 1,
         "finetune_epochs": 1, "seeds": [0]}
QUICK_IMAGES = {"train": 40, "test": 10}  # per class, in the --quick image folder

ANALYSIS = "## What this shows"  # a rerun rewrites the report above this heading and keeps what follows


START = time.perf_counter()  # the run's start, for log's elapsed time


def log(message: str) -> None:
    print(f"[{(time.perf_counter() - START) / 60:6.1f} min] {message}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".cache/cifar10-jpg/cifar10", help="image folder with train/ and test/")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--checkpoint", help="a trained baseline (state_dict or model file); else one is trained")
    parser.add_argument("--mean", type=float, nargs="+", help="the checkpoint's input normalisation")
    parser.add_argument("--std", type=float, nargs="+")
    parser.add_argument("--out", help="default: .cache/bench-search (--quick: .cache/bench-search-quick)")
    parser.add_argument("--doc", help="default: docs/benchmarks/search.md (--quick: <out>/search.md)")
    parser.add_argument("--subset", type=int, help="training images used (default: all)")
    parser.add_argument("--epochs", type=int, default=160, help="baseline epochs, without --checkpoint")
    parser.add_argument("--target", type=float, default=0.5, help="MACs reduction every arm must reach")
    parser.add_argument("--trials", type=int, default=10, help="trials per fine-tune-scored search")
    parser.add_argument("--bn-trials", type=int, default=200, help="trials per adaptive-BN-scored search")
    parser.add_argument("--top-k", type=int, default=5, help="adaptive_bn: trials fine-tuned before choosing")
    parser.add_argument("--trial-epochs", type=int, default=1, help="fine-tune epochs of a scored / top-k trial")
    parser.add_argument("--finetune-epochs", type=int, default=40, help="final retrain of every arm")
    parser.add_argument("--distill", type=float, default=0.0, help="retrain.distill.weight of every arm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--quick", action="store_true", help="every arm end to end on a tiny image folder")
    args = parser.parse_args()
    args.out = args.out or (".cache/bench-search-quick" if args.quick else ".cache/bench-search")
    args.doc = args.doc or (f"{args.out}/search.md" if args.quick else "docs/benchmarks/search.md")
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.data = str(tiny_folder(Path(args.data), Path(args.out) / "data"))
    return args


def tiny_folder(source: Path, folder: Path) -> Path:
    """The first images of each class of ``source``, as symlinks: an image folder that decodes in seconds."""
    for split, count in QUICK_IMAGES.items():
        for klass in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            target = folder / split / klass.name
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(klass.iterdir())[:count]:
                if not (target / image.name).exists():
                    (target / image.name).symlink_to(image.resolve())
    return folder


def config(args: argparse.Namespace, method: str, search: dict, seed: int) -> PipelineConfig:
    baseline = {"checkpoint": str(Path(args.checkpoint).resolve()), "mean": args.mean, "std": args.std} \
        if args.checkpoint else {}
    return PipelineConfig(
        project={"seed": seed},
        model={"name": args.model},
        data={"dataset": "imagefolder", "path": str(Path(args.data).resolve()), "subset": args.subset,
              "augment": "crop_flip", "batch_size": 128, "val_fraction": 0.1},
        baseline=baseline,
        methods={method: {}},
        train={"epochs": 0 if args.checkpoint else args.epochs, "lr": 0.1},
        retrain={"epochs": args.finetune_epochs, "lr": 0.01, "distill": {"weight": args.distill}},
        search={"n_trials": args.bn_trials if search.get("proxy") == "adaptive_bn" else args.trials,
                "top_k": args.top_k, "finetune_epochs": args.trial_epochs, "ratio_low": 0.1, "ratio_high": 0.8,
                "target": {"metric": "macs_reduction", "value": args.target}, **search},
        prune={"round_to": 8},
        evaluate={"latency_repeats": 20 if args.quick else 100},
    )


def run_arm(args: argparse.Namespace, name: str, seed: int, baseline: Path, out: Path) -> dict:
    """One arm and seed through the pipeline's stages, in ``<out>/seed<seed>/<arm>/<method>/``."""
    method, search = ARMS[name]
    storage = f"sqlite:///{(out / 'optuna.db').resolve()}"
    cfg = config(args, method, {**(search or {}), "storage": storage}, seed)
    start = time.perf_counter()
    if search is None:  # the uniform arm: its bisected ratio, as a fixed prune.ratio
        model, spec, _ = load_model(baseline / "model.pt")
        cfg.prune.ratio = ratio_for_macs_reduction(create_method(method), model, spec.example_inputs(), args.target,
                                                   round_to=cfg.prune.round_to, scan=8).ratio
    run = ProjectRun(ProjectLayout(out, cfg), DataVersion(Path(cfg.data.path), "cifar10-jpg"), baseline,
                     out / f"seed{seed}" / name.replace(" ", "_").replace(",", "")).method_run(method)
    chosen = stages.search_ratio(run, log=log)
    judged = finetuned = 0
    if chosen.searched:
        judged = len(optuna.load_study(study_name=chosen.study_name, storage=storage).trials)
        finetuned = judged if cfg.search.proxy == "finetune" else min(cfg.search.top_k, judged)
    search_seconds = time.perf_counter() - start
    stages.prune_model(run, log=log)
    stages.retrain_model(run, log=log)
    metrics = stages.evaluate_model(run, log=log)
    return {"arm": name, "seed": seed, "ratio": chosen.plan.ratio, "layer_ratios": chosen.plan.layer_ratios,
            "search_seconds": search_seconds, "judged": judged, "finetuned": finetuned, **metrics}


def machine() -> str:
    """Where training ran (the GPU, if any) and the CPU that pruned, exported and timed."""
    gpu = f"training on {torch.cuda.get_device_name()}, " if torch.cuda.is_available() else "training on the CPU, "
    return f"{gpu}{cpu_model()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def mean_std(values: list[float], fmt: str = ".2f") -> str:
    spread = f" ± {statistics.stdev(values):{fmt}}" if len(values) > 1 else ""
    return f"{statistics.mean(values):{fmt}}{spread}"


def render(args: argparse.Namespace, baseline: dict, rows: list[dict], seconds: float) -> str:
    command = ".venv/bin/python benchmarks/search_vs_uniform.py " + shlex.join(sys.argv[1:])
    start = f"the trained `{args.checkpoint}`" if args.checkpoint else f"trained here for {args.epochs} epochs"
    uniform = {row["seed"]: row["accuracy"] for row in rows if row["arm"] == "uniform l1"}
    table = []
    for name in args.arms:
        arm = [row for row in rows if row["arm"] == name]
        diff = [row["accuracy"] - uniform[row["seed"]] for row in arm if row["seed"] in uniform]
        table.append([name, mean_std([r["accuracy"] for r in arm]),
                      mean_std(diff) if diff and name != "uniform l1" else "",
                      mean_std([100 * r["macs_reduction"] for r in arm], ".1f"),
                      mean_std([r["latency_ms"] for r in arm], ".3f"), mean_std([r["speedup"] for r in arm]),
                      f"{statistics.mean(r['judged'] for r in arm):.0f} "
                      f"({statistics.mean(r['finetuned'] for r in arm):.0f})",
                      mean_std([r["search_seconds"] / 60 for r in arm], ".1f")])
    headers = ["arm", "test acc. %", "Δ vs uniform l1 (paired)", "MACs −%", "latency ms", "speedup",
               "candidates judged (fine-tuned)", "search min"]
    lines = [
        f"# Search vs uniform ratios ({args.model}, CIFAR-10 JPEG, from a trained baseline)", "",
        f"Regenerate: `{command.strip()}` (total {seconds / 60:.1f} min; {machine()}).", "",
        f"Baseline: {start}, test accuracy {baseline['accuracy']:.2f} %. Every arm pruned to ≥ {args.target:.0%} fewer "
        f"MACs (round_to 8) and retrained {args.finetune_epochs} epochs (distillation weight {args.distill:g}); "
        f"fine-tune-scored searches {args.trials} trials of {args.trial_epochs} epoch(s); adaptive-BN searches "
        f"{args.bn_trials} trials, the top {args.top_k} fine-tuned {args.trial_epochs} epoch(s). Seeds "
        f"{', '.join(map(str, args.seeds))}: mean ± std.", "",
        tabulate(table, headers, tablefmt="github", disable_numparse=True),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    baseline = out / "baseline"
    if not (baseline / "metrics.json").is_file():
        log("baseline: " + (f"from {args.checkpoint}" if args.checkpoint else f"training {args.epochs} epochs"))
        cfg = config(args, "l1", {}, args.seeds[0])
        data = DataVersion(Path(cfg.data.path), "cifar10-jpg")
        stages.train_baseline(ProjectRun(ProjectLayout(out, cfg), data, baseline, out), log=log)
    base_metrics = stages.read_json(baseline / "metrics.json")
    results = out / "results.json"
    rows = json.loads(results.read_text()) if results.is_file() else []
    for seed in args.seeds:
        for name in args.arms:
            if any(row["arm"] == name and row["seed"] == seed for row in rows):
                continue  # a rerun resumes
            log(f"seed {seed}, arm {name}")
            rows.append(run_arm(args, name, seed, baseline, out))
            results.write_text(json.dumps(rows, indent=1, default=str))
    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    analysis = doc.read_text().partition(ANALYSIS)[2] if doc.is_file() else ""  # hand-written: kept
    doc.write_text(render(args, base_metrics, rows, time.perf_counter() - start)
                   + (f"\n{ANALYSIS}{analysis}" if analysis else ""))
    log(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
