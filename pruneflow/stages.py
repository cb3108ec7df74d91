"""The pipeline's stages as plain functions ``(run, log) -> result``: each reads the files its run context
(``layout.MethodRun``) names, writes its own, and returns a small typed result.

``STAGES`` declares them once: ``pruneflow stage NAME`` (which dvc.yaml calls) and the Prefect flow
(tasks/, flows/) run them from it, and dvc.yaml is rendered from it (``pruneflow.dvcfile``). Nothing here knows
about Prefect or MLflow.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from tabulate import tabulate

from pruneflow import deploy, gates
from pruneflow.checkpoint import ModelSpec, load_model, load_trained, save_model
from pruneflow.config import DataConfig, PipelineConfig, TrainConfig
from pruneflow.data import DataSplits, load_dataset
from pruneflow.deploy import Deployment
from pruneflow.export import Latency, ProviderUnavailable, check_parity, export_onnx, measure_latency
from pruneflow.files import replacing
from pruneflow.latency.allocate import BudgetError
from pruneflow.latency.measured import Measure, timed_against
from pruneflow.latency.rounding import AUTO, cache_folder, rounding_table, step_rounded
from pruneflow.latency.table import LatencyTable
from pruneflow.latency.target import LATENCY_METRICS, LatencyPredictor
from pruneflow.layout import MethodRun, ProjectLayout, ProjectRun
from pruneflow.methods import PruneResult, PruningMethod, create_method
from pruneflow.methods.groups import channel_groups
from pruneflow.methods.halp import Halp
from pruneflow.metrics import count_macs_params, file_size_mb, reductions, zero_weight_share
from pruneflow.plan import PlanOrigin, PrunePlan
from pruneflow.profiles import PROFILES
from pruneflow.proxy import adaptive_bn_score
from pruneflow.search import (
    SearchOutcome,
    SearchSpace,
    TrialCallback,
    TrialMeasure,
    check_reachable,
    fail_stale,
    feasible_trials,
    finetune_top,
    open_study,
    plot_search,
    run_trials,
    select,
    target_gap,
    top_trials_markdown,
    trial_ratios,
)
from pruneflow.task import TASKS, Batches
from pruneflow.training import Distillation, EpochResult, distillation, evaluate, evaluate_all, train
from pruneflow.versioning import DataVersion

Log = Callable[[str], None]


def say(message: str) -> None:
    print(message, flush=True)


def write_json(path: Path, payload: Any) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@functools.lru_cache(maxsize=2)
def _cached_splits(data_path: Path, data_json: str, seed: int) -> DataSplits:
    return load_dataset(DataConfig.model_validate_json(data_json), data_path, seed, progress=say)


def load_data(cfg: PipelineConfig, data_path: Path) -> DataSplits:
    """Decoded splits, shared by every stage of one process (decoding is the slow part on big folders), served
    with the normalisation a trained baseline expects (``baseline.mean``/``std``) when the params give one; a
    training split too small to train on raises ``gates.GateError``."""
    splits = _cached_splits(Path(data_path).resolve(), cfg.data.model_dump_json(), cfg.project.seed)
    gates.check_training_split(splits, cfg.data)
    if cfg.baseline.mean is not None and cfg.baseline.std is not None:  # both or neither (BaselineConfig)
        splits = replace(splits, mean=cfg.baseline.mean, std=cfg.baseline.std)
    return splits


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
    if cfg.baseline.checkpoint is not None:  # the file's content, not its path, is what the baseline starts from
        parts["baseline"] = {**cfg.baseline.model_dump(exclude={"checkpoint"}),
                             "checkpoint_md5": file_md5(Path(cfg.baseline.checkpoint))}
    return hashlib.md5(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def train_baseline(run: ProjectRun, log: Log = say) -> dict[str, float]:
    """Train the model into the run's baseline folder — from scratch, or from ``baseline.checkpoint`` for
    ``train.epochs`` more epochs (0 by default: it is evaluated as it is) — export it to ONNX (parity-checked)
    and write its metrics."""
    cfg = run.cfg
    torch.manual_seed(cfg.project.seed)
    splits = load_data(cfg, run.data_dir)
    spec = model_spec(cfg, splits)
    if cfg.baseline.checkpoint is not None:
        model, spec = load_trained(Path(cfg.baseline.checkpoint), spec)
        log(f"baseline: starting from {cfg.baseline.checkpoint}, {cfg.train.epochs} epoch(s) of training on the data")
    else:
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
    batches = splits.loader("train", cfg.data.batch_size, shuffle=True, augment=cfg.data.augment, seed=cfg.project.seed)
    train(model, batches, cfg.train, val_batches=splits.loader("val", 256), regularizers=terms.values(),
          on_epoch_end=on_epoch_end)
    seconds = time.perf_counter() - start
    gates.check_learned(model, splits, "the trained baseline", "check train.lr, train.epochs and the labels")
    for name, recorder in records.items():
        run.baseline_records(name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(recorder.state(), run.baseline_records(name))
    model_path = save_model(run.baseline_model, model, spec)
    onnx_path = export_onnx(model, spec.example_inputs(), run.baseline_onnx, cfg.export.opset)
    diff = check_parity(onnx_path, model, splits.loader("test", 64, max_batches=cfg.export.parity_batches),
                        cfg.export.atol, cfg.export.rtol)
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
    written = [model_path, onnx_path, *(run.baseline_records(name) for name in records)]
    write_json(run.baseline_checksums,
               {path.relative_to(run.baseline_dir).as_posix(): sha256(path) for path in written})
    write_json(run.baseline_metrics, metrics)  # written last: its presence marks a complete baseline
    log(f"baseline: test {task.metric} {metrics[task.metric]:.2f} {task.unit}, {macs / 1e6:.2f} M MACs, "
        f"{params / 1e3:.1f} k params")
    return metrics


def project_run(layout: ProjectLayout, data: DataVersion, run_dir: Path) -> ProjectRun:
    """A pipeline run of the project, on the project's baseline for this data and these params
    (``runs/baselines/<baseline_key>``): runs with equal keys share it."""
    return ProjectRun(layout, data, layout.baseline_dir(baseline_key(layout.cfg, data.md5)), run_dir)


@dataclass
class Baseline:
    """The run's baseline: its test metrics, and whether an earlier run had trained it."""

    metrics: dict[str, float]
    reused: bool


