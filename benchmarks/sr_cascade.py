"""Zhong 2022's super-resolution study, re-run: the three-level ESPCN cascade against its pruned forms.

The paper prunes a cascade of three ESPCN branches (full image, ½ and ¼ downscales) by deleting the
downscaled branches, and claims the one-branch net keeps the PSNR with 1/3 of the parameters and trains
faster. Here the three models are built as the pipeline builds them (``espcn_cascade``, and the same model
after ``pruneflow.methods.base.remove_blocks`` of ``branches.down4``, then also ``branches.down2``: the
cascade method's removal, which drops a branch from the average) and each is trained from scratch with
one recipe: the PyTorch sub-pixel example's (Adam, lr 1e-3, constant, batch 4, MSE), by
``pruneflow.training``. With a constant learning rate the model after epoch 30 of a 100-epoch run is
the model of a 30-epoch run, so each (model, seed) trains once to the largest ``--epochs`` and is scored
at every listed epoch; the training time is the sum of the epochs' times up to there (scoring excluded).

The three models of a seed train interleaved in this one process, one epoch of each in turn (the order
rotating every round), and every epoch is timed in wall and CPU time: a machine shared with other work then
slows the three alike, so the time ratios the report quotes hold (timed one after another, two identical
runs on a shared CPU gave ratios of 0.63 and 0.68).

Data: the classic protocol of ``pruneflow.data.super_resolution`` (Y channel, centre crop 256 − 256 mod r,
bilinear ×1/r input). Trained on Sun-Hays80, tested on Set14 (and Set5), from
``../shared/data/sr-sunhays80-set5-set14.tar.gz`` (extracted into ``.cache/sr`` on first use); with
``--bsds300 ROOT`` also on the paper's own data, BSDS300 (200 train / 100 test); ``--test-dir FOLDER``
(repeatable) also tests on a folder of the user's images. PSNR and SSIM on Y,
mean ± std over ``--seeds``: STACK.md measured seed noise of 0.05-0.6 dB, larger than the paper's effect.

Results go to ``<out>/sr-cascade.json`` after every run (a rerun with the same settings resumes) and the
report to ``<out>/sr-cascade.md`` at the end (``--report-only`` rewrites it from the JSON).

    .venv/bin/python benchmarks/sr_cascade.py --device cuda                      # the study (GPU: minutes)
    .venv/bin/python benchmarks/sr_cascade.py --epochs 1 2 --seeds 0 --crop 48 \\
        --out .cache/sr-smoke                                                     # smoke test (CPU, ~1 min)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads slow training on shared cores

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pruneflow.config import TrainConfig  # noqa: E402
from pruneflow.data.loading import PairLoader, Split  # noqa: E402
from pruneflow.data.super_resolution import BSDS300, read_crops  # noqa: E402
from pruneflow.methods.base import remove_blocks  # noqa: E402
from pruneflow.metrics import count_macs_params  # noqa: E402
from pruneflow.models import build_model  # noqa: E402
from pruneflow.training import evaluate_all, resolve_device, train, train_epochs  # noqa: E402

ARCHIVES = (ROOT.parent / "shared" / "data" / "sr-sunhays80-set5-set14.tar.gz",
            ROOT / ".cache" / "sr-sunhays80-set5-set14.tar.gz")
TRAIN_DIR, TEST_DIRS = "sr/CSun_Hays80", {"Set14": "sr/CSet14", "Set5": "sr/CSet5"}

# The three models of the paper: branches kept -> branches removed from espcn_cascade, in removal order.
MODELS = {3: [], 2: ["branches.down4"], 1: ["branches.down4", "branches.down2"]}
NAMES = {3: "initial (3 branches)", 2: "first improvement (2)", 1: "second improvement (1)"}

# Zhong 2022's table (../shared/docs/METHODS.md): BSD300, x3, Y channel; PSNR (dB) and training time (m:ss)
# at 30 / 50 / 100 epochs. Their hardware is unknown: compare time *ratios*, not seconds.
PAPER_EPOCHS = (30, 50, 100)
PAPER_PSNR = {3: (24.471, 24.613, 24.727), 2: (24.544, 24.636, 24.768), 1: (24.491, 24.622, 24.732)}
PAPER_TIME = {3: ("11:31", "19:24", "39:06"), 2: ("10:14", "17:11", "35:00"), 1: ("7:53", "13:35", "26:16")}
RESUME_IGNORES = ("out", "report_only", "resume", "device", "archive", "data")  # do not change a finished run
TIMES = ("train_seconds", "train_cpu_seconds")  # wall and CPU time of the epochs up to a checkpoint


START = time.perf_counter()  # the run's start, for log's elapsed time


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


def minutes(text: str) -> float:
    m, s = text.split(":")
    return int(m) + int(s) / 60


def build(branches: int, scale: int, seed: int) -> nn.Module:
    """The cascade with the paper's branches removed, initialised by ``seed`` (the same init for every count)."""
    torch.manual_seed(seed)
    return remove_blocks(build_model("espcn_cascade", 1, None, {"upscale_factor": scale}), MODELS[branches])


