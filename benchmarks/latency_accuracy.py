"""At one measured speed-up, which pruned net keeps more accuracy: ``halp`` or uniform ``l1`` with ``round_to`` 16?
(#12, item 6: "at the same measured latency, latency-budget allocation is at least as accurate as uniform l1")

Both arms start from one trained baseline and get the same fine-tune, over ``--seeds``:

- ``l1, round_to 16``: one uniform ratio, chosen so that the net's *measured* batch-1 speed-up (ONNX Runtime,
  interleaved with the baseline, as the evaluate stage times) comes closest to ``--speedup``. Multiples of 16
  leave few distinct nets (ResNet-56's 16-wide first stage cannot shrink at all), so the speed-up it lands on is
  what the other arm is asked for;
- ``halp``: the latency knapsack (channels and whole residual blocks by Taylor importance per millisecond),
  asked through ``search.target.metric: speedup`` for the speed-up the l1 net measured, and met as measured by
  its own rounds in the prune stage.

Everything goes through ``pruneflow.stages`` (baseline, prune, retrain, evaluate). The report gives test accuracy
right after pruning and after the fine-tune (mean ± std over the seeds), the difference paired by seed, MACs and
params removed, and the speed-ups of every fine-tuned net measured together at the end in one interleaved
``measure_latency`` call (batch 1 and ``--large-batch``; 10th percentile and median).

    .venv/bin/python benchmarks/latency_accuracy.py          # ResNet-56 from ../shared/models, ~35 min on 2 cores
    .venv/bin/python benchmarks/train_baseline.py --model resnet20 --epochs 15                  # 33 min
    .venv/bin/python benchmarks/latency_accuracy.py --model resnet20 \\
        --checkpoint .cache/baselines/resnet20-cifar10jpg/model.pt

Each model's settings, rows and timings are kept in ``docs/benchmarks/latency-accuracy.json``; a run with the
same settings resumes (and only re-renders when everything is there), one with other settings starts that
model over. The report has a section per model.

``--quick`` runs both arms end to end in a few minutes (a few images per class, one seed): it checks the
script, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads slow training on shared cores

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from benchmarks.search_vs_uniform import machine, mean_std, tiny_folder  # noqa: E402
from pruneflow import stages  # noqa: E402
from pruneflow.checkpoint import is_model_file, load_model, read_checkpoint  # noqa: E402
from pruneflow.config import PipelineConfig  # noqa: E402
from pruneflow.export import CPU, measure_latency  # noqa: E402
from pruneflow.layout import ProjectLayout, ProjectRun  # noqa: E402
from pruneflow.methods import create_method  # noqa: E402
from pruneflow.plan import PrunePlan  # noqa: E402
from pruneflow.targeting import RatioForTarget, bisect_ratio  # noqa: E402
from pruneflow.training import evaluate  # noqa: E402
from pruneflow.versioning import DataVersion  # noqa: E402

L1, HALP = "l1, round_to 16", "halp"
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
QUICK = {"subset": None, "finetune_epochs": 1, "seeds": [0], "repeats": 10}
ANALYSIS = "## What this shows"  # a rerun rewrites the report above this heading and keeps what follows
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{(time.perf_counter() - START) / 60:6.1f} min] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".cache/cifar10-jpg/cifar10", help="image folder with train/ and test/")
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--checkpoint", default="../shared/models/resnet56-cifar10jpg.pt",
                        help="the trained baseline (state_dict or pruneflow model file)")
    parser.add_argument("--mean", type=float, nargs=3, help="the checkpoint's input normalisation; default: a "
                                                               "model file's own, a state_dict's CIFAR-10's")
    parser.add_argument("--std", type=float, nargs=3)
    parser.add_argument("--out", help="work folder; default: .cache/bench-latency-accuracy[-quick]/<model>")
    parser.add_argument("--doc", help="default: docs/benchmarks/latency-accuracy.md (--quick: <out>/report.md); "
                                      "every model's results are kept in the .json beside it")
    parser.add_argument("--speedup", type=float, default=1.5, help="batch-1 speed-up the l1 net is matched to")
    parser.add_argument("--subset", type=int, default=20000, help="training images the fine-tune uses (0: all)")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="the same fine-tune for every net")
    parser.add_argument("--lr", type=float, default=0.01, help="fine-tune learning rate (SGD, cosine)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=100, help="interleaved latency runs per net at batch 1")
    parser.add_argument("--large-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime and PyTorch threads")
    parser.add_argument("--quick", action="store_true", help="both arms end to end on a tiny image folder")
    args = parser.parse_args(argv)
    args.out = Path(args.out or f".cache/bench-latency-accuracy{'-quick' if args.quick else ''}/{args.model}")
    args.doc = Path(args.doc or (args.out / "report.md" if args.quick else "docs/benchmarks/latency-accuracy.md"))
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.data = str(tiny_folder(Path(args.data), args.out / "data"))
    args.subset = args.subset or None
    if args.mean is None or args.std is None:
        own = read_checkpoint(Path(args.checkpoint))
        spec = load_model(Path(args.checkpoint))[1] if is_model_file(own) else None
        args.mean, args.std = (list(spec.mean), list(spec.std)) if spec and spec.mean else (CIFAR_MEAN, CIFAR_STD)
    return args


def config(args: argparse.Namespace, method: str, seed: int, **changes: dict[str, Any]) -> PipelineConfig:
    """The pipeline's params for one arm and seed; ``changes`` update whole sections (``prune``, ``search``)."""
    sections: dict[str, dict[str, Any]] = {
        "project": {"seed": seed},
        "model": {"name": args.model},
        "data": {"dataset": "imagefolder", "path": str(Path(args.data).resolve()), "subset": args.subset,
                 "augment": "crop_flip", "batch_size": 128, "val_fraction": 0.1},
        "baseline": {"checkpoint": str(Path(args.checkpoint).resolve()), "mean": args.mean, "std": args.std},
        "methods": {method: {}},
        "train": {"epochs": 0},
        "retrain": {"epochs": args.finetune_epochs, "lr": args.lr},
        "evaluate": {"latency_repeats": args.repeats, "latency_batch_large": args.large_batch,
                     "threads": args.threads},
    }
    for section, values in changes.items():
        sections[section] = {**sections.get(section, {}), **values}
    return PipelineConfig.model_validate(sections)


