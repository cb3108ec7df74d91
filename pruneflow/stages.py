"""The pipeline's stages as plain functions: each reads paths and params, writes artifacts, returns small dicts.

Prefect tasks (tasks/) wrap these and log to MLflow; ``pruneflow stage`` and dvc.yaml call them directly.
Nothing here knows about Prefect or MLflow.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pruneflow.checkpoint import ModelSpec, load_model, save_model
from pruneflow.config import PipelineConfig, TrainConfig
from pruneflow.data import DataSplits, load_splits
from pruneflow.export import check_parity, export_onnx, measure_latency
from pruneflow.methods import PruneResult, PruneTarget, PruningMethod, create_method
from pruneflow.metrics import count_macs_params, file_size_mb, zero_weight_share
from pruneflow.search import TrialCallback, open_study, search_ratio
from pruneflow.training import EpochResult, evaluate, train

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
def _cached_splits(data_path: Path, val_fraction: float, subset: int | None, seed: int) -> DataSplits:
    return load_splits(data_path, val_fraction, subset, seed, progress=say)


def load_data(cfg: PipelineConfig, data_path: Path) -> DataSplits:
    """Decoded splits, shared by every stage of one process (decoding is the slow part on big folders)."""
    return _cached_splits(Path(data_path).resolve(), cfg.data.val_fraction, cfg.data.subset, cfg.project.seed)


def epoch_logger(prefix: str, total: int, log: Log) -> Callable[[EpochResult], None]:
    def report(result: EpochResult) -> None:
        val = f" val_acc={result.val_accuracy:.2f}" if result.val_accuracy is not None else ""
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
        "train": cfg.train.model_dump(),
        "seed": cfg.project.seed,
        "training_hooks": training_hooked_methods(cfg),
    }
    return hashlib.md5(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def train_baseline(cfg: PipelineConfig, data_path: Path, out_dir: Path, log: Log = say) -> dict[str, Any]:
    """Train the model from scratch, export it to ONNX (parity-checked) and write its metrics."""
    torch.manual_seed(cfg.project.seed)
    splits = load_data(cfg, data_path)
    spec = ModelSpec(cfg.model.name, splits.in_channels, splits.num_classes, splits.input_shape,
                     cfg.model.kwargs, splits.mean, splits.std)
    model = spec.build()
    terms, records = regularizers(cfg), recorders(cfg)
    if terms or records:
        log(f"baseline: training with the hooks of {', '.join(training_hooked_methods(cfg))}")
    progress = epoch_logger("baseline", cfg.train.epochs, log)

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
        "accuracy": evaluate(model, splits.loader("test", 256)),
        "val_accuracy": evaluate(model, splits.loader("val", 256)),
        "macs": macs,
        "params": params,
        "size_mb": file_size_mb(model_path),
        "onnx_max_abs_diff": diff,
        "train_seconds": seconds,
    }
    write_json(out_dir / "metrics.json", metrics)  # written last: its presence marks a complete baseline
    log(f"baseline: test accuracy {metrics['accuracy']:.2f}%, {macs / 1e6:.2f} M MACs, {params / 1e3:.1f} k params")
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
               ratio: float, splits: DataSplits) -> PruneResult:
    calib = (splits.loader("train", cfg.data.batch_size, max_batches=cfg.prune.calib_batches)
             if pruner.needs_calibration else None)
    target = PruneTarget(ratio=ratio, round_to=cfg.prune.round_to, max_layer_ratio=cfg.prune.max_layer_ratio)
    return pruner.prune(model, spec.example_inputs(), target, calib)


def study_name(cfg: PipelineConfig, method: str, data_md5: str) -> str:
    """Same data, model, method and search settings → same study, so a rerun resumes it."""
    parts = {"method": cfg.methods[method], "search": cfg.search.model_dump(), "prune": cfg.prune.model_dump(),
             "retrain": cfg.retrain.model_dump(), "model": cfg.model.model_dump(), "train": cfg.train.model_dump(),
             "data": cfg.data.model_dump(exclude={"path"}), "seed": cfg.project.seed}
    digest = hashlib.md5(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]
    return f"{method}-{cfg.model.name}-{data_md5[:8]}-{digest}"


def search(cfg: PipelineConfig, method: str, baseline_dir: Path, data_path: Path, out_dir: Path, storage: str,
           name: str, callbacks: list[TrialCallback] = (), log: Log = say) -> dict[str, Any]:
    """Choose the pruning ratio: a fixed ``prune.ratio`` if set, else an Optuna study's best feasible trial."""
    if cfg.prune.ratio is not None:
        log(f"{method}: prune.ratio={cfg.prune.ratio} is set, search skipped")
        chosen = {"ratio": cfg.prune.ratio, "searched": False}
        write_json(out_dir / "search.json", chosen)
        return chosen
    splits = load_data(cfg, data_path)
    baseline_macs = read_json(baseline_dir / "metrics.json")["macs"]
    val = splits.loader("val", 256)
    finetune = cfg.retrain.model_copy(update={"epochs": cfg.search.finetune_epochs})
    pruner = method_for(cfg, method, baseline_dir)

    def score(ratio: float, report: Callable[[int, float], None]) -> tuple[float, float]:
        model, spec, _ = load_model(baseline_dir / "model.pt")
        prune_with(cfg, pruner, model, spec, ratio, splits)
        if pruner.structured:
            macs_reduction = 1.0 - count_macs_params(model, spec.example_inputs(1))[0] / baseline_macs
        else:
            macs_reduction = zero_weight_share(model)  # dense MACs cannot drop; the target reads as sparsity
        if macs_reduction < cfg.search.target_macs_reduction or finetune.epochs == 0:
            return evaluate(model, val), macs_reduction  # infeasible trials skip the fine-tune
        torch.manual_seed(cfg.project.seed)
        history = fine_tune(pruner, model, splits.loader("train", cfg.data.batch_size, shuffle=True,
                                                         augment=cfg.data.augment),
                            val, finetune, lambda r: report(r.epoch, r.val_accuracy))
        return history[-1].val_accuracy, macs_reduction

    def progress(study, trial) -> None:
        log(f"{method}: trial {trial.number} {trial.state.name.lower()} ratio={trial.params.get('ratio', float('nan')):.3f} "
            f"val_acc={trial.value if trial.value is not None else float('nan'):.2f} "
            f"macs_reduction={trial.user_attrs.get('macs_reduction', float('nan')):.3f}")

    study = open_study(storage, name, cfg.search, cfg.project.seed)
    outcome = search_ratio(study, cfg.search, score, [progress, *callbacks])
    log(f"{method}: chose trial {outcome.trial_number}, ratio {outcome.ratio:.3f} "
        f"({outcome.new_trials} new trials, {outcome.completed_trials} completed in study {outcome.study_name})")
    chosen = {**outcome.as_dict(), "searched": True}
    write_json(out_dir / "search.json", chosen)
    return chosen