def ensure_baseline(run: ProjectRun, log: Log = say) -> Baseline:
    """The run's baseline, trained into ``run.baseline_dir`` unless a run trained it there before.

    The one place where a pipeline or a search worker gets its baseline (``project_run`` says where), so all
    score the same model. Under the baseline's lock, so processes starting at once (pipelines, workers) train
    it once and the others reuse it. A baseline is reused only if ``baseline_problem`` finds none; else it is
    removed and trained again, or, if it cannot be removed, the error names the folder to delete.
    """
    with run.layout.baseline_lock(run.baseline_dir.name):
        if run.baseline_metrics.is_file():
            problem = baseline_problem(run)
            if problem is None:
                log(f"baseline: reusing {run.baseline_dir} (same data, model and training params; files verified)")
                return Baseline(read_json(run.baseline_metrics), reused=True)
            log(f"baseline: not reusing {run.baseline_dir}: {problem}; training it again")
            try:
                shutil.rmtree(run.baseline_dir)
            except OSError as err:
                raise RuntimeError(f"the baseline in {run.baseline_dir} cannot be reused ({problem}) nor removed "
                                   f"({err.strerror}): delete that folder, then run again") from None
        return Baseline(train_baseline(run, log), reused=False)


def sha256(path: Path) -> str:
    """The file's SHA-256, read in chunks (``hashlib.file_digest`` needs Python 3.11; 3.10 is supported)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def baseline_problem(run: ProjectRun) -> str | None:
    """Why the complete-looking baseline in ``run.baseline_dir`` must not be reused, or None when it may.

    Each file must still be the one trained there (its sha256 as ``checksums.json`` recorded it then), and the
    checkpoint must load into its model: a damaged, truncated, deleted or swapped file would otherwise pass on to
    every later stage, each failing with a message that never says what to delete.
    """
    try:
        read_json(run.baseline_metrics)
        recorded = read_json(run.baseline_checksums)
    except FileNotFoundError as err:
        return f"{err.filename} is missing (no record of the files it trained)"
    except (OSError, ValueError) as err:
        return f"its records do not read ({type(err).__name__}: {str(err).splitlines()[0]})"
    for name, digest in recorded.items():
        path = run.baseline_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256(path) != digest:
            return f"{path} is not the file trained there (its sha256 differs from {run.baseline_checksums.name}'s)"
    try:
        load_model(run.baseline_model)
    except (OSError, ValueError, RuntimeError) as err:
        return f"{run.baseline_model} does not load ({str(err).splitlines()[0]})"
    return None


def method_for(run: MethodRun) -> PruningMethod:
    """The run's method, given what it recorded during baseline training, if anything."""
    pruner = create_method(run.method, run.params)
    if pruner.recorder() is not None:
        if not run.records.is_file():
            raise FileNotFoundError(f"{run.records}: method {run.method} needs statistics recorded by the "
                                    "baseline stage")
        pruner.use_records(torch.load(run.records, weights_only=True))
    return pruner


def fine_tune(pruner: PruningMethod, model: torch.nn.Module, batches, val_batches, cfg: TrainConfig,
              on_epoch_end: Callable[[EpochResult], None], distill: Distillation | None = None) -> list[EpochResult]:
    """The method's own retraining recipe if it has one (grafting, masks kept at zero), else the standard loop,
    learning from the baseline's outputs too when ``distill`` is given (a method's own recipe ignores it)."""
    epochs = pruner.retrain(model, batches, val_batches, cfg, on_epoch_end)
    if epochs is None:
        epochs = train(model, batches, cfg, val_batches=val_batches, on_epoch_end=on_epoch_end, distill=distill)
    return epochs