def project(args: argparse.Namespace, cfg: PipelineConfig, baseline: Path, run_dir: Path) -> ProjectRun:
    return ProjectRun(ProjectLayout(args.out, cfg), DataVersion(Path(cfg.data.path), "cifar10-jpg"), baseline, run_dir)


def matched_l1_ratio(args: argparse.Namespace, baseline: Path) -> RatioForTarget:
    """The uniform l1 ratio (``round_to`` 16) whose pruned net measures closest to ``--speedup`` at batch 1:
    each candidate pruned, exported and timed interleaved with the baseline's ONNX (medians, as evaluate
    reports). Its ``reduction`` is the share of the baseline's time removed, 1 − 1/speed-up."""
    cfg = config(args, "l1", args.seeds[0], prune={"round_to": 16})
    model, spec, _ = load_model(baseline / "model.pt")
    pruner = create_method("l1")
    measure = stages.evaluate_timer(cfg, pruner, model, spec.example_inputs(), baseline / "model.onnx", None, CPU)

    def time_share_removed(ratio: float) -> float:
        pruned_ms, baseline_ms = measure(PrunePlan.from_config(cfg.prune, ratio=ratio))
        log(f"l1 ratio {ratio:.3f}: measured x{baseline_ms / pruned_ms:.2f}")
        return 1.0 - pruned_ms / baseline_ms

    return bisect_ratio(time_share_removed, 1.0 - 1.0 / args.speedup, high=cfg.prune.max_layer_ratio, steps=3,
                        scan=9, tolerance=0.01)


def run_arm(args: argparse.Namespace, arm: str, seed: int, baseline: Path, match: dict[str, float]) -> dict[str, Any]:
    """One arm and seed through the pipeline's stages, in ``<out>/seed<seed>/<arm>/``."""
    if arm == L1:
        cfg = config(args, "l1", seed, prune={"round_to": 16, "ratio": match["ratio"]})
    else:
        cfg = config(args, "halp", seed, search={"target": {"metric": "speedup", "value": match["speedup"]}})
    method = next(iter(cfg.methods))
    run = project(args, cfg, baseline, args.out / f"seed{seed}" / arm.replace(", ", "-").replace(" ", "")
                  ).method_run(method)
    started = time.perf_counter()
    stages.search_ratio(run, log=log)  # a fixed ratio (l1) or halp's latency budget: nothing is searched
    summary = stages.prune_model(run, log=log)
    splits = stages.load_data(cfg, run.data_dir)
    pruned, _, _ = load_model(run.pruned)
    accuracy_pruned = evaluate(pruned, splits.loader("test", 256))
    log(f"{arm}, seed {seed}: test accuracy right after pruning {accuracy_pruned:.2f} %")
    retrain = stages.retrain_model(run, log=log)
    metrics = stages.evaluate_model(run, log=log)
    return {"arm": arm, "seed": seed, "accuracy_pruned": accuracy_pruned, **retrain, **metrics,
            "structure": structure(summary), "note": summary.plan.origin.note,
            "onnx": str(run.latency_onnx.relative_to(args.out)), "seconds": time.perf_counter() - started}