def prune(cfg: PipelineConfig, method: str, baseline_dir: Path, ratio: float, data_path: Path, out_dir: Path,
          log: Log = say) -> dict[str, Any]:
    """Prune the baseline at ``ratio``; save the model, its Torch-Pruning history and the per-layer report."""
    splits = load_data(cfg, data_path)
    model, spec, _ = load_model(baseline_dir / "model.pt")
    macs_before, params_before = count_macs_params(model, spec.example_inputs(1))
    result = prune_with(cfg, method_for(cfg, method, baseline_dir), model, spec, ratio, splits)
    macs_after, params_after = count_macs_params(model, spec.example_inputs(1))
    save_model(out_dir / "pruned.pt", model, spec, result.history, result.removed_blocks)
    write_json(out_dir / "history.json", {"removed_blocks": result.removed_blocks,
                                          "torch_pruning_history": [list(step) for step in result.history]})
    summary = {"ratio": ratio, "macs_before": macs_before, "macs_after": macs_after, "params_before": params_before,
               "params_after": params_after, "layers": [layer.as_dict() for layer in result.layers], "notes": result.notes}
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
    val, progress = splits.loader("val", 256), epoch_logger(f"{method} retrain", cfg.retrain.epochs, log)
    epochs = fine_tune(create_method(method, cfg.methods[method]), model, batches, val, cfg.retrain, progress)
    save_model(out_dir / "retrained.pt", model, spec, surgery.history, surgery.removed_blocks)
    return {"val_accuracy": epochs[-1].val_accuracy if epochs else evaluate(model, splits.loader("val", 256)),
            "retrain_seconds": time.perf_counter() - start}