def latency_table(cfg: PipelineConfig) -> LatencyTable:
    """This machine's latency table for the export platform's runtime at ``evaluate.threads``: ONNX Runtime's CPU
    provider for ``cpu``, else the first device provider of the platform that the installed build has (none:
    ``ProviderUnavailable``, naming them)."""
    wanted = PROFILES[cfg.export.platform].device_providers
    if not wanted:
        return LatencyTable(cache_folder(), threads=cfg.evaluate.threads)
    available = [provider for provider in wanted if provider in ort.get_available_providers()]
    if not available:
        raise ProviderUnavailable(f"export.platform {cfg.export.platform}: the latency table needs "
                                  f"{' or '.join(wanted)}, "
                                  f"which this onnxruntime build lacks (it has "
                                  f"{', '.join(ort.get_available_providers())})")
    return LatencyTable(cache_folder(), threads=cfg.evaluate.threads, provider=available[0])


def latency_predictor(cfg: PipelineConfig, baseline: torch.nn.Module, spec: ModelSpec,
                      exported: Path) -> LatencyPredictor:
    """Predicted latency of the baseline's pruned forms at ``evaluate.latency_batch`` (``exported``: its ONNX)."""
    return LatencyPredictor(baseline, spec.example_inputs(1), exported, latency_table(cfg), cfg.evaluate.latency_batch)


def prune_with(cfg: PipelineConfig, pruner: PruningMethod, model: torch.nn.Module, spec: ModelSpec,
               plan: PrunePlan, splits: DataSplits, baseline_onnx: Path | None = None) -> PruneResult:
    """``pruner.prune`` with the calibration batches a data-driven method needs (``prune.calib_batches``).

    Two things in the plan are resolved here, on the latency table of this machine at ``evaluate.threads`` and
    ``evaluate.latency_batch``, with the units read from ``baseline_onnx`` (``model``'s export; exported again if
    not given): a latency budget, by a method that allocates under one (``halp``: ``allocated``), and
    ``round_to: auto``, into the plan's kept channels per group (``latency.rounding``)."""
    calib = (splits.loader("train", cfg.data.batch_size, max_batches=cfg.prune.calib_batches)
             if pruner.needs_calibration else None)
    rounding: list[dict[str, Any]] = []
    if plan.latency_budget:
        plan = allocated(cfg, pruner, model, spec.example_inputs(), plan, baseline_onnx, calib, measured=True)
    if plan.round_to == AUTO:
        table = latency_table(cfg)
        plan, rounding = step_rounded(pruner, model, spec.example_inputs(), plan, table, calib,
                                      cfg.evaluate.latency_batch, baseline_onnx, cfg.export.opset)
    result = pruner.prune(model, spec.example_inputs(), plan, calib)
    result.rounding = rounding
    return result


def allocated(cfg: PipelineConfig, pruner: PruningMethod, model: torch.nn.Module, example_inputs: torch.Tensor,
              plan: PrunePlan, exported: Path | None, calib: Batches | None, measured: bool = False) -> PrunePlan:
    """The plan's latency budget turned into kept channels and removed blocks by the method (``halp``), predicted
    on this machine's table (``exported``: ``model``'s ONNX, else exported here); ``measured``: met as timed
    against the baseline (``evaluate_timer``), not only as predicted. A budget no allocation reaches raises
    ``BudgetError`` naming the key that set it."""
    if not isinstance(pruner, Halp):
        raise ValueError(f"method {pruner.name} does not allocate under a latency budget; the plan sets one "
                         f"({plan.describe()})")
    table = latency_table(cfg)
    with tempfile.TemporaryDirectory(prefix="pruneflow-allocate-") as scratch:
        exported = exported or export_onnx(model, example_inputs, Path(scratch) / "model.onnx", cfg.export.opset)
        predictor = LatencyPredictor(model, example_inputs[:1], exported, table, cfg.evaluate.latency_batch)
        measure = evaluate_timer(cfg, pruner, model, example_inputs, exported, calib, table.provider) if measured \
            else None
        try:
            return pruner.allocate(model, example_inputs, plan, predictor, calib, measure)[0]
        except BudgetError as err:
            raise BudgetError(f"{budget_key(plan)}: method {pruner.name}: {err}") from None


def evaluate_timer(cfg: PipelineConfig, pruner: PruningMethod, model: torch.nn.Module, example_inputs: torch.Tensor,
                   baseline_onnx: Path, calib: Batches | None, provider: str) -> Measure:
    """``latency.measured.timed_against`` as the evaluate stage times (medians at ``evaluate.latency_batch``, its
    warm-up, repeats and threads), so a budget is met as the run will report it."""
    inputs = np.resize(example_inputs.numpy(), (cfg.evaluate.latency_batch, *example_inputs.shape[1:]))
    return timed_against(pruner, model, example_inputs, baseline_onnx, calib, inputs, cfg.evaluate.latency_warmup,
                         cfg.evaluate.latency_repeats, cfg.evaluate.threads, provider, cfg.export.opset)


def budget_key(plan: PrunePlan) -> str:
    """The params key that set a latency plan's budget (``latency_plan``), for messages."""
    return "prune.ratio" if plan.origin.kind == "prune.ratio" else "search.target.value"


