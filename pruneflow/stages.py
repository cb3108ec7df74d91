"""The pipeline's stages as plain functions: each reads paths and params, writes artifacts, returns small dicts.

Prefect tasks (tasks/) wrap these and log to MLflow; ``pruneflow stage`` and dvc.yaml call them directly.
Nothing here knows about Prefect or MLflow.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tabulate import tabulate

from pruneflow import deploy
from pruneflow.checkpoint import ModelSpec, load_model, save_model
from pruneflow.config import DataConfig, PipelineConfig, TrainConfig
from pruneflow.data import DataSplits, load_dataset
from pruneflow.export import check_parity, export_onnx, measure_latency
from pruneflow.layout import ProjectLayout
from pruneflow.methods import PruneResult, PruneTarget, PruningMethod, create_method
from pruneflow.metrics import count_macs_params, file_size_mb, reductions, zero_weight_share
from pruneflow.methods.groups import channel_groups
from pruneflow.search import (TrialCallback, TrialMeasure, TrialPlan, check_reachable, fail_stale, feasible_trials,
                              open_study, plot_search, run_trials, select, space_params, target_gap,
                              top_trials_markdown, trial_ratios)
from pruneflow.task import TASKS
from pruneflow.training import EpochResult, evaluate, evaluate_all, train

Log = Callable[[str], None]


def say(message: str) -> None:
    print(message, flush=True)


def write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@functools.lru_cache(maxsize=2)
def _cached_splits(data_path: Path, data_json: str, seed: int) -> DataSplits:
    return load_dataset(DataConfig.model_validate_json(data_json), data_path, seed, progress=say)


def load_data(cfg: PipelineConfig, data_path: Path) -> DataSplits:
    """Decoded splits, shared by every stage of one process (decoding is the slow part on big folders)."""
    return _cached_splits(Path(data_path).resolve(), cfg.data.model_dump_json(), cfg.project.seed)


def model_spec(cfg: PipelineConfig, splits: DataSplits) -> ModelSpec:
    """The model the params name, sized by the data (input channels and shape; classes, or the SR scale)."""
    return ModelSpec(cfg.model.name, splits.in_channels, splits.num_classes, splits.input_shape,
                     {**cfg.model.kwargs, **splits.model_kwargs}, splits.mean, splits.std)


def epoch_logger(prefix: str, total: int, log: Log, metric: str = "accuracy") -> Callable[[EpochResult], None]:
    def report(result: EpochResult) -> None:
        val = f" val_{metric}={result.val_metric:.2f}" if result.val_metric is not None else ""
        log(f"{prefix}: epoch {result.epoch}/{total} loss={result.train_loss:.4f}{val} ({result.seconds:.1f}s)")
    return report


def regularizers(cfg: PipelineConfig) -> dict[str, Any]:
    """Sparsity terms the configured methods need during baseline training (e.g. slimming's L1 on γ)."""
    terms = {name: create_method(name, params).regularizer() for name, params in cfg.methods.items()}
    return {name: term for name, term in terms.items() if term is not None}


def recorders(cfg: PipelineConfig) -> dict[str, Any]:
    """Per-epoch recorders the configured methods need during baseline training (e.g. filter statistics)."""
    found = {name: create_method(name, params).recorder() for name, params in cfg.methods.items()}
    return {name: recorder for name, recorder in found.items() if recorder is not None}


def training_hooked_methods(cfg: PipelineConfig) -> dict[str, Any]:
    return {name: cfg.methods[name] for name in sorted({*regularizers(cfg), *recorders(cfg)})}


def baseline_key(cfg: PipelineConfig, data_md5: str) -> str:
    """Everything that changes the baseline's weights; equal keys reuse the checkpoint."""
    parts = {
        "data_md5": data_md5,
        "data": cfg.data.model_dump(exclude={"path"}),
        "model": cfg.model.model_dump(),
        "train": cfg.train.model_dump(exclude={"device"}),  # where it trained changes rounding, not the recipe
        "seed": cfg.project.seed,
        "training_hooks": training_hooked_methods(cfg),
    }
    return hashlib.md5(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def train_baseline(cfg: PipelineConfig, data_path: Path, out_dir: Path, log: Log = say) -> dict[str, Any]:
    """Train the model from scratch, export it to ONNX (parity-checked) and write its metrics."""
    torch.manual_seed(cfg.project.seed)
    splits = load_data(cfg, data_path)
    spec = model_spec(cfg, splits)
    model = spec.build()
    task = TASKS[cfg.task]
    terms, records = regularizers(cfg), recorders(cfg)
    if terms or records:
        log(f"baseline: training with the hooks of {', '.join(training_hooked_methods(cfg))}")
    progress = epoch_logger("baseline", cfg.train.epochs, log, task.metric)

    def on_epoch_end(result: EpochResult) -> None:
        progress(result)
        for recorder in records.values():
            recorder.on_epoch_end(model, result.epoch)

    start = time.perf_counter()
    train(model, splits.loader("train", cfg.data.batch_size, shuffle=True, augment=cfg.data.augment, seed=cfg.project.seed),
          cfg.train, val_batches=splits.loader("val", 256), regularizers=terms.values(), on_epoch_end=on_epoch_end)
    seconds = time.perf_counter() - start
    for name, recorder in records.items():
        (out_dir / "records").mkdir(parents=True, exist_ok=True)
        torch.save(recorder.state(), out_dir / "records" / f"{name}.pt")
    model_path = save_model(out_dir / "model.pt", model, spec)
    onnx_path = export_onnx(model, spec.example_inputs(), out_dir / "model.onnx", cfg.export.opset)
    diff = check_parity(onnx_path, model, splits.loader("test", 64, max_batches=cfg.export.parity_batches),
                        cfg.export.atol)
    macs, params = count_macs_params(model, spec.example_inputs(1))
    metrics = {
        **evaluate_all(model, splits.loader("test", 256)),  # accuracy; psnr, ssim
        **{f"val_{name}": value for name, value in evaluate_all(model, splits.loader("val", 256)).items()},
        "macs": macs,
        "params": params,
        "size_mb": file_size_mb(model_path),
        "onnx_max_abs_diff": diff,
        "train_seconds": seconds,
    }
    write_json(out_dir / "metrics.json", metrics)  # written last: its presence marks a complete baseline
    log(f"baseline: test {task.metric} {metrics[task.metric]:.2f} {task.unit}, {macs / 1e6:.2f} M MACs, "
        f"{params / 1e3:.1f} k params")
    return metrics


def method_for(cfg: PipelineConfig, method: str, baseline_dir: Path) -> PruningMethod:
    """The configured method, given what it recorded during baseline training, if anything."""
    pruner = create_method(method, cfg.methods[method])
    records = baseline_dir / "records" / f"{method}.pt"
    if pruner.recorder() is not None:
        if not records.is_file():
            raise FileNotFoundError(f"{records}: method {method} needs statistics recorded by the baseline stage")
        pruner.use_records(torch.load(records, weights_only=True))
    return pruner


def fine_tune(pruner: PruningMethod, model: torch.nn.Module, batches, val_batches, cfg: TrainConfig,
              on_epoch_end: Callable[[EpochResult], None]) -> list[EpochResult]:
    """The method's own retraining recipe if it has one (grafting, masks kept at zero), else the standard loop."""
    epochs = pruner.retrain(model, batches, val_batches, cfg, on_epoch_end)
    if epochs is None:
        epochs = train(model, batches, cfg, val_batches=val_batches, on_epoch_end=on_epoch_end)
    return epochs


def prune_with(cfg: PipelineConfig, pruner: PruningMethod, model: torch.nn.Module, spec: ModelSpec,
               ratio: float, splits: DataSplits, layer_ratios: dict[str, float] | None = None) -> PruneResult:
    calib = (splits.loader("train", cfg.data.batch_size, max_batches=cfg.prune.calib_batches)
             if pruner.needs_calibration else None)
    target = PruneTarget(ratio=ratio, layer_ratios=dict(layer_ratios or {}), round_to=cfg.prune.round_to,
                         max_layer_ratio=cfg.prune.max_layer_ratio)
    return pruner.prune(model, spec.example_inputs(), target, calib)


def study_name(cfg: PipelineConfig, method: str, data_md5: str) -> str:
    """Same data, model, method and trial-shaping settings → same study, so a rerun resumes and extends it.

    How many trials run, where, and how one is picked afterwards do not change a trial's result, so they
    are left out: asking for more trials or another selection policy reuses the finished ones.
    """
    search = cfg.search.model_dump(exclude={"n_trials", "n_workers", "storage", "selection", "tolerance"})
    parts = {"method": cfg.methods[method], "search": search, "prune": cfg.prune.model_dump(),
             "retrain": cfg.retrain.model_dump(), "model": cfg.model.model_dump(), "train": cfg.train.model_dump(),
             "data": cfg.data.model_dump(exclude={"path"}), "seed": cfg.project.seed}
    digest = hashlib.md5(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]
    return f"{method}-{cfg.model.name}-{data_md5[:8]}-{digest}"


def search_params(cfg: PipelineConfig, model: torch.nn.Module, spec: ModelSpec) -> dict[str, list[str]]:
    """The search space's parameters: layer groups named by their root module, stages by their resolution."""
    if cfg.search.space == "global":
        return space_params("global", {}, [])
    layers = [group.name for group in channel_groups(model, spec.example_inputs())]
    return space_params(cfg.search.space, stages_by_resolution(model, spec.example_inputs(), layers), layers)


def stages_by_resolution(model: torch.nn.Module, example_inputs: torch.Tensor, layers: list[str]) -> dict[str, list[str]]:
    """Consecutive layers working at one spatial size form a stage (a ResNet's stage, a VGG block)."""
    sizes: dict[str, str] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:
            sizes.setdefault(name, "x".join(map(str, output.shape[2:])) or "fc")
        return hook

    hooks = [model.get_submodule(name).register_forward_hook(record(name)) for name in layers]
    try:
        with torch.no_grad():
            model.eval()(example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    stages: dict[str, list[str]] = {}
    for name in layers:
        stages.setdefault(sizes[name], []).append(name)
    return stages


class TrialRunner:
    """Prunes, measures and fine-tunes one trial's model; built per process (search workers rebuild it)."""

    def __init__(self, cfg: PipelineConfig, method: str, baseline_dir: Path, data_path: Path) -> None:
        self.cfg, self.baseline_dir = cfg, baseline_dir
        self.splits = load_data(cfg, data_path)
        self.pruner = method_for(cfg, method, baseline_dir)
        self.baseline = read_json(baseline_dir / "metrics.json")
        self.metric = TASKS[cfg.task].metric
        self.finetune = cfg.retrain.model_copy(update={"epochs": cfg.search.finetune_epochs})
        model, spec, _ = load_model(baseline_dir / "model.pt")
        self.params = search_params(cfg, model, spec)

    def pruned(self, plan: TrialPlan) -> tuple[torch.nn.Module, dict[str, float]]:
        model, spec, _ = load_model(self.baseline_dir / "model.pt")
        prune_with(self.cfg, self.pruner, model, spec, plan.ratio, self.splits, plan.layer_ratios)
        costs = reductions(model, spec.example_inputs(1), self.baseline["macs"], self.baseline["params"],
                           self.pruner.structured)
        search = self.cfg.search
        if search.measure_latency or "latency_ms" in (search.target.metric, *search.objectives):
            costs["latency_ms"] = self.latency(model, spec)
        return model, costs

    def latency(self, model: torch.nn.Module, spec: ModelSpec) -> float:
        with tempfile.TemporaryDirectory() as scratch:
            path = export_onnx(model, spec.example_inputs(), Path(scratch) / "trial.onnx", self.cfg.export.opset)
            inputs = next(iter(self.splits.loader("val", self.cfg.evaluate.latency_batch)))[0].numpy()
            timing = measure_latency({"trial": path}, inputs, self.cfg.evaluate.latency_warmup,
                                     self.cfg.evaluate.latency_repeats, self.cfg.evaluate.threads)
        return timing["trial"].median_ms

    def measure(self, plan: TrialPlan) -> dict[str, float]:
        return self.pruned(plan)[1]

    def score(self, plan: TrialPlan, report: Callable[[int, float], None]) -> TrialMeasure:
        model, costs = self.pruned(plan)
        val = self.splits.loader("val", 256)
        if target_gap(self.cfg.search, costs) > 0 or self.finetune.epochs == 0:
            return TrialMeasure(evaluate(model, val), costs)  # infeasible trials skip the fine-tune
        torch.manual_seed(self.cfg.project.seed)
        batches = self.splits.loader("train", self.cfg.data.batch_size, shuffle=True, augment=self.cfg.data.augment)
        history = fine_tune(self.pruner, model, batches, val, self.finetune, lambda r: report(r.epoch, r.val_metric))
        return TrialMeasure(history[-1].val_metric, costs, len(history))


def trial_progress(method: str, log: Log) -> TrialCallback:
    """An Optuna callback logging each finished trial's state, ratios and measured costs."""

    def progress(study, trial) -> None:
        ratios = ", ".join(f"{k.removeprefix('ratio.')}={v:.2f}" for k, v in trial_ratios(trial).items())
        log(f"{method}: trial {trial.number} {trial.state.name.lower()} [{ratios}] "
            + " ".join(f"{k}={v:.3f}" for k, v in trial.user_attrs.items() if isinstance(v, float)))

    return progress


def search_worker(cfg: PipelineConfig, method: str, baseline_dir: Path, data_path: Path, storage: str, name: str,
                  n_trials: int, seed: int, callbacks: list[TrialCallback] = ()) -> None:
    """One process's share of the trials; several of these (or several machines) can share one study."""
    runner = TrialRunner(cfg, method, baseline_dir, data_path)
    study = open_study(storage, name, cfg.search, seed)
    run_trials(study, cfg.search, runner.params, runner.score, n_trials, callbacks, runner.measure)


def _worker_process(*args) -> None:
    torch.set_num_threads(1)  # n workers share the cores
    search_worker(*args)


def search(cfg: PipelineConfig, method: str, baseline_dir: Path, data_path: Path, out_dir: Path, storage: str,
           name: str, callbacks: list[TrialCallback] = (), log: Log = say) -> dict[str, Any]:
    """Choose the pruning ratios: a fixed ``prune.ratio`` if set, else the study's trial picked by the policy.
    A method whose params alone fix what it removes (``cascade`` with ``drop``) has no ratio to search.

    Writes ``search.json`` (the choice), ``trials.md`` (the top trials) and ``search.png`` (history and
    trade-off plots) into ``out_dir``.
    """
    fixed = create_method(method, cfg.methods[method]).fixed_by_params()
    if cfg.prune.ratio is not None or fixed:
        reason = f"its params {cfg.methods[method]} fix what it removes" if fixed else f"prune.ratio={cfg.prune.ratio} is set"
        log(f"{method}: {reason}, search skipped")
        chosen = {"ratio": cfg.prune.ratio or 0.0, "layer_ratios": {}, "searched": False}
        write_json(out_dir / "search.json", chosen)
        return chosen
    runner = TrialRunner(cfg, method, baseline_dir, data_path)
    study = open_study(storage, name, cfg.search, cfg.project.seed)
    fail_stale(study)
    if not feasible_trials(study, cfg.search):
        check_reachable(cfg.search, runner.params, runner.measure)

    progress = trial_progress(method, log)
    workers = cfg.search.n_workers
    log(f"{method}: {cfg.search.n_trials} trials in study {name} ({len(study.trials)} there already), "
        f"{workers} worker(s), space {cfg.search.space} with {len(runner.params)} ratio(s)")
    if workers == 1:
        run_trials(study, cfg.search, runner.params, runner.score, cfg.search.n_trials, [progress, *callbacks],
                   runner.measure)
    else:
        shares = [cfg.search.n_trials // workers + (i < cfg.search.n_trials % workers) for i in range(workers)]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            jobs = [pool.submit(_worker_process, cfg, method, baseline_dir, data_path, storage, name, share,
                                cfg.project.seed + i + 1, list(callbacks)) for i, share in enumerate(shares) if share]
            for job in jobs:
                job.result()
    outcome = select(study, cfg.search, runner.params, runner.baseline[f"val_{runner.metric}"])
    (out_dir / "trials.md").parent.mkdir(parents=True, exist_ok=True)
    (out_dir / "trials.md").write_text(top_trials_markdown(study, cfg.search, outcome.trial_number))
    plot_search(study, cfg.search, outcome.trial_number, out_dir / "search.png")
    log(f"{method}: chose trial {outcome.trial_number} ({cfg.search.selection}): val {runner.metric} "
        f"{outcome.metric:.2f}, {cfg.search.target.metric} {outcome.costs[cfg.search.target.metric]:.3f}; "
        f"{outcome.completed_trials} completed, {outcome.pruned_trials} pruned trials in the study")
    chosen = {**outcome.as_dict(), "searched": True}
    write_json(out_dir / "search.json", chosen)
    return chosen


def prune(cfg: PipelineConfig, method: str, baseline_dir: Path, chosen: dict[str, Any], data_path: Path,
          out_dir: Path, log: Log = say) -> dict[str, Any]:
    """Prune the baseline as the search chose; save the model, its Torch-Pruning history and the per-layer report."""
    splits = load_data(cfg, data_path)
    model, spec, _ = load_model(baseline_dir / "model.pt")
    ratio, layer_ratios = chosen["ratio"], chosen.get("layer_ratios") or {}
    macs_before, params_before = count_macs_params(model, spec.example_inputs(1))
    result = prune_with(cfg, method_for(cfg, method, baseline_dir), model, spec, ratio, splits, layer_ratios)
    macs_after, params_after = count_macs_params(model, spec.example_inputs(1))
    save_model(out_dir / "pruned.pt", model, spec, result.history, result.removed_blocks)
    write_json(out_dir / "history.json", {"removed_blocks": result.removed_blocks,
                                          "torch_pruning_history": [list(step) for step in result.history]})
    summary = {"ratio": ratio, "layer_ratios": layer_ratios, "macs_before": macs_before, "macs_after": macs_after,
               "params_before": params_before, "params_after": params_after,
               "layers": [layer.as_dict() for layer in result.layers], "notes": result.notes}
    write_json(out_dir / "layers.json", summary)
    log(f"{method}: pruned at ratio {ratio:.3f}: MACs {macs_before / 1e6:.2f} M -> {macs_after / 1e6:.2f} M")
    return summary


def retrain(cfg: PipelineConfig, method: str, pruned_path: Path, data_path: Path, out_dir: Path,
            log: Log = say) -> dict[str, Any]:
    """Fine-tune the pruned model: the method's own recipe if it has one, else the ``retrain`` schedule."""
    splits = load_data(cfg, data_path)
    model, spec, surgery = load_model(pruned_path)
    torch.manual_seed(cfg.project.seed)
    start = time.perf_counter()
    batches = splits.loader("train", cfg.data.batch_size, shuffle=True, augment=cfg.data.augment, seed=cfg.project.seed)
    metric = TASKS[cfg.task].metric
    val, progress = splits.loader("val", 256), epoch_logger(f"{method} retrain", cfg.retrain.epochs, log, metric)
    epochs = fine_tune(create_method(method, cfg.methods[method]), model, batches, val, cfg.retrain, progress)
    save_model(out_dir / "retrained.pt", model, spec, surgery.history, surgery.removed_blocks)
    return {f"val_{metric}": epochs[-1].val_metric if epochs else evaluate(model, splits.loader("val", 256)),
            "retrain_seconds": time.perf_counter() - start}


def evaluate_model(cfg: PipelineConfig, method: str, baseline_dir: Path, model_path: Path, data_path: Path,
                   out_dir: Path, log: Log = say) -> dict[str, Any]:
    """The task's metrics (accuracy; PSNR, SSIM), size, MACs and measured ONNX Runtime latency of the pruned
    model against the baseline; ``<metric>_drop`` is baseline − pruned for the main metric."""
    splits = load_data(cfg, data_path)
    base = read_json(baseline_dir / "metrics.json")
    model, spec, _ = load_model(model_path)
    macs, params = count_macs_params(model, spec.example_inputs(1))
    scratch = export_onnx(model, spec.example_inputs(), out_dir / "latency" / "model.onnx", cfg.export.opset)
    latency = {suffix: measure_latency({"baseline": baseline_dir / "model.onnx", "pruned": scratch}, inputs,
                                       cfg.evaluate.latency_warmup, cfg.evaluate.latency_repeats, cfg.evaluate.threads)
               for suffix, inputs in latency_inputs(cfg, splits).items()}
    task = TASKS[cfg.task]
    quality = evaluate_all(model, splits.loader("test", 256))
    metrics = {
        **quality,
        task.drop: base[task.metric] - quality[task.metric],
        "params": params,
        "macs": macs,
        "params_reduction": 1.0 - params / base["params"],
        "macs_reduction": 1.0 - macs / base["macs"],
        "size_mb": file_size_mb(model_path),
        "weight_sparsity": zero_weight_share(model),
    }
    for suffix, timing in latency.items():
        speedup = timing["baseline"].median_ms / timing["pruned"].median_ms
        metrics.update({f"latency_ms{suffix}": timing["pruned"].median_ms, f"latency_ms{suffix}_p90": timing["pruned"].p90_ms,
                        f"baseline_latency_ms{suffix}": timing["baseline"].median_ms, f"speedup{suffix}": speedup,
                        f"speedup_efficiency{suffix}": speedup * macs / base["macs"]})
    write_json(out_dir / "metrics.json", metrics)
    (out_dir / "report.md").write_text(method_report(method, metrics, out_dir / "layers.json"))
    log(f"{method}: {task.metric} {quality[task.metric]:.2f} {task.unit} (drop {metrics[task.drop]:+.2f}), "
        f"MACs -{metrics['macs_reduction']:.1%}, latency {metrics['latency_ms']:.3f} ms (x{metrics['speedup']:.2f})")
    return metrics


def latency_inputs(cfg: PipelineConfig, splits: DataSplits) -> dict[str, np.ndarray]:
    """Real test images latency is timed on, keyed by metric-name suffix: '' at ``evaluate.latency_batch``
    (batch 1 by default: one request at a time), '_b<N>' at ``evaluate.latency_batch_large`` (throughput).
    A test set smaller than a batch (an SR one holds a dozen images) is repeated to fill it."""
    large = cfg.evaluate.latency_batch_large
    sizes = {"": cfg.evaluate.latency_batch, f"_b{large}": large}
    images = next(iter(splits.loader("test", large)))[0].numpy()
    return {suffix: np.resize(images, (size, *images.shape[1:])) for suffix, size in sizes.items()}


def export(cfg: PipelineConfig, model_path: Path, data_path: Path, out_dir: Path, log: Log = say) -> dict[str, Any]:
    """Write ``export/<target>/``: the formats of ``export.target``, each checked (see ``pruneflow.deploy``), with
    ``report.md`` and ``export.json``. A failed check raises and leaves no files."""
    splits = load_data(cfg, data_path)
    model, spec, _ = load_model(model_path)
    folder = ProjectLayout.export_dir(out_dir, cfg.export.target)
    deployment = deploy.export_target(model, spec, splits, cfg, folder, latency_inputs(cfg, splits), log)
    (folder / "report.md").write_text(deploy.report(deployment, cfg))
    write_json(folder / "export.json", deployment.as_dict())
    return deployment.as_dict()


EFFICIENCY_NOTE = ("speedup_efficiency = speedup ÷ (MACs before / MACs after): 1 means latency fell exactly as much "
                   "as MACs, below 1 the runtime does not turn the removed MACs into time; the goal is ≥ 0.8.")


def method_report(method: str, metrics: dict[str, Any], layers_path: Path) -> str:
    lines = [f"# {method}", "", tabulate([[key, f"{value:.4g}"] for key, value in metrics.items()],
                                         ["metric", "value"], tablefmt="github", disable_numparse=True)]
    lines += ["", EFFICIENCY_NOTE]
    if layers_path.is_file():
        layers = read_json(layers_path)
        columns = ["name", "channels_before", "channels_after", "macs_before", "macs_after"]
        lines += ["", f"Pruning ratio {layers['ratio']:.3f}. {layers['notes']}".rstrip(), "",
                  tabulate([[layer[c] for c in columns] for layer in layers["layers"]],
                           ["layer", "channels before", "channels after", "MACs before", "MACs after"],
                           tablefmt="github", disable_numparse=True)]
    return "\n".join(lines) + "\n"


def compare(baseline: dict[str, Any], methods: dict[str, dict[str, Any]], large_batch: int,
            task: str = "classification") -> str:
    """Markdown table, baseline row first, one row per method, then what speedup_efficiency means; the quality
    columns are the task's metrics and its main metric's drop."""
    quality = (*TASKS[task].metrics, TASKS[task].drop)
    columns = (*quality, "macs_reduction", "params_reduction", "size_mb", "latency_ms", "speedup",
               f"speedup_b{large_batch}", "speedup_efficiency")
    # The baseline's latency is measured beside each method's (same session, interleaved); show their median.
    base_latency = sorted(m["baseline_latency_ms"] for m in methods.values() if "baseline_latency_ms" in m)
    base = {**baseline, TASKS[task].drop: 0.0, "macs_reduction": 0.0, "params_reduction": 0.0, "speedup": 1.0,
            f"speedup_b{large_batch}": 1.0, "latency_ms": base_latency[len(base_latency) // 2] if base_latency else None}
    rows = [[name, *(f"{metrics[c]:.4g}" if isinstance(metrics.get(c), (int, float)) else "" for c in columns)]
            for name, metrics in [("baseline", base), *methods.items()]]
    table = tabulate(rows, ["model", *columns], tablefmt="github", disable_numparse=True)
    return "\n".join([table, "", EFFICIENCY_NOTE]) + "\n"