def evaluate_model(cfg: PipelineConfig, method: str, baseline_dir: Path, model_path: Path, data_path: Path,
                   out_dir: Path, log: Log = say) -> dict[str, Any]:
    """Accuracy, size, MACs and measured ONNX Runtime latency of the pruned model against the baseline."""
    splits = load_data(cfg, data_path)
    base = read_json(baseline_dir / "metrics.json")
    model, spec, _ = load_model(model_path)
    macs, params = count_macs_params(model, spec.example_inputs(1))
    scratch = export_onnx(model, spec.example_inputs(), out_dir / "latency" / "model.onnx", cfg.export.opset)
    inputs = next(iter(splits.loader("test", cfg.evaluate.latency_batch)))[0].numpy()
    latency = measure_latency({"baseline": baseline_dir / "model.onnx", "pruned": scratch}, inputs,
                              cfg.evaluate.latency_warmup, cfg.evaluate.latency_repeats, cfg.evaluate.threads)
    accuracy = evaluate(model, splits.loader("test", 256))
    metrics = {
        "accuracy": accuracy,
        "accuracy_drop": base["accuracy"] - accuracy,
        "params": params,
        "macs": macs,
        "params_reduction": 1.0 - params / base["params"],
        "macs_reduction": 1.0 - macs / base["macs"],
        "size_mb": file_size_mb(model_path),
        "weight_sparsity": zero_weight_share(model),
        "latency_ms": latency["pruned"].median_ms,
        "latency_ms_p90": latency["pruned"].p90_ms,
        "baseline_latency_ms": latency["baseline"].median_ms,
        "speedup": latency["baseline"].median_ms / latency["pruned"].median_ms,
    }
    write_json(out_dir / "metrics.json", metrics)
    (out_dir / "report.md").write_text(method_report(method, metrics, out_dir / "layers.json"))
    log(f"{method}: accuracy {accuracy:.2f}% (drop {metrics['accuracy_drop']:+.2f}), MACs -{metrics['macs_reduction']:.1%}, "
        f"latency {metrics['latency_ms']:.3f} ms (x{metrics['speedup']:.2f})")
    return metrics


def export(cfg: PipelineConfig, model_path: Path, data_path: Path, out_dir: Path, log: Log = say) -> dict[str, Any]:
    """Write ``onnx/model.onnx`` and check it against PyTorch on real test batches; a mismatch raises."""
    splits = load_data(cfg, data_path)
    model, spec, _ = load_model(model_path)
    onnx_path = export_onnx(model, spec.example_inputs(), out_dir / "onnx" / "model.onnx", cfg.export.opset)
    try:
        diff = check_parity(onnx_path, model, splits.loader("test", 64, max_batches=cfg.export.parity_batches),
                            cfg.export.atol)
    except Exception:
        onnx_path.unlink(missing_ok=True)  # never leave a file that looks like a good export
        raise
    log(f"export: {onnx_path} matches PyTorch (max |diff| {diff:.2g})")
    return {"onnx_path": str(onnx_path), "onnx_max_abs_diff": diff}


def method_report(method: str, metrics: dict[str, Any], layers_path: Path) -> str:
    lines = [f"# {method}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4g} |" for key, value in metrics.items()]
    if layers_path.is_file():
        layers = read_json(layers_path)
        lines += ["", f"Pruning ratio {layers['ratio']:.3f}. {layers['notes']}".rstrip(), "",
                  "| layer | channels before | channels after | MACs before | MACs after |", "|---|---|---|---|---|"]
        lines += [f"| {l['name']} | {l['channels_before']} | {l['channels_after']} | {l['macs_before']} | {l['macs_after']} |"
                  for l in layers["layers"]]
    return "\n".join(lines) + "\n"


COMPARE_COLUMNS = ("accuracy", "accuracy_drop", "macs_reduction", "params_reduction", "size_mb", "latency_ms", "speedup")


def compare(baseline: dict[str, Any], methods: dict[str, dict[str, Any]]) -> str:
    """Markdown table, baseline row first, one row per method."""
    header = "| model | " + " | ".join(COMPARE_COLUMNS) + " |"
    rows = [header, "|" + "---|" * (len(COMPARE_COLUMNS) + 1)]
    # The baseline's latency is measured beside each method's (same session, interleaved); show their median.
    base_latency = sorted(m["baseline_latency_ms"] for m in methods.values() if "baseline_latency_ms" in m)
    base = {**baseline, "accuracy_drop": 0.0, "macs_reduction": 0.0, "params_reduction": 0.0, "speedup": 1.0,
            "latency_ms": base_latency[len(base_latency) // 2] if base_latency else None}
    for name, metrics in [("baseline", base), *methods.items()]:
        cells = [f"{metrics[c]:.4g}" if isinstance(metrics.get(c), (int, float)) else "" for c in COMPARE_COLUMNS]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