def latency_plan(cfg: PipelineConfig, method: str) -> PrunePlan:
    """The latency budget a method that allocates under one (``halp``) gets instead of a search: ``prune.ratio``
    ``r`` is a 1/(1 − r) speed-up (that share of the baseline's latency goes), else ``search.target``: a
    ``speedup`` floor, a ``latency_ms`` ceiling, or a ``macs_reduction`` ``r`` read as the speed-up its MACs
    promise, 1/(1 − r). A ``params_reduction`` target has no latency meaning (``check_registered`` refuses it)."""
    target = cfg.search.target
    if cfg.prune.ratio is not None:
        speedup = 1.0 / (1.0 - cfg.prune.ratio)
        origin = PlanOrigin("prune.ratio", note=f"prune.ratio={cfg.prune.ratio} is set: {method} allocates for a "
                                                f"{speedup:.2f}x predicted speed-up")
        return PrunePlan.from_config(cfg.prune, ratio=cfg.prune.ratio, speedup=speedup, origin=origin)
    if target.metric == "params_reduction":
        raise ValueError(f"search.target.metric params_reduction: method {method} allocates under a latency budget; "
                         "use speedup, latency_ms or macs_reduction, or set prune.ratio")
    budget = {"latency_ms": {"latency_ms": target.value}, "speedup": {"speedup": target.value},
              "macs_reduction": {"speedup": 1.0 / (1.0 - target.value)}}[target.metric]
    what = (f"search.target {target.metric} {target.value:g}" + (f" (read as the {budget['speedup']:.2f}x speed-up "
            "its MACs promise)" if target.metric == "macs_reduction" else ""))
    origin = PlanOrigin("search.target", note=f"{method} allocates under {what} itself: nothing to search")
    return PrunePlan.from_config(cfg.prune, ratio=0.0, origin=origin, **budget)


def fixed_plan(cfg: PipelineConfig, method: str) -> PrunePlan | None:
    """The plan when there is nothing to search, else None: the one place that decides whether a search runs.

    A method whose params alone fix what it removes (``cascade`` with ``drop``) has no ratio to search, nor has one
    that allocates under the run's latency budget itself (``halp``: ``latency_plan``); a set ``prune.ratio`` is
    used as it is.
    """
    pruner = create_method(method, cfg.methods[method])
    if pruner.allocates_latency:
        return latency_plan(cfg, method)
    if pruner.fixed_by_params():
        origin = PlanOrigin("method_params", note=f"its params {cfg.methods[method]} fix what it removes")
        return PrunePlan.from_config(cfg.prune, ratio=cfg.prune.ratio or 0.0, origin=origin)
    if cfg.prune.ratio is not None:
        origin = PlanOrigin("prune.ratio", note=f"prune.ratio={cfg.prune.ratio} is set")
        return PrunePlan.from_config(cfg.prune, ratio=cfg.prune.ratio, origin=origin)
    return None


def study_name(cfg: PipelineConfig, method: str, data_md5: str) -> str:
    """Same data, model, method and trial-shaping settings → same study, so a rerun resumes and extends it.

    How many trials run, where, and how one is picked afterwards do not change a trial's result, so they
    are left out: asking for more trials or another selection policy reuses the finished ones.
    """
    unchanging = {"n_trials", "n_workers", "storage", "selection", "tolerance", "top_k"}
    if cfg.search.proxy == "finetune":  # the adaptive-BN settings do not touch its trials (and older names stay)
        unchanging |= {"proxy", "calib_batches"}
    search = cfg.search.model_dump(exclude=unchanging)
    parts = {"method": cfg.methods[method], "search": search, "prune": cfg.prune.model_dump(),
             "retrain": cfg.retrain.model_dump(exclude={"distill"}),  # trials fine-tune without a teacher
             "model": cfg.model.model_dump(), "train": cfg.train.model_dump(),
             "data": cfg.data.model_dump(exclude={"path"}), "seed": cfg.project.seed}
    if cfg.baseline.checkpoint is not None:  # trials prune that checkpoint (its content, not its path)
        parts["baseline"] = baseline_key(cfg, data_md5)
    digest = hashlib.md5(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]
    return f"{method}-{cfg.model.name}-{data_md5[:8]}-{digest}"


def search_space(cfg: PipelineConfig, model: torch.nn.Module, spec: ModelSpec) -> SearchSpace:
    """The configured space over this model: layer groups named by their root module, resolutions by their spatial
    size."""
    base = PrunePlan.from_config(cfg.prune, origin=PlanOrigin("search"))
    if cfg.search.space == "global":
        return SearchSpace.of("global", {}, [], base)
    layers = [group.name for group in channel_groups(model, spec.example_inputs())]
    return SearchSpace.of(cfg.search.space, layers_by_resolution(model, spec.example_inputs(), layers), layers, base)


def layers_by_resolution(model: torch.nn.Module, example_inputs: torch.Tensor,
                         layers: list[str]) -> dict[str, list[str]]:
    """The layers grouped by the spatial size they work at (a ResNet's stage, a VGG block): ``{"8x8": [...]}``."""
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
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(sizes[name], []).append(name)
    return groups