def joint_speedups(args: argparse.Namespace, rows: list[dict[str, Any]], baseline: Path) -> dict[str, Any]:
    """Every fine-tuned net's speed-up over the baseline, all timed in one interleaved call per batch."""
    paths = {"baseline": baseline / "model.onnx"} | {f"{row['arm']} / {row['seed']}": args.out / row["onnx"]
                                                      for row in rows}
    example = load_model(baseline / "model.pt")[1].example_inputs(1).numpy()
    joint = {}
    for batch, repeats in ((1, args.repeats), (args.large_batch, max(10, args.repeats // 5))):
        timing = measure_latency(paths, np.resize(example, (batch, *example.shape[1:])), 10, repeats, args.threads)
        base = timing.pop("baseline")
        joint[str(batch)] = {name: {"p10": base.p10_ms / t.p10_ms, "median": base.median_ms / t.median_ms,
                                    "cpu": base.cpu_ms / t.cpu_ms} for name, t in timing.items()}
        joint[str(batch)]["baseline_ms"] = {"p10": base.p10_ms, "median": base.median_ms}
        log(f"joint latency at batch {batch}: {len(paths)} nets x {repeats} rounds")
    return joint


def structure(summary: stages.PruneSummary) -> str:
    """What a pruned net lost: its removed blocks, and how many convolutions went from how many channels to how
    many (the prune stage's per-layer report)."""
    changed = Counter((layer["channels_before"], layer["channels_after"]) for layer in summary.layers
                      if layer["channels_before"] != layer["channels_after"] > 0)  # 0: gone with its block
    blocks = summary.plan.removed_blocks
    parts = [f"removed blocks {', '.join(blocks)}"] if blocks else []
    parts += [f"{count} conv(s) {before}→{after} channels" for (before, after), count in sorted(changed.items())]
    return "; ".join(parts)


def render(store: dict[str, dict[str, Any]]) -> str:
    """The report: one section per model in the store (``main`` keeps every model's settings and rows there)."""
    lines = ["# Accuracy at equal measured latency: halp against uniform l1 (CIFAR-10 JPEG)", "",
             "Generated by `benchmarks/latency_accuracy.py` from `latency-accuracy.json` beside it (a run replaces "
             "its model's section; everything above *What this shows* is rewritten).", ""]
    for model, state in store.items():
        lines += [f"## {model}", "", *model_section(state), ""]
    return "\n".join(lines)


def model_section(state: dict[str, Any]) -> list[str]:
    settings, match, joint, rows = state["settings"], state["match"], state["joint"], state["rows"]
    l1 = {row["seed"]: row["accuracy"] for row in rows if row["arm"] == L1}
    large = str(settings["large_batch"])
    table = []
    for arm in (L1, HALP):
        mine = [row for row in rows if row["arm"] == arm]
        names = [f"{arm} / {row['seed']}" for row in mine]
        paired = [row["accuracy"] - l1[row["seed"]] for row in mine if row["seed"] in l1]
        table.append([
            arm, mean_std([r["accuracy_pruned"] for r in mine]), mean_std([r["accuracy"] for r in mine]),
            mean_std(paired) if arm != L1 else "",
            mean_std([100 * r["macs_reduction"] for r in mine], ".1f"),
            mean_std([100 * r["params_reduction"] for r in mine], ".1f"),
            mean_std([joint["1"][n]["p10"] for n in names]) + f" ({mean_std([joint['1'][n]['cpu'] for n in names])})",
            mean_std([joint["1"][n]["median"] for n in names]),
            mean_std([joint[large][n]["p10"] for n in names]),
        ])
    headers = ["arm", "test acc. % pruned", "test acc. % fine-tuned", "Δ vs l1 (paired)", "MACs −%", "params −%",
               "speed-up b1 p10 (CPU)", "speed-up b1 median", f"speed-up b{large} p10"]
    images = "all training images" if settings["subset"] is None else f"{settings['subset']} training images"
    return [
        f"Regenerate: `{state['command']}` (total {state['seconds'] / 60:.1f} min over the runs that made these "
        f"rows; {state['machine']}).", "",
        f"Baseline: `{settings['checkpoint']}`, test accuracy {state['baseline_accuracy']:.2f} % (full 10k test "
        f"split). The uniform l1 net (round_to 16) at ratio {match['ratio']:.3f} measured x{match['speedup']:.2f} "
        f"at batch 1 (closest to the x{settings['speedup']:g} asked; every candidate: "
        + ", ".join(f"{r:.3f} → x{1 / (1 - share):.2f}" for r, share in match["trials"])
        + f"); halp was asked for that speed-up. Same fine-tune for every net: {settings['finetune_epochs']} "
        f"epoch(s), SGD lr {settings['lr']:g} cosine, crop + flip, on {images} (10 % held out for validation). "
        f"Seeds {', '.join(map(str, settings['seeds']))}: mean ± std. Speed-ups: every fine-tuned net and the "
        f"baseline timed together at the end (ONNX Runtime CPU, {settings['threads']} threads, "
        f"{settings['repeats']} interleaved runs at batch 1); baseline {joint['1']['baseline_ms']['p10']:.3f} ms "
        "(p10) at batch 1.", "",
        tabulate(table, headers, tablefmt="github", disable_numparse=True), "",
        "What each net kept:", "",
        *[f"- {row['arm']}, seed {row['seed']}: {row['structure']}" + (f". {row['note']}" if row["arm"] == HALP
                                                                         else "") for row in rows],
    ]


SETTINGS = ("checkpoint", "mean", "std", "speedup", "subset", "finetune_epochs", "lr", "seeds", "repeats",
            "large_batch", "threads")  # what a model's rows depend on: a run with other values starts them over


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    baseline = args.out / "baseline"
    if not (baseline / "metrics.json").is_file():
        log(f"baseline: {args.checkpoint}")
        cfg = config(args, "l1", args.seeds[0])
        stages.train_baseline(project(args, cfg, baseline, args.out), log=log)
    store_path = args.doc.with_suffix(".json")
    store = json.loads(store_path.read_text()) if store_path.is_file() else {}
    settings = {key: getattr(args, key) for key in SETTINGS}
    state = store.get(args.model, {})
    if state.get("settings") != settings:
        if state:
            log(f"{args.model}: settings differ from the stored run's: its rows are started over")
        state = {"settings": settings, "rows": [], "seconds": 0.0}
    store[args.model] = state
    since = START

    def save() -> None:  # after every measurement: a run that stops resumes from here
        nonlocal since
        state.update(command=shlex.join([".venv/bin/python", "benchmarks/latency_accuracy.py", *argv]),
                     machine=machine(), baseline_accuracy=stages.read_json(baseline / "metrics.json")["accuracy"],
                     seconds=state["seconds"] + time.perf_counter() - since)
        since = time.perf_counter()
        store_path.parent.mkdir(parents=True, exist_ok=True)
        store_path.write_text(json.dumps(store, indent=1, default=str) + "\n")

    if "match" not in state:  # timed once: the same l1 net serves every seed
        found = matched_l1_ratio(args, baseline)
        state["match"] = {"ratio": found.ratio, "speedup": round(1.0 / (1.0 - found.reduction), 2),
                          "trials": sorted(found.trials)}
        save()
        log(f"l1 round_to 16: ratio {found.ratio:.3f} measured x{state['match']['speedup']:.2f}; halp is asked for it")
    for seed in args.seeds:
        for arm in (L1, HALP):
            if any(row["arm"] == arm and row["seed"] == seed for row in state["rows"]):
                continue  # a rerun resumes
            log(f"seed {seed}, arm {arm}")
            state["rows"].append(run_arm(args, arm, seed, baseline, state["match"]))
            save()
    nets = sorted(f"{row['arm']} / {row['seed']}" for row in state["rows"])
    if state.get("joint", {}).get("nets") != nets:  # timed once for a set of nets: a rerun only re-renders
        state["joint"] = {"nets": nets, **joint_speedups(args, state["rows"], baseline)}
        save()
    analysis = args.doc.read_text().partition(ANALYSIS)[2] if args.doc.is_file() else ""  # hand-written: kept
    args.doc.write_text(render(store) + (f"\n{ANALYSIS}{analysis}" if analysis else ""))
    log(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
