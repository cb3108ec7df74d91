"""How well does a cheap score rank pruned candidates by the accuracy they reach after fine-tuning?

From a trained ResNet-56 (``../shared/models/resnet56-cifar10jpg.pt``), ``--candidates`` pruned nets are drawn the
way a search draws its trials: one random l1 ratio per layer group (``--space per_layer``) or per resolution, the
ratios then scaled together until ``--target`` of the MACs are gone (``pruneflow.search.fit_to_target``), so every
candidate has the same budget and differs only in how it shares the cut. (Per stage, with channels kept in
multiples of 8, a ResNet-56 has only a handful of distinct nets near −50 % MACs: random draws repeat them.)
Each candidate is scored by

- ``plain``: validation accuracy as pruned (EagleEye's "vanilla evaluation");
- ``adaptive_bn``: validation accuracy after re-estimating BatchNorm statistics on ``--calib-batches`` training
  batches, no gradient step (``pruneflow.proxy``);
- ``finetune``: validation accuracy after ``--proxy-epochs`` of fine-tuning (the search's proxy until now),

and then fine-tuned from the pruned state for ``--final-epochs`` on the same training images and scored on the
test split: its *final* accuracy. The proxies are scored on ``--val-images`` test images and the final accuracy on
``--test-images`` others (the checkpoint was trained on every training image). The report gives Spearman's ρ
between each proxy and the final accuracy, and the time each proxy costs per candidate. Results are appended to
``<out>/candidates-<i>of<n>.json`` as each candidate finishes, a rerun resumes from them, and ``--shard i/n``
lets n processes share the candidates (the last one to finish writes the report).

    nice -n 5 .venv/bin/python benchmarks/proxy_correlation.py                       # the documented run
    .venv/bin/python benchmarks/proxy_correlation.py --candidates 2 --train-images 256 --val-images 256 \\
        --final-epochs 1 --test-images 256 --out .cache/proxy-smoke --doc .cache/proxy-smoke/report.md  # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads slow training on shared cores

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from pruneflow import stages  # noqa: E402
from pruneflow.checkpoint import ModelSpec, load_trained  # noqa: E402
from pruneflow.config import PipelineConfig  # noqa: E402
from pruneflow.data import load_splits  # noqa: E402
from pruneflow.data.loading import Split, TensorLoader, read_split  # noqa: E402
from pruneflow.methods import create_method  # noqa: E402
from pruneflow.metrics import count_macs_params, reductions  # noqa: E402
from pruneflow.plan import PrunePlan  # noqa: E402
from pruneflow.proxy import recalibrate_batchnorm  # noqa: E402
from pruneflow.search import fit_to_target  # noqa: E402
from pruneflow.training import evaluate, train  # noqa: E402

# The checkpoint's input normalisation (its README): the per-channel statistics of the CIFAR-10 training set.
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
PROXIES = ("plain", "adaptive_bn", "finetune")
BATCH = 128  # the CIFAR recipe's batch


START = time.perf_counter()  # the run's start, for log's elapsed time


def log(message: str) -> None:
    print(f"[{(time.perf_counter() - START) / 60:6.1f} min] {message}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="../shared/models/resnet56-cifar10jpg.pt")
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--data", default=".cache/cifar10-jpg/cifar10", help="image folder with train/ and test/")
    parser.add_argument("--out", default=".cache/bench-proxy")
    parser.add_argument("--doc", default="docs/benchmarks/proxy_correlation.md")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--target", type=float, default=0.5, help="MACs reduction of every candidate")
    parser.add_argument("--space", default="per_layer", choices=("per_resolution", "per_layer"))
    parser.add_argument("--train-images", type=int, default=1280, help="drawn from the training split")
    parser.add_argument("--val-images", type=int, default=1000,
                        help="drawn from the test split (images the baseline never saw), for the proxies")
    parser.add_argument("--calib-batches", type=int, default=10, help="adaptive BN: training batches of 128")
    parser.add_argument("--proxy-epochs", type=int, default=1)
    parser.add_argument("--final-epochs", type=int, default=4)
    parser.add_argument("--test-images", type=int, default=2000,
                        help="N other random images of the test split, for the final accuracy")
    parser.add_argument("--fit-steps", type=int, default=10, help="bisection steps fitting a candidate to --target")
    parser.add_argument("--shard", default="0/1", help="i/n: judge candidates i, i+n, ... (n processes share a run)")
    parser.add_argument("--report-only", action="store_true", help="write the report from the candidates judged so far")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def pipeline_config(args: argparse.Namespace) -> PipelineConfig:
    """The pipeline's settings this study mirrors: l1, ratios in [0.1, 0.8], round_to 8, the retrain recipe."""
    return PipelineConfig.model_validate({
        "model": {"name": args.model},
        "methods": {"l1": {}},
        "search": {"space": args.space, "ratio_low": 0.1, "ratio_high": 0.8,
                   "target": {"metric": "macs_reduction", "value": args.target}},
        "retrain": {"epochs": args.final_epochs, "lr": 0.01},
        "prune": {"round_to": 8},
    })