def data_root(args: argparse.Namespace) -> Path:
    """The folder holding ``sr/CSun_Hays80`` and ``sr/CSet14``, extracting the shared tarball there if needed."""
    root = Path(args.data)
    if (root / TRAIN_DIR).is_dir():
        return root
    archive = next((path for path in ([Path(args.archive)] if args.archive else ARCHIVES) if path.is_file()), None)
    if archive is None:
        raise SystemExit(f"error: {root / TRAIN_DIR} is missing and no archive to extract it from "
                         f"(--archive, or one of {', '.join(map(str, ARCHIVES))})")
    log(f"extracting {archive} into {root}")
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root


def datasets(args: argparse.Namespace, crop: int) -> dict[str, dict[str, Split]]:
    """Per training set: its train split and its test splits, in memory (uint8 Y crops and their downscales)."""

    def split(folder: Path) -> Split:
        high, low, skipped = read_crops(folder, crop, args.scale)
        if skipped:
            log(f"{folder.name}: left out {len(skipped)} image(s) smaller than the {crop}px crop: {', '.join(skipped)}")
        return Split(low, high)

    root = data_root(args)
    found = {"Sun-Hays80": {"train": split(root / TRAIN_DIR),
                            **{name: split(root / folder) for name, folder in TEST_DIRS.items()}}}
    if args.bsds300:
        images = BSDS300().images_dir(Path(args.bsds300))
        found["BSDS300"] = {"train": split(images / "train"), "BSDS300": split(images / "test")}
    for folder in map(Path, args.test_dir):  # the user's test images, scored for every training set
        if not folder.is_dir():
            raise SystemExit(f"error: --test-dir {folder}: not a folder")
        if any(folder.name in tests for tests in found.values()):
            raise SystemExit(f"error: --test-dir {folder}: a test set is already named {folder.name}; "
                             "rename the folder")
        test = split(folder)
        if not len(test):
            raise SystemExit(f"error: --test-dir {folder}: no image of at least {crop}px (the crop) in it")
        for tests in found.values():
            tests[folder.name] = test
    for name, splits in found.items():
        log(f"{name}: " + ", ".join(f"{key} {len(value)}" for key, value in splits.items()) + " images")
    return found


def run_round(args: argparse.Namespace, splits: dict[str, Split], seed: int, crop: int) -> list[dict[str, Any]]:
    """Train every model from scratch to max(epochs), interleaved: one epoch of each in turn, the order rotating
    every round. Each epoch is timed (wall and CPU, scoring excluded); at each listed epoch every model is scored
    on every test split."""
    device = resolve_device(args.device)
    tests = {name: PairLoader(split, 16, args.scale, crop) for name, split in splits.items() if name != "train"}
    cfg = TrainConfig(epochs=max(args.epochs), lr=args.lr, optimizer="adam", schedule="constant", weight_decay=0.0,
                      device=args.device)
    models = {branches: build(branches, args.scale, seed) for branches in MODELS}
    runs = {branches: {"branches": branches, "seed": seed, "device": str(device), "checkpoints": {}}
            for branches in MODELS}
    times = {branches: dict.fromkeys(TIMES, 0.0) for branches in MODELS}
    order = list(MODELS)
    with contextlib.ExitStack() as stack:
        steps = {branches: stack.enter_context(contextlib.closing(train_epochs(
            model, PairLoader(splits["train"], args.batch_size, args.scale, crop, shuffle=True, seed=seed), cfg)))
            for branches, model in models.items()}
        for epoch in range(1, cfg.epochs + 1):
            for branches in order:
                wall, cpu = time.perf_counter(), time.process_time()
                result = next(steps[branches])
                times[branches]["train_seconds"] += time.perf_counter() - wall
                times[branches]["train_cpu_seconds"] += time.process_time() - cpu
                if epoch in args.epochs:
                    model = models[branches]
                    scores = {name: evaluate_all(model, loader) for name, loader in tests.items()}
                    model.train()
                    runs[branches]["checkpoints"][str(epoch)] = {**times[branches], "train_loss": result.train_loss,
                                                                 "test": scores}
                    log(f"  {branches} branch(es) seed {seed} epoch {epoch}: loss {result.train_loss:.5f}, "
                        + ", ".join(f"{name} {s['psnr']:.3f} dB / SSIM {s['ssim']:.4f}" for name, s in scores.items())
                        + f", trained {times[branches]['train_seconds']:.1f}s wall, "
                        f"{times[branches]['train_cpu_seconds']:.1f}s CPU")
            order = order[1:] + order[:1]
    return list(runs.values())