class TrialRunner:
    """Prunes, measures and fine-tunes one trial's model; built per process (search workers rebuild it)."""

    def __init__(self, run: MethodRun) -> None:
        self.cfg, self.baseline_model, self.baseline_onnx = run.cfg, run.baseline_model, run.baseline_onnx
        self.splits = load_data(run.cfg, run.data_dir)
        self.pruner = method_for(run)
        self.baseline = read_json(run.baseline_metrics)
        self.metric = TASKS[run.cfg.task].metric
        self.finetune = run.cfg.retrain.model_copy(update={"epochs": run.cfg.search.finetune_epochs})
        model, spec, _ = load_model(run.baseline_model)
        self.space = search_space(run.cfg, model, spec)

    def pruned(self, plan: PrunePlan) -> tuple[torch.nn.Module, dict[str, float]]:
        model, spec, _ = load_model(self.baseline_model)
        prune_with(self.cfg, self.pruner, model, spec, plan, self.splits, self.baseline_onnx)
        costs = reductions(model, spec.example_inputs(1), self.baseline["macs"], self.baseline["params"],
                           self.pruner.structured)
        search = self.cfg.search
        if search.measure_latency or {*LATENCY_METRICS} & {search.target.metric, *search.objectives}:
            costs.update(self.predictor.costs(model))  # predicted: a trial exports and times nothing
        return model, costs

    @functools.cached_property
    def predictor(self) -> LatencyPredictor:
        baseline, spec, _ = load_model(self.baseline_model)
        return latency_predictor(self.cfg, baseline, spec, self.baseline_onnx)

    def measure(self, plan: PrunePlan) -> dict[str, float]:
        return self.pruned(plan)[1]

    def score(self, plan: PrunePlan, report: Callable[[int, float], None]) -> TrialMeasure:
        """The trial's validation metric by ``search.proxy``; infeasible trials skip the proxy."""
        model, costs = self.pruned(plan)
        val = self.splits.loader("val", 256)
        if target_gap(self.cfg.search, costs) > 0:
            return TrialMeasure(evaluate(model, val), costs)
        if self.cfg.search.proxy == "adaptive_bn":
            calib = self.splits.loader("train", self.cfg.data.batch_size, shuffle=True, seed=self.cfg.project.seed,
                                       max_batches=self.cfg.search.calib_batches)  # the same images for every trial
            return TrialMeasure(adaptive_bn_score(model, calib, val), costs)
        return self.fine_tuned(model, costs, report)

    def fine_tuned(self, model: torch.nn.Module, costs: dict[str, float],
                   report: Callable[[int, float], None]) -> TrialMeasure:
        """The validation metric after ``search.finetune_epochs`` of fine-tuning (none: as pruned)."""
        val = self.splits.loader("val", 256)
        if self.finetune.epochs == 0:
            return TrialMeasure(evaluate(model, val), costs)
        torch.manual_seed(self.cfg.project.seed)
        batches = self.splits.loader("train", self.cfg.data.batch_size, shuffle=True, augment=self.cfg.data.augment)
        history = fine_tune(self.pruner, model, batches, val, self.finetune, lambda r: report(r.epoch, r.val_score))
        return TrialMeasure(history[-1].val_score, costs, len(history))

    def fine_tuned_metric(self, plan: PrunePlan) -> float:
        """``fine_tuned`` for a plan (the top-k rung of an adaptive-BN search)."""
        return self.fine_tuned(*self.pruned(plan), lambda epoch, metric: None).metric


def trial_progress(method: str, log: Log) -> TrialCallback:
    """An Optuna callback logging each finished trial's state, ratios and measured costs."""

    def progress(study, trial) -> None:
        ratios = ", ".join(f"{k.removeprefix('ratio.')}={v:.2f}" for k, v in trial_ratios(trial).items())
        log(f"{method}: trial {trial.number} {trial.state.name.lower()} [{ratios}] "
            + " ".join(f"{k}={v:.3f}" for k, v in trial.user_attrs.items() if isinstance(v, float)))

    return progress


def search_worker(run: MethodRun, n_trials: int, seed: int) -> None:
    """One process's share of the trials; several of these (or several machines) can share one study."""
    runner = TrialRunner(run)
    study = open_study(run.study_storage, study_name(run.cfg, run.method, run.data.md5), run.cfg.search, seed)
    run_trials(study, run.cfg.search, runner.space, runner.score, n_trials, run.trial_callbacks, runner.measure)


def _worker_process(run: MethodRun, n_trials: int, seed: int) -> None:
    torch.set_num_threads(1)  # n workers share the cores
    search_worker(run, n_trials, seed)


def search_ratio(run: MethodRun, log: Log = say) -> SearchOutcome:
    """Choose the pruning plan: ``fixed_plan`` if there is one, else the study's trial the selection policy picks.

    Writes ``search.json`` (the outcome) and the run's ``own_study`` if it has one (empty when the search is
    skipped: DVC declares it); a search also writes ``trials.md`` (the top trials) and ``search.png`` (history and
    trade-off plots).
    """
    plan = fixed_plan(run.cfg, run.method)
    if plan is None:
        outcome = search(run, log)
    else:
        log(f"{run.method}: {plan.origin.note}, search skipped")
        outcome = SearchOutcome(plan)
        if run.own_study is not None:
            run.own_study.parent.mkdir(parents=True, exist_ok=True)
            run.own_study.write_bytes(b"")  # an empty SQLite database, not an earlier search's study
    write_json(run.search_json, outcome.as_dict())
    return outcome


