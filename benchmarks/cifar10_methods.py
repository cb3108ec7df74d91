"""Every structured pruning method on real CIFAR-10 images with ResNet-20, at one MACs target, one fine-tune budget.

One shared baseline is trained by ``pruneflow.stages.train_baseline`` (with the training hooks of every
configured method, as the pipeline does: slimming's L1 on BN γ and statistical's filter recorder). Then, per
method: ``pruneflow.targeting.ratio_for_macs_reduction`` scans and bisects the method's ratio on prune-only
trials until ≈ ``--target`` of the MACs are gone; ``stages.prune_model`` prunes at that ratio,
``stages.retrain_model`` fine-tunes for ``--finetune-epochs`` (the method's own recipe if it has one), and
``stages.evaluate_model`` measures test accuracy, MACs, params and ONNX Runtime latency at batch 1 and at
``--latency-batch``, interleaved with the baseline. ``magnitude_unstructured`` runs as an extra row at the same
share of zeroed weights.

Everything runs in one process (the decoded JPEGs are cached in memory by ``stages.load_data``). Results go
to a JSON file after every method, so a crash loses one method at most and a rerun with the same settings
resumes; the markdown report is written at the end (``--report-only`` rewrites it from the JSON).

    .venv/bin/python benchmarks/cifar10_methods.py                     # the documented run (~1 h, 2 shared cores)
    .venv/bin/python benchmarks/cifar10_methods.py --subset 512 --epochs 1 --finetune-epochs 1 \\
        --out .cache/bench-smoke --doc .cache/bench-smoke/report.md    # smoke test
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import shlex
import sys
import tarfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

# With other jobs on the same cores, libgomp's spin-waiting threads made 2-thread training 3-10x slower
# (measured here: 4.4 s vs 1.4 s per ResNet-20 step of 128); passive waiting costs nothing when the CPU is free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pruneflow import stages  # noqa: E402
from pruneflow.checkpoint import load_model  # noqa: E402
from pruneflow.config import PipelineConfig  # noqa: E402
from pruneflow.export import check_parity, measure_latency  # noqa: E402
from pruneflow.latency.table import cpu_model  # noqa: E402
from pruneflow.layout import ProjectLayout, ProjectRun  # noqa: E402
from pruneflow.methods import METHODS  # noqa: E402
from pruneflow.targeting import ratio_for_macs_reduction  # noqa: E402
from pruneflow.training import evaluate  # noqa: E402
from pruneflow.versioning import DataVersion  # noqa: E402

UNSTRUCTURED_ROW = "magnitude_unstructured"
RESUME_IGNORES = ("joint_repeats", "out", "archive")  # knobs that do not change a finished row
FAR_OFF = 0.05  # rows whose MACs reduction misses the target by more than this are listed apart
ANALYSIS_START, ANALYSIS_END = "<!-- analysis:start -->", "<!-- analysis:end -->"

# Per-method params for this benchmark (everything else: the method's defaults).
METHOD_PARAMS: dict[str, dict[str, Any]] = {
    "slimming": {"sparsity": 1e-5},  # METHODS.md: λ = 1e-5 for ResNets (1e-4 is the VGG value)
}

# Published numbers from ../shared/docs/METHODS.md (other nets, lossless CIFAR-10, full schedules).
PAPER = {
    "l1": "Li et al. 2017, ResNet-56: 93.04 → 93.06 at −27.6 % FLOPs; ResNet-110: 93.53 → 93.30 at −38.6 %",
    "slimming": "Liu et al. 2017, VGG: 93.66 → 93.80 at −51 % FLOPs",
    "layer_entropy": "Wei 2023 (ALE), ResNet-56: +1.0 at −36.2 % FLOPs; ResNet-110: +1.42 at −52.4 % (with grafting)",
    "info_richness": "Wei 2023, MobileNetV2: +1.56 at −53.9 % FLOPs (with grafting)",
    "adversarial": "Wei 2023 (AMAS), ResNet-110: +0.49 at −56.9 % FLOPs; GAL ResNet-56: 93.26 → 93.38 at −37.6 %",
    "random": "must lose to the real criteria",
    "magnitude_unstructured": "Han et al. 2015: no speed-up on dense runtimes",
}
PUBLIC_BAR = "HRank (ResNet-56): 93.26 → 93.17 at −50 % FLOPs; DepGraph is the other public bar"


START = time.perf_counter()  # the run's start, for log's elapsed time


def log(message: str) -> None:
    elapsed = time.perf_counter() - START
    print(f"[{elapsed / 60:6.1f} min] {message}", flush=True)


def structured_methods() -> list[str]:
    """The methods pruned at a MACs ratio (halp allocates under a latency budget: benchmarks/latency.py times it)."""
    return sorted(name for name, cls in METHODS.items() if cls.structured and not cls.allocates_latency)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=".cache/cifar10-jpg/cifar10", help="image folder with train/ and test/")
    parser.add_argument("--archive", default="../shared/data/cifar10-jpg.tar.gz",
                        help="extracted into the parent of --data when --data is missing")
    parser.add_argument("--out", default=".cache/bench-cifar10", help="checkpoints, ONNX files, results.json")
    parser.add_argument("--doc", default="docs/benchmarks/cifar10-methods.md", help="the markdown report")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="default: every structured method, plus magnitude_unstructured as an extra row")
    parser.add_argument("--subset", type=int, default=10000, help="training images used (val is 10 %% of them)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=15, help="baseline epochs")
    parser.add_argument("--lr", type=float, default=0.1, help="baseline learning rate (SGD, cosine)")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="fine-tune epochs after pruning, every method")
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--target", type=float, default=0.5, help="MACs reduction every method is bisected to")
    parser.add_argument("--tolerance", type=float, default=0.01, help="bisection stops within this of --target")
    parser.add_argument("--scan", type=int, default=6, help="evenly spaced ratios tried before bisecting")
    parser.add_argument("--bisect-steps", type=int, default=5, help="bisection steps inside the first crossing")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--calib-batches", type=int, default=10, help="training batches data-driven methods see")
    parser.add_argument("--adversarial-epochs", type=int, default=10,
                        help="passes over the calibration batches while adversarial's masks learn (default 40)")
    parser.add_argument("--latency-batch", type=int, default=64, help="second, larger latency batch")
    parser.add_argument("--latency-repeats", type=int, default=60, help="interleaved latency repeats per batch size")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--joint-repeats", type=int, default=200,
                        help="rounds of the final joint latency measurement at batch 1 (large batch: 1/4)")
    parser.add_argument("--torch-threads", type=int, default=2, help="PyTorch intra-op threads (training)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="ignore results already in the JSON")
    parser.add_argument("--redo", nargs="+", default=[], help="rerun these methods even if the JSON has them")
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON and stop")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace, methods: list[str], data_path: Path) -> PipelineConfig:
    adversarial = {"epochs": args.adversarial_epochs}
    return PipelineConfig(
        project={"seed": args.seed},
        model={"name": "resnet20"},
        data={"dataset": "imagefolder", "path": str(data_path), "subset": args.subset, "augment": "crop_flip",
              "batch_size": args.batch_size, "val_fraction": args.val_fraction},
        methods={name: {**METHOD_PARAMS.get(name, {}), **(adversarial if name == "adversarial" else {})}
                 for name in methods},
        train={"epochs": args.epochs, "lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4},
        retrain={"epochs": args.finetune_epochs, "lr": args.finetune_lr, "momentum": 0.9, "weight_decay": 5e-4},
        prune={"round_to": args.round_to, "max_layer_ratio": 0.9, "calib_batches": args.calib_batches},
        evaluate={"latency_warmup": 10, "latency_repeats": args.latency_repeats, "latency_batch": 1,
                  "latency_batch_large": args.latency_batch, "threads": args.threads},
    )


def ensure_data(data_path: Path, archive: Path) -> None:
    if (data_path / "train").is_dir() and (data_path / "test").is_dir():
        return
    if not archive.is_file():
        raise SystemExit(f"{data_path} is missing and so is the archive {archive}")
    log(f"extracting {archive} into {data_path.parent}")
    data_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(data_path.parent, filter="data")
    if not (data_path / "train").is_dir():
        raise SystemExit(f"{archive} did not produce {data_path}/train: check --data")


def memoize_adversarial_masks() -> None:
    """Learn adversarial's masks once per λ for the whole run.

    The masks depend on the unpruned model, the calibration batches and λ, never on the ratio (which only caps
    how many dead channels a layer may lose), and nothing random runs after them in ``Adversarial.prune``. Every
    prune here starts from ``torch.manual_seed(seed)``, so reusing the first prune's masks in the later bisection
    steps and in the final prune gives exactly what learning them again would, at 1/N of the cost.
    """
    from pruneflow.methods import adversarial

    original = adversarial.learn_masks
    cache: dict[str, list[torch.Tensor]] = {}

    def fingerprint(*tensors: torch.Tensor) -> str:
        digest = hashlib.md5()
        for tensor in tensors:
            digest.update(tensor.detach().contiguous().numpy().tobytes())
        return digest.hexdigest()

    @functools.wraps(original)
    def learn_masks(model, groups, batches, strength, params):
        key = json.dumps([strength, params.model_dump(), [g.name for g in groups],
                          fingerprint(*model.state_dict().values()),
                          fingerprint(*(t for pair in batches for t in pair))])
        if key not in cache:
            started = time.perf_counter()
            cache[key] = original(model, groups, batches, strength, params)
            log(f"adversarial: masks for λ={strength:g} learnt in {time.perf_counter() - started:.0f}s "
                f"({sum(int((m == 0).sum()) for m in cache[key])} of {sum(m.numel() for m in cache[key])} dead)")
        return [mask.clone() for mask in cache[key]]

    adversarial.learn_masks = learn_masks


def machine() -> dict[str, Any]:
    cpu = cpu_model()
    import onnxruntime
    import torch_pruning

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "python": platform.python_version(), "torch": torch.__version__, "torch_pruning": torch_pruning.__version__,
            "onnxruntime": onnxruntime.__version__, "platform": platform.platform()}


def run_method(cfg: PipelineConfig, args: argparse.Namespace, method: str, baseline_dir: Path, data_path: Path,
               out: Path) -> dict[str, Any]:
    """One row: target, prune, fine-tune, evaluate (in ``<out>/<method>/``)."""
    splits = stages.load_data(cfg, data_path)
    project = ProjectRun(ProjectLayout(out, cfg), DataVersion(data_path, "cifar10-jpg"), baseline_dir, out)
    run = project.method_run(method)
    row: dict[str, Any] = {"method": method, "structured": METHODS.get(method).structured,
                           "params": cfg.methods[method]}
    started, cpu_started = time.perf_counter(), time.process_time()

    pruner = stages.method_for(run)
    model, spec, _ = load_model(run.baseline_model)
    calib = (splits.loader("train", cfg.data.batch_size, max_batches=cfg.prune.calib_batches)
             if pruner.needs_calibration else None)  # what stages.prune_with gives the method
    found = ratio_for_macs_reduction(pruner, model, spec.example_inputs(), args.target, round_to=cfg.prune.round_to,
                                     max_layer_ratio=cfg.prune.max_layer_ratio, calib_batches=calib,
                                     steps=args.bisect_steps, scan=args.scan, tolerance=args.tolerance,
                                     seed=cfg.project.seed, log=log)
    row["targeting"] = found.as_dict()
    row["bisect_s"], row["bisect_cpu_s"] = time.perf_counter() - started, time.process_time() - cpu_started
    log(f"{method}: ratio {found.ratio:.4f} gives {found.reduction:.4f} (goal {args.target}, "
        f"{len(found.trials)} trials, {row['bisect_s']:.0f}s)")

    tick = time.perf_counter()
    torch.manual_seed(cfg.project.seed)  # the seed the bisection's trials used
    targeted = cfg.model_copy(update={"prune": cfg.prune.model_copy(update={"ratio": found.ratio})})
    run = replace(run, layout=ProjectLayout(out, targeted))
    stages.search_ratio(run, log=log)  # the bisected ratio as a fixed prune.ratio: the plan the prune stage reads
    summary = stages.prune_model(run, log=log)
    row["prune_s"] = time.perf_counter() - tick
    row["notes"] = summary.notes
    pruned, _, _ = load_model(run.pruned)
    broken = sum(int((~torch.isfinite(t)).sum()) for t in pruned.state_dict().values() if t.is_floating_point())
    if broken:
        raise RuntimeError(f"{method}: the pruned model holds {broken} non-finite weights (NaN/inf): the method "
                           "diverged while pruning; its accuracy and latency would be meaningless")
    row["accuracy_pruned"] = evaluate(pruned, splits.loader("test", 256))  # before any fine-tune
    log(f"{method}: test accuracy right after pruning {row['accuracy_pruned']:.2f}%")

    cpu = time.process_time()
    row.update(stages.retrain_model(run, log=log))
    row["retrain_cpu_s"] = time.process_time() - cpu

    tick = time.perf_counter()
    # Accuracy, MACs, params and ONNX Runtime latency at batch 1 and evaluate.latency_batch_large, interleaved
    # with the baseline's ONNX file.
    row.update(stages.evaluate_model(run, log=log))
    large = f"_b{cfg.evaluate.latency_batch_large}"
    row.update({"latency_big_ms": row[f"latency_ms{large}"],
                "baseline_latency_big_ms": row[f"baseline_latency_ms{large}"],
                "speedup_big": row[f"speedup{large}"]})
    log(f"{method}: batch {cfg.evaluate.latency_batch_large} latency {row['latency_big_ms']:.2f} ms "
        f"(x{row['speedup_big']:.2f})")
    retrained, _, _ = load_model(run.retrained)
    row["onnx_max_abs_diff"] = check_parity(run.latency_onnx, retrained, splits.loader("test", 64, max_batches=2),
                                            cfg.export.atol, cfg.export.rtol)
    row["evaluate_s"] = time.perf_counter() - tick
    row["total_s"], row["total_cpu_s"] = time.perf_counter() - started, time.process_time() - cpu_started
    row["status"] = "ok"
    log(f"{method}: done in {row['total_s']:.0f}s wall, {row['total_cpu_s']:.0f}s CPU")
    return row


def joint_latency(cfg: PipelineConfig, args: argparse.Namespace, results: dict[str, Any], baseline_dir: Path,
                  out: Path, splits) -> None:
    """Time the baseline and every finished row's ONNX file together, round-robin, on the same inputs.

    One session for all files means every row sees the same machine state (other jobs, thermal), which the
    pairwise measurements made minutes apart cannot promise.
    """
    paths = {"baseline": baseline_dir / "model.onnx"}
    paths.update({key: out / key / "latency" / "model.onnx" for key, row in results["methods"].items()
                  if row.get("status") == "ok" and (out / key / "latency" / "model.onnx").is_file()})
    results["joint_latency"] = {}
    for suffix, inputs in stages.latency_inputs(cfg, splits).items():
        suffix = suffix or f"_b{cfg.evaluate.latency_batch}"
        repeats = args.joint_repeats if len(inputs) == 1 else max(10, args.joint_repeats // 4)
        tick = time.perf_counter()
        timing = measure_latency(paths, inputs, warmup=5, repeats=repeats, threads=cfg.evaluate.threads)
        results["joint_latency"][suffix] = {name: {"median_ms": t.median_ms, "p90_ms": t.p90_ms}
                                            for name, t in timing.items()}
        log(f"joint latency at batch {len(inputs)}: {len(paths)} files x {repeats} rounds in "
            f"{time.perf_counter() - tick:.0f}s")


# ----------------------------------------------------------------------------------------------- report

def fmt(value: Any, spec: str, missing: str = "—") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else missing


def pct(value: Any) -> str:
    return f"{100 * value:.1f} %" if isinstance(value, (int, float)) else "—"


def render(results: dict[str, Any], existing: str | None) -> str:
    settings, base, rows = results["settings"], results.get("baseline", {}), results.get("methods", {})
    ok = {name: row for name, row in rows.items() if row.get("status") == "ok"}
    big = settings["latency_batch"]
    joint = results.get("joint_latency", {})

    def latency(name: str) -> list[str]:
        """b1 ms, b1 speed-up, large-batch ms, large-batch speed-up: the joint measurement."""
        cells = []
        for suffix in ("_b1", f"_b{big}"):
            table = joint.get(suffix, {})
            if name in table and "baseline" in table:
                ms, speedup = table[name]["median_ms"], table["baseline"]["median_ms"] / table[name]["median_ms"]
                cells += [f"{ms:.3f}" if suffix == "_b1" else f"{ms:.2f}", f"{speedup:.2f}×"]
            else:
                cells += ["—", "—"]
        return cells
    lines = [
        "# CIFAR-10 (JPEG) · ResNet-20: every structured pruning method at one MACs target",
        "",
        "Generated by `benchmarks/cifar10_methods.py`; the table and the settings below are rewritten by every run,",
        "the section *What this shows* is kept.",
        "",
        "## Regenerate",
        "",
        "```bash",
        f"cd /path/to/pruneflow   # the tarball is extracted into {settings['data']} on first use",
        results["command"],
        "```",
        "",
        "## Results",
        "",
        f"Target: **{pct(settings['target'])} fewer MACs** for every structured method (its ratio bisected on "
        f"prune-only trials, tolerance ±{100 * settings['tolerance']:.0f} points, channels rounded to multiples of "
        f"{settings['round_to']}), then the **same fine-tune** for all: {settings['finetune_epochs']} epochs, SGD "
        f"lr {settings['finetune_lr']} cosine. Accuracy is top-1 on the full CIFAR-10 test set "
        f"({base.get('test_images', '?')} images); Δ is against our own baseline. Latency: ONNX Runtime "
        f"{results['machine']['onnxruntime']}, CPU, {settings['threads']} threads, real test images; all ONNX files "
        "(baseline and every row) timed together at the end of the run, interleaved round-robin by "
        f"`export.measure_latency`, median of {settings.get('joint_repeats', '?')} rounds at batch 1 and "
        f"{max(10, settings.get('joint_repeats', 40) // 4)} at batch {big} (the pairwise measurement of "
        "`stages.evaluate_model`, made while other jobs ran, is in the last table).",
        "",
        f"| method | ratio | MACs −% | params −% | acc. before FT | acc. after FT | Δ vs baseline | "
        f"latency b1 (ms) | speed-up b1 | latency b{big} (ms) | speed-up b{big} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| **baseline** | — | {fmt(base.get('macs', 0) / 1e6, '.1f')} M | "
        f"{fmt(base.get('params', 0) / 1e3, '.1f')} k | — | "
        f"**{fmt(base.get('accuracy'), '.2f')}** | 0 | " + " | ".join(latency("baseline")) + " |",
    ]
    def far_off(name: str) -> bool:  # more than 5 points from the target: not comparable with the rest
        t = ok[name]["targeting"]
        return ok[name]["structured"] and abs(t["reduction"] - t["goal"]) > FAR_OFF

    order = sorted(ok, key=lambda n: (not ok[n]["structured"], far_off(n), -ok[n]["accuracy"]))
    for name in order:
        row = ok[name]
        flag = "" if row["targeting"]["reached"] or not row["structured"] else " ⚠"
        macs = pct(row["macs_reduction"]) + flag
        lines.append(
            f"| {name} | {row['targeting']['ratio']:.3f} | {macs} | {pct(row['params_reduction'])} | "
            f"{row['accuracy_pruned']:.2f} | {row['accuracy']:.2f} | {-row['accuracy_drop']:+.2f} | "
            + " | ".join(latency(name)) + " |")
    failed = {name: row for name, row in rows.items() if row.get("status") != "ok"}
    for name, row in failed.items():
        lines.append(f"| {name} | **FAILED**: {row.get('error', '?').strip().splitlines()[-1][:240]} |||||||||| ")
    lines += ["", f"Rows: structured methods within {100 * FAR_OFF:.0f} points of the target, by accuracy after "
              f"fine-tuning; then those further off (not comparable); then the unstructured row; then failures. "
              "⚠ = the MACs reduction is not within the tolerance of the target (see the targeting table).", ""]
    un = ok.get(UNSTRUCTURED_ROW)
    if un:
        lines += [f"`{UNSTRUCTURED_ROW}` is not structured: it zeroes {pct(un.get('weight_sparsity'))} of the "
                  "conv/linear weights (bisected to the same 50 % as a share of weights, stem and classifier "
                  "excluded from the mask) but keeps every channel, so dense MACs, parameter count and latency "
                  f"do not change (its speed-up {latency(UNSTRUCTURED_ROW)[1]} is measurement noise).", ""]

    lines += ["### Targeting: achieved MACs reduction per method", "",
              "Every prune-only trial is listed (ratio → MACs reduction), in the order tried.", "",
              "| method | ratio | achieved | off target | reached ±tolerance | trials | notes |",
              "|---|---|---|---|---|---|---|"]
    for name in order:
        row, t = ok[name], ok[name]["targeting"]
        notes = row.get("notes", "").replace("|", "/")
        if len(notes) > 300:
            notes = notes[:300] + " …"
        trials = ", ".join(f"{ratio:.3f}→{100 * reduction:.1f}" for ratio, reduction in t["trials"])
        lines.append(f"| {name} | {t['ratio']:.4f} | {pct(t['reduction'])} | "
                     f"{100 * (t['reduction'] - t['goal']):+.2f} pt | "
                     f"{'yes' if t['reached'] else 'no'} | {trials} | {notes} |")
    lines.append("")

    timings = results.get("timings", {})
    lines += ["### Wall time per phase", "",
              "Wall seconds, with this process's CPU seconds (both threads together) in brackets. Other jobs shared "
              "the 2 cores, so wall times are inflated; on a free machine a phase's wall time would lie between its "
              "CPU time / 2 and its CPU time.",
              "", "| phase | seconds |", "|---|---|",
              f"| decode the JPEGs (train + test) | {fmt(timings.get('data_s'), '.0f')} |",
              f"| baseline training ({settings['epochs']} epochs) + ONNX export + metrics | "
              f"{fmt(base.get('train_seconds'), '.0f')} + {fmt(timings.get('baseline_rest_s'), '.0f')} "
              f"({fmt(timings.get('baseline_cpu_s'), '.0f')} CPU) |"]
    lines += ["", "| method | bisection | prune + eval before FT | fine-tune | evaluate + latency | total |",
              "|---|---|---|---|---|---|"]
    for name in order:
        row = ok[name]
        lines.append(f"| {name} | {row['bisect_s']:.0f} ({fmt(row.get('bisect_cpu_s'), '.0f')}) | "
                     f"{row['prune_s']:.0f} | "
                     f"{row['retrain_seconds']:.0f} ({fmt(row.get('retrain_cpu_s'), '.0f')}) | "
                     f"{row['evaluate_s']:.0f} | "
                     f"{row['total_s']:.0f} ({fmt(row.get('total_cpu_s'), '.0f')}) |")
    total, cpu = timings.get("total_s"), timings.get("cpu_s")
    lines += ["", f"Total: **{fmt(total / 60 if total else None, '.1f')} min wall**, "
              f"{fmt(cpu / 60 if cpu else None, '.1f')} min CPU "
              f"({'one process' if timings.get('runs', 1) == 1 else 'summed over resumed runs'}).", ""]

    lines += ["### Latency measured pairwise during the run", "",
              f"`stages.evaluate_model` timed each pruned file against the baseline right after its fine-tune "
              f"(median of {settings['latency_repeats']} interleaved runs per batch size). Other jobs were using "
              "the CPU at different moments, so these speed-ups are noisier than the joint ones above (rows with "
              "identical channel counts show the spread).", "",
              f"| method | speed-up b1 | speed-up b{big} |", "|---|---|---|"]
    for name in order:
        row = ok[name]
        lines.append(f"| {name} | {row['speedup']:.2f}× | {fmt(row.get('speedup_big'), '.2f')}× |")
    lines.append("")

    m = results["machine"]
    lines += ["## Settings and machine", "",
              f"- Data: `../shared/data/cifar10-jpg.tar.gz` (CIFAR-10 re-encoded as JPEG, quality ≈ 75), an image "
              f"folder; first {settings['subset']} training images (seeded shuffle), "
              f"{100 * settings['val_fraction']:.0f} % of them held out as validation "
              f"({base.get('train_images', '?')} train / {base.get('val_images', '?')} val), "
              f"full test set ({base.get('test_images', '?')}). Augmentation: random crop (pad 4) + horizontal flip.",
              f"- Baseline: ResNet-20 (option-B shortcuts), {settings['epochs']} epochs, SGD momentum 0.9, lr "
              f"{settings['lr']} cosine, weight decay 5e-4, batch {settings['batch_size']}. As in the pipeline, the "
              "one shared baseline is trained with the training hooks of every configured method "
              f"({', '.join(results.get('training_hooks', [])) or 'none'}): slimming adds its L1 penalty on BN γ "
              f"(λ = {METHOD_PARAMS['slimming']['sparsity']:g}, METHODS.md's ResNet value) to every method's "
              "baseline, statistical's per-epoch filter recorder only reads the weights.",
              f"- Pruning: ratio per method found by `pruneflow.targeting.ratio_for_macs_reduction`: "
              f"{settings['scan']} evenly spaced ratios in (0, 0.9], then up to {settings['bisect_steps']} bisection "
              f"steps inside the first interval that crosses {pct(settings['target'])}, the closest trial wins; "
              f"`round_to={settings['round_to']}`, "
              f"`max_layer_ratio=0.9`, stem conv and classifier never pruned; data-driven methods see "
              f"{settings['calib_batches']} training batches of {settings['batch_size']}.",
              f"- Method params: defaults, except slimming λ = {METHOD_PARAMS['slimming']['sparsity']:g} and "
              f"adversarial `epochs={settings['adversarial_epochs']}` (mask-learning passes over the "
              f"{settings['calib_batches'] - 1} fitting batches per λ, default 40, to bound its cost). "
              "adversarial's masks do not depend on the ratio, "
              "so the benchmark learns them once per λ and reuses them across the bisection and the final prune "
              "(identical results under the fixed seed). layer_entropy and info_richness retrain with the standard "
              "loop, not joint grafting (grafting trains K = 2 copies, twice the fine-tune budget).",
              f"- Fine-tune: {settings['finetune_epochs']} epochs, lr {settings['finetune_lr']} cosine, the method's "
              "own recipe where it has one (channel_sparsity adds its λ‖W‖² term; magnitude_unstructured holds its "
              "zeros).",
              f"- Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
              f"torch-pruning {m['torch_pruning']}, onnxruntime {m['onnxruntime']}, Python {m['python']}, "
              f"`OMP_WAIT_POLICY={m.get('omp_wait_policy')}`. No GPU. "
              "Other jobs (test runs, other benchmarks) shared the 2 cores during the run, so wall times are "
              "inflated and the pairwise latencies are noisy; the joint latency measurement (all files round-robin "
              "in one session) cancels slow drifts but not short bursts.",
              "", "## Caveats", "",
              "- **JPEG CIFAR-10 and short schedules.** The images are lossy JPEGs and the baseline trains "
              f"{settings['epochs']} epochs on {settings['subset']} images, so our baseline is far below the papers' "
              "91–93 % ResNet-20/56 numbers. Compare the methods by their drop against *our* baseline, never with the "
              "papers' absolute accuracies.",
              f"- **One seed, {settings['finetune_epochs']} fine-tune epochs.** Differences of a few tenths of a point "
              "between methods are within seed noise; a longer fine-tune narrows the gaps between criteria (the "
              "'before FT' column shows how much each criterion's choice hurts on its own).",
              f"- **Rounding decides where a method can land.** With `round_to={settings['round_to']}` on ResNet-20's "
              "16/32/64-channel layers every layer keeps a multiple of 8 channels (pruneflow rounds uniform ratios "
              "to the nearest multiple, the channel-group methods round up), so the MACs reduction moves in steps: "
              "see the trials in the targeting table (in the run recorded here the uniform methods jumped "
              "44.5 → 49.7 → 60.0 %, apoz and channel_sparsity, which leave the residual channels whole, "
              "48.7 → 52.7 %, cascade 46.2 → 57.8 % by whole blocks). Torch-Pruning's own rounding "
              "(kept channels rounded down, a layer skipped when "
              "that would empty it) still applies to the global-threshold methods (slimming, lamp) and can make "
              "the reduction fall as the ratio grows, which is why the targeting scans before it bisects. Rows "
              "differ by a few points of MACs: read accuracy together with the achieved reduction.",
              "", "### Published numbers (other networks, lossless CIFAR-10, full schedules)", "",
              "| method | paper |", "|---|---|"]
    lines += [f"| {name} | {PAPER[name]} |" for name in PAPER if name in rows]
    lines += [f"| (bar) | {PUBLIC_BAR} |", ""]

    analysis = "_Not written yet._"
    if existing and ANALYSIS_START in existing and ANALYSIS_END in existing:
        analysis = existing.split(ANALYSIS_START, 1)[1].split(ANALYSIS_END, 1)[0].strip()
    lines += ["## What this shows", "", ANALYSIS_START, analysis, ANALYSIS_END, ""]
    return "\n".join(lines)


def write_report(results: dict[str, Any], doc: Path) -> None:
    doc.parent.mkdir(parents=True, exist_ok=True)
    existing = doc.read_text() if doc.is_file() else None
    doc.write_text(render(results, existing))
    log(f"report written to {doc}")


# ----------------------------------------------------------------------------------------------- main

def regenerating(argv: list[str] | None) -> list[str]:
    """The arguments of this run minus the ones that only steer resuming (--fresh, --redo ...)."""
    kept, skipping = [], False
    for arg in argv if argv is not None else sys.argv[1:]:
        if arg.startswith("--"):
            skipping = arg in ("--redo", "--fresh")
        if not skipping:
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    os.chdir(ROOT)
    out, doc = Path(args.out), Path(args.doc)
    results_path = out / "results.json"
    if args.report_only:
        write_report(json.loads(results_path.read_text()), doc)
        return 0

    data_path = Path(args.data).resolve()
    ensure_data(data_path, Path(args.archive))
    structured = structured_methods()
    methods = args.methods or [*structured, UNSTRUCTURED_ROW]
    cfg = build_config(args, methods, data_path)
    settings = {key: value for key, value in vars(args).items()
                if key not in ("fresh", "report_only", "doc", "redo")}
    # What the finished rows depend on (the knobs that build the config); a rerun with equal knobs resumes.
    fingerprint = hashlib.md5(json.dumps([{k: v for k, v in settings.items() if k not in RESUME_IGNORES},
                                          METHOD_PARAMS], sort_keys=True, default=str).encode()).hexdigest()[:12]
    results: dict[str, Any] = {}
    if results_path.is_file() and not args.fresh:
        previous = json.loads(results_path.read_text())
        if previous.get("fingerprint") == fingerprint:
            results = previous
            log(f"resuming {results_path}: {sum(r.get('status') == 'ok' for r in results['methods'].values())} "
                "methods already done")
    if not results:
        results = {"fingerprint": fingerprint, "methods": {}, "timings": {"total_s": 0.0, "runs": 0}}
    command = shlex.join([".venv/bin/python", "benchmarks/cifar10_methods.py", *regenerating(argv)])
    results.update({"settings": settings, "command": command, "machine": machine(),
                    "structured_methods": structured, "training_hooks": sorted(stages.training_hooked_methods(cfg))})
    results["timings"]["runs"] = results["timings"].get("runs", 0) + 1
    run_start, run_cpu = time.perf_counter(), time.process_time()
    previous_total = results["timings"].get("total_s", 0.0)
    previous_cpu = results["timings"].get("cpu_s", 0.0)

    def save() -> None:
        results["timings"]["total_s"] = previous_total + time.perf_counter() - run_start
        results["timings"]["cpu_s"] = previous_cpu + time.process_time() - run_cpu
        stages.write_json(results_path, results)

    log(f"benchmark: {len(methods)} methods, target {args.target:.0%} MACs, subset {args.subset}, "
        f"{args.epochs} baseline epochs, {args.finetune_epochs} fine-tune epochs; {results['machine']['cpu']}, "
        f"{torch.get_num_threads()} torch threads")
    memoize_adversarial_masks()

    tick = time.perf_counter()
    splits = stages.load_data(cfg, data_path)
    if "data_s" not in results["timings"]:
        results["timings"]["data_s"] = time.perf_counter() - tick
    log(f"data: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images, "
        f"{splits.num_classes} classes, {time.perf_counter() - tick:.0f}s")

    baseline_dir = out / f"baseline-{stages.baseline_key(cfg, 'cifar10-jpg')}"
    if (baseline_dir / "metrics.json").is_file():
        base = stages.read_json(baseline_dir / "metrics.json")
        log(f"baseline: reusing {baseline_dir} (test accuracy {base['accuracy']:.2f}%)")
    else:
        tick, cpu = time.perf_counter(), time.process_time()
        data = DataVersion(data_path, "cifar10-jpg")
        base = stages.train_baseline(ProjectRun(ProjectLayout(out, cfg), data, baseline_dir, out), log=log)
        results["timings"]["baseline_rest_s"] = time.perf_counter() - tick - base["train_seconds"]
        results["timings"]["baseline_cpu_s"] = time.process_time() - cpu
    results["baseline"] = {**base, "dir": str(baseline_dir), "train_images": len(splits.train),
                           "val_images": len(splits.val), "test_images": len(splits.test)}
    save()

    for index, method in enumerate(methods, 1):
        if results["methods"].get(method, {}).get("status") == "ok" and method not in args.redo:
            log(f"[{index}/{len(methods)}] {method}: done in an earlier run, skipped")
            continue
        log(f"[{index}/{len(methods)}] {method}")
        try:
            results["methods"][method] = run_method(cfg, args, method, baseline_dir, data_path, out)
        except Exception as err:  # one failing method must not cost the others
            log(f"{method}: FAILED: {err!r}")
            results["methods"][method] = {"method": method, "status": "failed", "error": traceback.format_exc(),
                                          "structured": METHODS.get(method).structured,
                                          "params": cfg.methods[method]}
        save()
    joint_latency(cfg, args, results, baseline_dir, out, splits)
    save()
    write_report(results, doc)
    failed = [name for name, row in results["methods"].items() if row.get("status") != "ok"]
    log(f"done in {results['timings']['total_s'] / 60:.1f} min" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