def warm_up(args: argparse.Namespace, splits: dict[str, Split], crop: int) -> None:
    """One untimed epoch of every model first: CUDA start-up and cuDNN's kernel choice (``cudnn.benchmark``)
    would otherwise land in the first timed run and inflate that model's training time."""
    for branches in MODELS:
        model = build(branches, args.scale, 0)
        batches = PairLoader(splits["train"], args.batch_size, args.scale, crop, shuffle=True, seed=0)
        train(model, batches, TrainConfig(epochs=1, lr=args.lr, optimizer="adam", schedule="constant",
                                          weight_decay=0.0, device=args.device))


def settings(args: argparse.Namespace, crop: int) -> dict[str, Any]:
    return {key: value for key, value in {**vars(args), "crop": crop}.items() if key not in RESUME_IGNORES}


def summarise(runs: list[dict[str, Any]], trainset: str, test: str, branches: int, epoch: int, key: str) -> list[float]:
    """``key`` (a test metric, or one of TIMES) at ``epoch`` for every seed of one model."""
    checkpoints = [run["checkpoints"][str(epoch)] for run in runs if run["trainset"] == trainset
                   and run["branches"] == branches and str(epoch) in run["checkpoints"]]
    if key in TIMES:  # results written before CPU time was recorded have wall time only
        return [checkpoint[key] for checkpoint in checkpoints if key in checkpoint]
    return [checkpoint["test"][test][key] for checkpoint in checkpoints]


def time_ratio(runs: list[dict[str, Any]], trainset: str, test: str, branches: int, epoch: int, key: str) -> float:
    """Mean training time of ``branches`` over that of the cascade (NaN where not recorded)."""
    times, cascade = (summarise(runs, trainset, test, b, epoch, key) for b in (branches, 3))
    return statistics.mean(times) / statistics.mean(cascade) if times and cascade else math.nan


def ratio_text(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.2f}"


def mean_std(values: list[float], digits: int) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def verdict(runs: list[dict[str, Any]], trainset: str, test: str, epochs: list[int], seeds: int) -> list[str]:
    """Does the one-branch net match the cascade's PSNR (within 2 standard errors of the difference) and
    train faster? One line per epoch count, then the claim as a whole."""
    lines, holds = [], []
    for epoch in epochs:
        full, one = (summarise(runs, trainset, test, b, epoch, "psnr") for b in (3, 1))
        if not full or not one:
            continue
        wall, cpu = (time_ratio(runs, trainset, test, 1, epoch, key) for key in TIMES)
        diff = statistics.mean(one) - statistics.mean(full)
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in (full, one)]
        noise = 2 * (spread[0] ** 2 / len(full) + spread[1] ** 2 / len(one)) ** 0.5
        same = abs(diff) <= noise if seeds > 1 else abs(diff) <= 0.05
        faster = wall < 1
        holds.append((same or diff > 0) and faster)
        outcome = "same PSNR within seed noise" if same else ("better" if diff > 0 else "worse")
        lines.append(f"- {epoch} epoch{'s' if epoch != 1 else ''}: 1 branch − 3 branches = **{diff:+.3f} dB** "
                     f"(2 standard errors of the difference: {noise:.3f} dB) → {outcome}; "
                     f"training time ratio {ratio_text(wall)} wall, {ratio_text(cpu)} CPU.")
    if holds:
        claim = "holds" if all(holds) else ("does not hold" if not any(holds) else "holds only in part")
        lines.append(f"\n**On {trainset} → {test}, the paper's claim (same PSNR with 1/3 of the parameters, less "
                     f"training time) {claim}.**" + ("" if seeds > 2 else " (fewer than 3 seeds: treat as indicative)"))
    return lines