def search(run: MethodRun, log: Log) -> SearchOutcome:
    """Run the method's study (resumed if it exists, unless the run has its own) and pick its trial; see
    ``pruneflow.search``."""
    cfg, method, storage = run.cfg, run.method, run.study_storage
    if run.own_study is not None:
        run.own_study.unlink(missing_ok=True)
    name = study_name(cfg, method, run.data.md5)
    runner = TrialRunner(run)
    study = open_study(storage, name, cfg.search, cfg.project.seed)
    fail_stale(study)
    if not feasible_trials(study, cfg.search):
        check_reachable(cfg.search, runner.space, runner.measure)

    workers = cfg.search.n_workers
    log(f"{method}: {cfg.search.n_trials} trials in study {name} ({len(study.trials)} there already), "
        f"{workers} worker(s), space {cfg.search.space} with {len(runner.space.params)} ratio(s)")
    if workers == 1:
        run_trials(study, cfg.search, runner.space, runner.score, cfg.search.n_trials,
                   [trial_progress(method, log), *run.trial_callbacks], runner.measure)
    else:
        shares = [cfg.search.n_trials // workers + (i < cfg.search.n_trials % workers) for i in range(workers)]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            jobs = [pool.submit(_worker_process, run, share, cfg.project.seed + i + 1)
                    for i, share in enumerate(shares) if share]
            for job in jobs:
                job.result()
    baseline_metric = runner.baseline[f"val_{runner.metric}"]
    if cfg.search.proxy == "adaptive_bn" and cfg.search.finetune_epochs:
        log(f"{method}: fine-tuning the top {cfg.search.top_k} trials by adaptive BN for "
            f"{cfg.search.finetune_epochs} epoch(s)")
        rung = open_study(storage, f"{name}-finetuned", cfg.search, cfg.project.seed)
        outcome = finetune_top(study, rung, cfg.search, runner.space, runner.fine_tuned_metric, baseline_metric,
                               lambda line: log(f"{method}: {line}"))
    else:
        outcome = select(study, cfg.search, runner.space, baseline_metric)
    run.trials_md.parent.mkdir(parents=True, exist_ok=True)
    run.trials_md.write_text(top_trials_markdown(study, cfg.search, outcome.trial_number))
    plot_search(study, cfg.search, outcome.trial_number, run.search_png)
    log(f"{method}: chose trial {outcome.trial_number} ({cfg.search.selection}): val {runner.metric} "
        f"{outcome.metric:.2f}, {cfg.search.target.metric} {outcome.costs[cfg.search.target.metric]:.3f}; "
        f"{outcome.completed_trials} completed, {outcome.pruned_trials} pruned trials in the study")
    return outcome


@dataclass
class PruneSummary:
    """What the prune stage did (``layers.json``): the plan as really pruned (with what the method decided
    itself: its per-group ratios, the blocks it removed), the cost before and after, and each layer's change."""

    plan: PrunePlan
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    layers: list[dict[str, Any]]
    notes: str
    rounding: list[dict[str, Any]] = field(default_factory=list)  # round_to auto: per group, asked, kept, why

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneSummary:
        return cls(**{**data, "plan": PrunePlan.from_dict(data["plan"])})


def prune_model(run: MethodRun, log: Log = say) -> PruneSummary:
    """Prune the baseline as ``search.json`` plans; save the model, its Torch-Pruning history and the per-layer
    report."""
    plan = SearchOutcome.from_dict(read_json(run.search_json)).plan
    splits = load_data(run.cfg, run.data_dir)
    model, spec, _ = load_model(run.baseline_model)
    macs_before, params_before = count_macs_params(model, spec.example_inputs(1))
    pruner = method_for(run)
    result = prune_with(run.cfg, pruner, model, spec, plan, splits, run.baseline_onnx)
    gates.check_removed(run.method, pruner.structured, plan, result)
    macs_after, params_after = count_macs_params(model, spec.example_inputs(1))
    save_model(run.pruned, model, spec, result.history, result.removed_blocks)
    write_json(run.history_json, {"removed_blocks": result.removed_blocks,
                                  "torch_pruning_history": [list(step) for step in result.history]})
    summary = PruneSummary(result.plan, macs_before, macs_after, params_before, params_after,
                           [layer.as_dict() for layer in result.layers], result.notes, result.rounding)
    write_json(run.layers_json, summary.as_dict())
    log(f"{run.method}: pruned {result.plan.describe()}: MACs {macs_before / 1e6:.2f} M -> {macs_after / 1e6:.2f} M")
    for row in result.rounding:
        log(f"{run.method}: {row['name']}: {row['reason']}")
    return summary