def held_out(test: Split, args: argparse.Namespace) -> tuple[Split, Split]:
    """``--val-images`` test images for the proxies and ``--test-images`` others for the final accuracy: the
    checkpoint was trained on all 50 000 training images, so no training image is held out from it."""
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))
    val, final = order[:args.val_images], order[args.val_images:args.val_images + args.test_images]
    return Split(test.images[val], test.labels[val]), Split(test.images[final], test.labels[final])


def baseline_accuracy(model: torch.nn.Module, val: Split, test: Split) -> dict[str, float]:
    return {"accuracy": evaluate(model, TensorLoader(test, 256, MEAN, STD)),
            "val": evaluate(model, TensorLoader(val, 256, MEAN, STD))}


def report_only(args: argparse.Namespace) -> dict[str, float]:
    """The baseline's accuracies for the report, decoding only the test split (kept in ``<out>/baseline.json``
    for these held-out images, so a later report costs nothing)."""
    key = {"checkpoint": args.checkpoint, "seed": args.seed, "val_images": args.val_images,
           "test_images": args.test_images}
    cached = Path(args.out) / "baseline.json"
    if cached.is_file() and json.loads(cached.read_text())["key"] == key:
        return json.loads(cached.read_text())["accuracy"]
    test, _ = read_split(Path(args.data) / "test", progress=log)
    val, final = held_out(test, args)
    model, _ = load_trained(Path(args.checkpoint), ModelSpec(args.model, 3, 10, (3, *test.images.shape[2:]),
                                                             mean=MEAN, std=STD))
    accuracy = baseline_accuracy(model, val, final)
    stages.write_json(cached, {"key": key, "accuracy": accuracy})
    return accuracy