def report(payload: dict[str, Any]) -> str:
    cfg, runs = payload["settings"], payload["runs"]
    epochs, seeds = sorted(cfg["epochs"]), len(cfg["seeds"])
    params = payload["params"]
    lines = [
        "# Zhong 2022 re-run: ESPCN cascade (3 branches) vs its branch-pruned forms (2, 1)",
        "",
        "Generated by `benchmarks/sr_cascade.py` from `sr-cascade.json`; rerun it to regenerate this file.",
        "",
        "## Regenerate",
        "",
        "```bash",
        f".venv/bin/python benchmarks/sr_cascade.py {payload['command']}",
        "```",
        "",
        "## Setup",
        "",
        f"- Models: `espcn_cascade` (x{cfg['scale']}) with `branches.down4` removed (2 branches), then also "
        "`branches.down2` (1 branch = ESPCN); removal by `remove_blocks`, as the `cascade` method does: a "
        "removed branch leaves the average. Each trained **from scratch** with the same recipe.",
        "- Timing: " + ("the three models of a seed trained interleaved in one process, one epoch of each in turn "
                        "(order rotating), each epoch timed in wall and CPU time (scoring excluded)"
                        if payload.get("timing") == "interleaved" else
                        "the models trained one after another, each timed in wall time only (scoring excluded; "
                        "written before the benchmark interleaved them)") + "; ratios are of means over the seeds.",
        f"- Recipe: Adam, lr {cfg['lr']:g} constant, batch {cfg['batch_size']}, MSE, "
        f"{max(epochs)} epochs, scored at {', '.join(map(str, epochs))}; seeds {', '.join(map(str, cfg['seeds']))} "
        "(mean ± std below).",
        f"- Data: Y channel, centre crop {payload['crop']} px, input = bilinear x1/{cfg['scale']} downscale; "
        + "; ".join(f"{name}: {count}" for name, count in payload["images"].items()) + " images.",
        f"- Device: {payload['device']} (torch {payload['torch']}, {payload['platform']}); wall time of the run "
        f"{payload.get('wall_seconds', 0) / 60:.1f} min.",
        "",
        "## Results",
    ]
    for trainset, tests in payload["tests"].items():
        for test in tests:
            lines += ["", f"### Trained on {trainset}, tested on {test}", "",
                      f"| model | params | MACs (input {payload['crop'] // cfg['scale']}²) | "
                      + " | ".join(f"PSNR {e} ep (dB)" for e in epochs)
                      + " | " + " | ".join(f"SSIM {e} ep" for e in epochs) + " | "
                      + " | ".join(f"train time {e} ep, wall / CPU (s)" for e in epochs)
                      + " | time vs cascade, wall / CPU |",
                      "|" + "---|" * (3 + 3 * len(epochs) + 1)]
            done = [e for e in epochs if summarise(runs, trainset, test, 3, e, "psnr")]
            for branches in (3, 2, 1):
                psnr = [mean_std(summarise(runs, trainset, test, branches, e, "psnr"), 3) for e in epochs]
                ssim = [mean_std(summarise(runs, trainset, test, branches, e, "ssim"), 4) for e in epochs]
                times = [" / ".join(mean_std(summarise(runs, trainset, test, branches, e, key), 1) for key in TIMES)
                         for e in epochs]
                ratio = ", ".join(" / ".join(ratio_text(time_ratio(runs, trainset, test, branches, e, key))
                                             for key in TIMES) for e in done)
                lines.append(f"| {NAMES[branches]} | {params[str(branches)]['params']:,} | "
                             f"{params[str(branches)]['macs'] / 1e6:.1f} M | " + " | ".join(psnr) + " | "
                             + " | ".join(ssim) + " | " + " | ".join(times) + f" | {ratio} |")
            lines += ["", *verdict(runs, trainset, test, epochs, seeds)]
    lines += ["", "## The paper's table (Zhong 2022; BSD300, x3, Y)", "",
              "| model | " + " | ".join(f"PSNR {e} ep" for e in PAPER_EPOCHS) + " | "
              + " | ".join(f"time {e} ep" for e in PAPER_EPOCHS) + " | time vs cascade |",
              "|" + "---|" * (2 * len(PAPER_EPOCHS) + 2)]
    for branches in (3, 2, 1):
        ratio = " / ".join(f"{minutes(t) / minutes(b):.2f}"
                           for t, b in zip(PAPER_TIME[branches], PAPER_TIME[3], strict=True))
        lines.append(f"| {NAMES[branches]} | " + " | ".join(f"{p:.3f}" for p in PAPER_PSNR[branches]) + " | "
                     + " | ".join(PAPER_TIME[branches]) + f" | {ratio} |")
    lines += ["", "The paper's differences are 0.02-0.07 dB from single runs; its \"13.8 % less training time\" "
              "compares against an average row, while its own table shows the one-branch net training ~33 % faster "
              "(ratio 0.67 at 100 epochs). Our times are on other hardware: compare the ratios. On a GPU, small "
              "convolutions are bound by kernel launches, so the ratio there understates what fewer MACs save on a "
              "CPU."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[30, 50, 100], help="epoch counts to score at")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--data", default=str(ROOT / ".cache" / "sr"), help="folder holding sr/CSun_Hays80, sr/CSet14")
    parser.add_argument("--archive", default=None, help="the sr-sunhays80-set5-set14 tarball (default: shared/.cache)")
    parser.add_argument("--bsds300", default=None, help="a folder holding BSDS300/ or BSDS300-images.tgz: also "
                                                        "train and test on BSDS300")
    parser.add_argument("--test-dir", action="append", default=[], help="also test on this folder of images, named "
                                                                        "by the folder (repeatable)")
    parser.add_argument("--scale", type=int, default=3)
    parser.add_argument("--crop", type=int, default=None, help="centre crop side; default 256 - 256 mod scale")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"), help="folder for sr-cascade.{json,md}")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the JSON")
    args = parser.parse_args()
    args.epochs = sorted(set(args.epochs))
    args.test_dir = [str(Path(folder).resolve()) for folder in args.test_dir]
    crop = args.crop or 256
    crop -= crop % args.scale
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, doc = out / "sr-cascade.json", out / "sr-cascade.md"
    if args.report_only:
        doc.write_text(report(json.loads(results.read_text())))
        log(f"wrote {doc}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    start = time.perf_counter()
    data = datasets(args, crop)
    previous = json.loads(results.read_text()) if results.is_file() else {}
    same = previous.get("settings") == settings(args, crop)
    runs = previous["runs"] if same else []
    if runs:
        log(f"resuming: {len(runs)} finished run(s) in {results}")
    example = torch.zeros(1, 1, crop // args.scale, crop // args.scale)
    payload = {
        "settings": settings(args, crop), "crop": crop, "command": shlex.join(sys.argv[1:]),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU, {torch.get_num_threads()} threads"),
        "torch": torch.__version__, "platform": platform.platform(), "timing": "interleaved", "runs": runs,
        "images": {f"{trainset} {name}": len(split)
                   for trainset, splits in data.items() for name, split in splits.items()},
        "tests": {trainset: [name for name in splits if name != "train"] for trainset, splits in data.items()},
        "params": {str(b): dict(zip(("macs", "params"), count_macs_params(build(b, args.scale, 0), example),
                                    strict=True))
                   for b in MODELS},
    }
    warm_up(args, next(iter(data.values())), crop)
    for trainset, splits in data.items():
        for seed in args.seeds:
            if any(r["trainset"] == trainset and r["seed"] == seed for r in runs):
                continue
            log(f"{trainset}: seed {seed}, {', '.join(map(str, MODELS))} branches interleaved, {max(args.epochs)} "
                f"epochs on {device}")
            runs += [{"trainset": trainset, **run} for run in run_round(args, splits, seed, crop)]
            payload["wall_seconds"] = (previous.get("wall_seconds", 0) if same else 0) + time.perf_counter() - start
            results.write_text(json.dumps(payload, indent=1) + "\n")  # after every seed: a rerun resumes
    doc.write_text(report(payload))
    log(f"wrote {results} and {doc}")


if __name__ == "__main__":
    main()