def retrain_model(run: MethodRun, log: Log = say) -> dict[str, float]:
    """Fine-tune the pruned model: the method's own recipe if it has one, else the ``retrain`` schedule (with the
    baseline as teacher when ``retrain.distill.weight`` is set)."""
    cfg = run.cfg
    splits = load_data(cfg, run.data_dir)
    model, spec, surgery = load_model(run.pruned)
    torch.manual_seed(cfg.project.seed)
    start = time.perf_counter()
    batches = splits.loader("train", cfg.data.batch_size, shuffle=True, augment=cfg.data.augment, seed=cfg.project.seed)
    metric = TASKS[cfg.task].metric
    val, progress = splits.loader("val", 256), epoch_logger(f"{run.method} retrain", cfg.retrain.epochs, log, metric)
    teacher = load_model(run.baseline_model)[0] if cfg.retrain.distill.weight else None
    epochs = fine_tune(create_method(run.method, run.params), model, batches, val, cfg.retrain, progress,
                       distillation(cfg.retrain.distill, teacher))
    if epochs:
        gates.check_learned(model, splits, f"the retrained {run.method} model",
                            "prune less (search.ratio_high, prune.ratio) or retrain longer (retrain.epochs)")
    save_model(run.retrained, model, spec, surgery.history, surgery.removed_blocks)
    return {f"val_{metric}": epochs[-1].val_score if epochs else evaluate(model, splits.loader("val", 256)),
            "retrain_seconds": time.perf_counter() - start}