class Study:
    """The baseline, the data and the pruning the candidates share."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.cfg = args, pipeline_config(args)
        subset = args.train_images + 1  # the training split's own validation share (one image) goes unused
        self.splits = load_splits(Path(args.data), 1 / subset, subset, args.seed, progress=log)
        self.splits.mean, self.splits.std = MEAN, STD
        self.splits.val, self.splits.test = held_out(self.splits.test, args)
        self.spec = ModelSpec(args.model, 3, 10, self.splits.input_shape, mean=MEAN, std=STD)
        self.baseline, _ = load_trained(Path(args.checkpoint), self.spec)
        self.example = self.spec.example_inputs()
        self.macs, self.params = count_macs_params(self.baseline, self.example[:1])
        self.pruner = create_method("l1")
        self.space = stages.search_space(self.cfg, self.baseline, self.spec)

    def pruned(self, plan: PrunePlan) -> torch.nn.Module:
        model = copy.deepcopy(self.baseline)
        self.pruner.prune(model, self.example, plan)
        return model

    def costs(self, plan: PrunePlan) -> dict[str, float]:
        return reductions(self.pruned(plan), self.example[:1], self.macs, self.params, structured=True)

    def candidate(self, index: int) -> dict[str, float]:
        """Random ratios of the space's parameters (seeded by ``index``), fitted to the target."""
        rng = random.Random(f"{self.args.seed}-{index}")
        search = self.cfg.search
        sampled = {name: rng.uniform(search.ratio_low, search.ratio_high) for name in self.space.params}
        return fit_to_target(sampled, self.space, search, self.costs, steps=self.args.fit_steps)

    def loaders(self):
        return (self.splits.loader("train", BATCH, shuffle=True, augment="crop_flip", seed=self.args.seed),
                self.splits.loader("val", 256))

    def fine_tune(self, model: torch.nn.Module, epochs: int) -> None:
        torch.manual_seed(self.args.seed)
        batches, _ = self.loaders()
        train(model, batches, self.cfg.retrain.model_copy(update={"epochs": epochs, "device": "cpu"}))

    def judge(self, index: int) -> dict:
        ratios = self.candidate(index)
        plan = self.space.plan(ratios)
        model = self.pruned(plan)
        row = {"candidate": index, "ratios": ratios,
               **reductions(model, self.example[:1], self.macs, self.params, True)}
        _, val = self.loaders()
        calib = self.splits.loader("train", BATCH, shuffle=True, seed=self.args.seed,
                                   max_batches=self.args.calib_batches)

        row["plain"] = evaluate(model, val)
        with timed(row, "adaptive_bn"):
            recalibrated = copy.deepcopy(model)
            recalibrate_batchnorm(recalibrated, calib)
            row["adaptive_bn"] = evaluate(recalibrated, val)
        with timed(row, "finetune"):
            tuned = copy.deepcopy(model)
            self.fine_tune(tuned, self.args.proxy_epochs)
            row["finetune"] = evaluate(tuned, val)
        with timed(row, "final"):
            self.fine_tune(model, self.args.final_epochs)
            row["final"] = evaluate(model, self.splits.loader("test", 256))
        return row


class timed:
    """Adds ``<name>_seconds`` (wall) and ``<name>_cpu_seconds`` (this process) to ``row``."""

    def __init__(self, row: dict, name: str) -> None:
        self.row, self.name = row, name

    def __enter__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *exc) -> None:
        self.row[f"{self.name}_seconds"] = time.perf_counter() - self.wall
        self.row[f"{self.name}_cpu_seconds"] = time.process_time() - self.cpu