def evaluate_model(run: MethodRun, log: Log = say) -> dict[str, float]:
    """The task's metrics (accuracy; PSNR, SSIM), size, MACs and measured ONNX Runtime latency of the retrained
    model against the baseline; ``<metric>_drop`` is baseline − pruned for the main metric."""
    cfg = run.cfg
    splits = load_data(cfg, run.data_dir)
    base = read_json(run.baseline_metrics)
    model, spec, _ = load_model(run.retrained)
    macs, params = count_macs_params(model, spec.example_inputs(1))
    scratch = export_onnx(model, spec.example_inputs(), run.latency_onnx, cfg.export.opset)
    latency = {suffix: measure_latency({"baseline": run.baseline_onnx, "pruned": scratch}, inputs,
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
        "size_mb": file_size_mb(run.retrained),
        "weight_sparsity": zero_weight_share(model),
    }
    for suffix, timing in latency.items():
        speedup = timing["baseline"].median_ms / timing["pruned"].median_ms
        metrics.update({f"latency_ms{suffix}": timing["pruned"].median_ms,
                        f"latency_ms{suffix}_p90": timing["pruned"].p90_ms,
                        f"baseline_latency_ms{suffix}": timing["baseline"].median_ms, f"speedup{suffix}": speedup,
                        f"speedup_efficiency{suffix}": speedup * macs / base["macs"]})
    predicted = cfg.search.target.metric in LATENCY_METRICS or create_method(run.method, run.params).allocates_latency
    if predicted and not PROFILES[cfg.export.platform].device_providers:
        metrics.update(prediction_error(cfg, run, model, latency[""]["pruned"], latency[""]["baseline"]))
        log(f"{run.method}: latency predicted {metrics['latency_ms_predicted']:.3f} ms, measured (p10) "
            f"{latency['']['pruned'].p10_ms:.3f} ms: error {metrics['latency_prediction_error_pct']:+.1f} %")
    write_json(run.metrics_json, metrics)
    run.report_md.write_text(method_report(run.method, metrics, run.layers_json))
    log(f"{run.method}: {task.metric} {quality[task.metric]:.2f} {task.unit} (drop {metrics[task.drop]:+.2f}), "
        f"MACs -{metrics['macs_reduction']:.1%}, latency {metrics['latency_ms']:.3f} ms (x{metrics['speedup']:.2f})")
    return metrics


def prediction_error(cfg: PipelineConfig, run: MethodRun, model: torch.nn.Module, measured: Latency,
                     baseline_measured: Latency) -> dict[str, float]:
    """The table's prediction for the final model beside its measurement, and the speed-up it predicted (the
    search's view). The table's times are 10th percentiles on the scale of the day it was measured; the prediction
    is put on today's by the baseline timed beside the model (``baseline_measured``), so the error is the table's
    and not the machine's drift since (measured speed-up ÷ predicted − 1)."""
    baseline, spec, _ = load_model(run.baseline_model)
    predictor = latency_predictor(cfg, baseline, spec, run.baseline_onnx)
    predicted = predictor.predict(model).ms * baseline_measured.p10_ms / predictor.baseline_ms
    return {"latency_ms_predicted": predicted, "latency_ms_p10": measured.p10_ms,
            "latency_prediction_error_pct": 100.0 * (predicted - measured.p10_ms) / measured.p10_ms,
            "speedup_predicted": baseline_measured.p10_ms / predicted}


def latency_inputs(cfg: PipelineConfig, splits: DataSplits) -> dict[str, np.ndarray]:
    """Real test images latency is timed on, keyed by metric-name suffix: '' at ``evaluate.latency_batch``
    (batch 1 by default: one request at a time), '_b<N>' at ``evaluate.latency_batch_large`` (throughput).
    A test set smaller than a batch (an SR one holds a dozen images) is repeated to fill it."""
    large = cfg.evaluate.latency_batch_large
    sizes = {"": cfg.evaluate.latency_batch, f"_b{large}": large}
    images = next(iter(splits.loader("test", large)))[0].numpy()
    return {suffix: np.resize(images, (size, *images.shape[1:])) for suffix, size in sizes.items()}


def export_model(run: MethodRun, log: Log = say) -> Deployment:
    """Write ``export/<platform>/``: the formats of ``export.platform``, each checked (see ``pruneflow.deploy``), with
    ``report.md`` and ``export.json``. A failed check raises and leaves no files."""
    cfg = run.cfg
    splits = load_data(cfg, run.data_dir)
    model, spec, _ = load_model(run.retrained)
    deployment = deploy.export_for_platform(model, spec, splits, cfg, run.export_dir, latency_inputs(cfg, splits), log)
    run.export_report.write_text(deploy.report(deployment, cfg))
    write_json(run.export_json, deployment.as_dict())
    return deployment


EFFICIENCY_NOTE = ("speedup_efficiency = speedup ÷ (MACs before / MACs after): 1 means latency fell exactly as much "
                   "as MACs, below 1 the runtime does not turn the removed MACs into time; the goal is ≥ 0.8.")


def method_report(method: str, metrics: dict[str, Any], layers_path: Path) -> str:
    lines = [f"# {method}", "", tabulate([[key, f"{value:.4g}"] for key, value in metrics.items()],
                                         ["metric", "value"], tablefmt="github", disable_numparse=True)]
    lines += ["", EFFICIENCY_NOTE]
    if layers_path.is_file():
        summary = PruneSummary.from_dict(read_json(layers_path))
        columns = ["name", "channels_before", "channels_after", "macs_before", "macs_after"]
        lines += ["", f"Pruned {summary.plan.describe()}. {summary.notes}".rstrip(), "",
                  tabulate([[layer[c] for c in columns] for layer in summary.layers],
                           ["layer", "channels before", "channels after", "MACs before", "MACs after"],
                           tablefmt="github", disable_numparse=True)]
        if summary.rounding:
            lines += ["", "Channels kept at latency step edges (`round_to: auto`):", "",
                      tabulate(rounding_table(summary.rounding), ["group", "channels", "asked", "kept", "why"],
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
            f"speedup_b{large_batch}": 1.0,
            "latency_ms": base_latency[len(base_latency) // 2] if base_latency else None}
    rows = [[name, *(f"{metrics[c]:.4g}" if isinstance(metrics.get(c), (int, float)) else "" for c in columns)]
            for name, metrics in [("baseline", base), *methods.items()]]
    table = tabulate(rows, ["model", *columns], tablefmt="github", disable_numparse=True)
    return "\n".join([table, "", EFFICIENCY_NOTE]) + "\n"


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline, declared once.

    ``pruneflow stage NAME`` runs it, and the flow runs it as a Prefect task named after ``run``, per method
    (``per_method``) or once for the project. ``reads`` and ``writes`` name properties of the run context
    (``MethodRun``, or ``ProjectRun`` for a project stage); a re-export fetches the ``reads`` that a method run
    logged. ``timed`` stages measure latency, so the flow runs them while no other stage computes.

    dvc.yaml is rendered from this table (``pruneflow.dvcfile``, ``pruneflow dvc-yaml --write``): its stage NAME
    calls ``pruneflow stage NAME``, with ``reads`` as deps, ``writes`` as outs (those also in ``metrics`` as DVC
    metrics, not cached), and ``params``, the params.yaml keys the stage depends on (``{method}`` stands for the
    method's entry of ``methods``). ``notes`` say why a read, write or param is there (comments in dvc.yaml).
    """

    name: str
    run: Callable[[Any, Log], Any]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    params: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    notes: dict[str, str] = field(default_factory=dict, hash=False)
    per_method: bool = True
    timed: bool = False

    def paths(self, run: ProjectRun, names: tuple[str, ...]) -> list[Path]:
        """The named paths of ``run``; one the run lacks (None: a pipeline run has no ``own_study``) is left out."""
        return [path for path in (getattr(run, name) for name in names) if path is not None]


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("baseline", train_baseline, reads=("data_dir",), writes=("baseline_dir",), per_method=False,
          params=("task", "project.seed", "data", "model", "baseline", "train", "methods", "export")),
    Stage("search", search_ratio, reads=("data_dir", "baseline_dir"), writes=("search_json", "own_study"),
          params=("methods.{method}", "search", "prune", "retrain"),
          notes={"own_study": "the stage's own Optuna study, new at every run (not runs/optuna.db)"}),
    Stage("prune", prune_model, reads=("data_dir", "baseline_dir", "search_json"),
          writes=("pruned", "history_json", "layers_json"), params=("methods.{method}", "prune")),
    Stage("retrain", retrain_model, reads=("data_dir", "baseline_dir", "pruned"), writes=("retrained",),
          params=("retrain",), notes={"baseline_dir": "the teacher of retrain.distill"}),
    Stage("evaluate", evaluate_model, reads=("data_dir", "baseline_dir", "retrained", "layers_json"),
          writes=("metrics_json", "report_md", "latency_dir"), params=("evaluate",), metrics=("metrics_json",),
          timed=True),
    Stage("export", export_model, reads=("data_dir", "retrained"), writes=("exports_dir",),
          params=("export", "evaluate", "data.batch_size"),
          notes={"evaluate": "int8 and device latency", "data.batch_size": "int8 calibration batches"}, timed=True),
)}