def render(args: argparse.Namespace, rows: list[dict], baseline: dict) -> str:
    finals = [row["final"] for row in rows]
    shown = [arg for arg in sys.argv[1:] if arg != "--report-only"]  # the command that judges them, in one process
    command = "nice -n 5 .venv/bin/python benchmarks/proxy_correlation.py " + shlex.join(shown)
    lines = [
        "# Ranking pruned candidates: adaptive BN vs a short fine-tune (ResNet-56, CIFAR-10 JPEG)", "",
        f"Regenerate: `{command.strip()}` (CPU, {args.threads} PyTorch thread(s), a machine shared with other jobs).",
        "",
        f"Baseline: the trained ResNet-56 `{args.checkpoint}` ({baseline['accuracy']:.2f} % on the {args.test_images} "
        f"test images of the final accuracy, {baseline['val']:.2f} % on the {args.val_images} others the proxies "
        f"use). {len(rows)} candidates, each l1-pruned with random {args.space.replace('_', '-')} ratios scaled onto "
        f"−{args.target:.0%} MACs (round_to 8; reached: {min(r['macs_reduction'] for r in rows):.1%}–"
        f"{max(r['macs_reduction'] for r in rows):.1%}). "
        f"Data: {args.train_images} training images (crop + flip), drawn with seed {args.seed}; adaptive BN on "
        f"{args.calib_batches} batches of 128 training images; the fine-tune proxy {args.proxy_epochs} epoch(s) "
        f"and the final fine-tune {args.final_epochs} epochs over the training images (SGD lr 0.01, cosine), final "
        f"accuracy on the test images. CPU-sized: a short final fine-tune on a subset, not a full retrain.", "",
        "| proxy | Spearman ρ vs final accuracy | p-value | proxy accuracy range (%) | seconds per candidate (CPU s) |",
        "|---|---|---|---|---|",
    ]
    for proxy in PROXIES:
        rho, p = spearmanr([row[proxy] for row in rows], finals)
        seconds = statistics.mean(row.get(f"{proxy}_seconds", 0.0) for row in rows)
        cpu = statistics.mean(row.get(f"{proxy}_cpu_seconds", 0.0) for row in rows)
        cost = f"{seconds:.1f} ({cpu:.1f})" if proxy != "plain" else "one evaluation"
        values = [row[proxy] for row in rows]
        lines.append(f"| {proxy} | {rho:.3f} | {p:.3g} | {min(values):.1f}–{max(values):.1f} | {cost} |")
    seconds = statistics.mean(row["final_seconds"] for row in rows)
    lines += ["", f"Final accuracy: {min(finals):.2f}–{max(finals):.2f} % (mean {statistics.mean(finals):.2f}); "
              f"the final fine-tune took {seconds:.0f} s per candidate.", "",
              f"Ratios in the order {', '.join(name.removeprefix('ratio.') for name in rows[0]['ratios'])}; "
              "best final accuracy first:", "",
              "| candidate | ratios | MACs −% | plain | adaptive_bn | finetune | final |",
              "|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: -r["final"]):
        ratios = " ".join(f"{value:.2f}" for value in row["ratios"].values())
        lines.append(f"| {row['candidate']} | {ratios} | {row['macs_reduction']:.1%} | {row['plain']:.2f} | "
                     f"{row['adaptive_bn']:.2f} | {row['finetune']:.2f} | {row['final']:.2f} |")
    return "\n".join(lines) + "\n"


ANALYSIS = "## What this shows"  # a rerun rewrites the report above this heading and keeps what follows


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        baseline = report_only(args)
    else:
        shard, shards = map(int, args.shard.split("/"))
        results = out / f"candidates-{shard}of{shards}.json"
        rows = json.loads(results.read_text()) if results.is_file() else []
        study = Study(args)
        baseline = baseline_accuracy(study.baseline, study.splits.val, study.splits.test)
        log(f"baseline: test {baseline['accuracy']:.2f} %, val {baseline['val']:.2f} %; parameters: "
            f"{', '.join(study.space.params)}")
        done = {row["candidate"] for row in rows}
        for index in range(shard, args.candidates, shards):
            if index in done:
                continue
            row = study.judge(index)
            rows.append(row)
            stages.write_json(results, rows)
            log(f"candidate {index}: MACs -{row['macs_reduction']:.1%} plain {row['plain']:.2f} adaptive_bn "
                f"{row['adaptive_bn']:.2f} ({row['adaptive_bn_seconds']:.0f} s) finetune {row['finetune']:.2f} "
                f"({row['finetune_seconds']:.0f} s) final {row['final']:.2f} ({row['final_seconds']:.0f} s)")
    rows = sorted((row for path in out.glob("candidates-*.json") for row in json.loads(path.read_text())),
                  key=lambda row: row["candidate"])
    if args.report_only:
        args.candidates = len(rows)
    if len(rows) < args.candidates:
        log(f"{len(rows)} of {args.candidates} candidates judged: the report waits for the other shards")
        return 0
    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    analysis = doc.read_text().partition(ANALYSIS)[2] if doc.is_file() else ""  # hand-written: kept
    doc.write_text(render(args, rows, baseline) + (f"\n{ANALYSIS}{analysis}" if analysis else ""))
    log(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
