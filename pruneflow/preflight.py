"""Checks of a run's inputs that need the data and the model themselves, made before anything is started.

The config schema checks names and values. A corrupt image, a model factory that returns the wrong thing or a
layer Torch-Pruning cannot prune shows only once the data is decoded or the model pruned: without these checks
that is after baseline training (minutes, or hours on CIFAR), with a traceback and a FAILED MLflow run. Every
failure here is a ``ConfigError`` naming the key or file, so the CLI stops with exit code 2 and one line.
"""

from __future__ import annotations

import copy
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from pruneflow import gates, stages
from pruneflow.checkpoint import ModelSpec
from pruneflow.config import ConfigError, PipelineConfig
from pruneflow.data import DataSplits, prepare_dataset
from pruneflow.export import ProviderUnavailable, export_onnx
from pruneflow.latency.allocate import BudgetError
from pruneflow.latency.target import LATENCY_METRICS, LatencyPredictor
from pruneflow.layout import ProjectLayout
from pruneflow.methods import MethodUnsuitable, PruningMethod, create_method
from pruneflow.models import MODELS
from pruneflow.plan import PrunePlan
from pruneflow.search import target_gap
from pruneflow.stores import StoreError, check_store

_checked: set[str] = set()  # models that passed, so the flow does not redo the CLI's check in the same process


def check_inputs(cfg: PipelineConfig, root: Path, log: Callable[[str], None]) -> None:
    """Prepare and decode the data, then build, run, prune and export the model on it; raise ConfigError if any fails.

    The flow reuses the work: the prepared folder is current and ``stages.load_data`` caches the decoded splits.
    """
    layout = ProjectLayout(root, cfg)
    check_settings(layout)
    check_model(cfg, check_data(cfg, layout, log))


def check_settings(layout: ProjectLayout) -> None:
    """Settings that are fine alone but cannot work on this machine or project, found in a second, not when the
    stage that needs them runs: a CUDA device without a GPU, a study store that is damaged, read-only or on a
    full disk, a data folder DVC cannot version."""
    cfg = layout.cfg
    for section in ("train", "retrain"):
        if getattr(cfg, section).device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{section}.device is 'cuda' but torch sees no CUDA GPU here: use auto or cpu")
    if cfg.prune.ratio is None:
        try:
            check_store(layout.study_storage, "Optuna study store", "search.storage")
        except StoreError as err:
            raise ConfigError(str(err)) from None
    root, data = layout.root.resolve(), layout.data_dir.resolve()
    if not data.is_relative_to(root):
        raise ConfigError(f"project.data_dir: {cfg.project.data_dir} is outside the project {root}; DVC versions "
                          "data only inside its project: give a folder below it (data.path may point anywhere)")


def check_data(cfg: PipelineConfig, layout: ProjectLayout, log: Callable[[str], None]) -> DataSplits:
    """The decoded splits; an unreadable image, mixed image sizes or a failed download become a ConfigError.

    Preparing holds the data lock the flow's ``version_data`` holds: pipelines starting at once on one project
    would otherwise replace each other's data folder.
    """
    try:
        with layout.data_lock():
            path = prepare_dataset(cfg.data, layout.data_dir, log=log)
        return stages.load_data(cfg, path)
    except (ValueError, OSError) as err:
        message = str(err)
        if cfg.data.dataset == "imagefolder" and cfg.data.path:  # name the user's file, not its link under data/
            message = message.replace(str(layout.dataset_dir.resolve()), cfg.data.path)
        raise ConfigError(f"data: {message}") from None


def check_model(cfg: PipelineConfig, splits: DataSplits) -> None:
    """Build the model for the data, run a batch through it and prune a copy with every configured method, as far
    as the run may. A model from outside the registry (a user's factory, ``torchvision:<name>``) is also exported
    to ONNX once pruned: the registered ones are tested for that, a user's model may hold ops the exporter lacks."""
    spec = stages.model_spec(cfg, splits)
    key = repr((spec, cfg.methods, cfg.prune.model_dump(), cfg.search.ratio_high, cfg.search.target, cfg.export.opset))
    if key in _checked:
        return
    model = build_checked(spec)
    example = spec.example_inputs()
    _run(spec, model, example)
    calibration = list(splits.loader("train", 8, max_batches=1))
    if cfg.prune.round_to == "auto":
        try:
            stages.latency_table(cfg)
        except ProviderUnavailable as err:
            raise ConfigError(f"prune.round_to auto measures channel counts on the target's runtime: {err}; measure "
                              "on a machine that has it, or set prune.round_to to a multiple (8 suits GPU tensor "
                              "cores)") from None
    allocating = [method for method in cfg.methods if create_method(method, cfg.methods[method]).allocates_latency]
    searched = [method for method in cfg.methods if method not in allocating]
    for index, method in enumerate(searched):
        _prune_copy(cfg, spec, model, example, method, calibration, export=index == 0 and spec.name not in MODELS)
    for method in allocating:
        _allocate_copy(cfg, spec, model, example, method, calibration)
    if cfg.prune.ratio is None and cfg.search.target.metric in LATENCY_METRICS and searched:
        check_latency_target(cfg, model, example)
    _checked.add(key)


def check_latency_target(cfg: PipelineConfig, model: nn.Module, example: torch.Tensor) -> None:
    """A latency or speed-up target needs the target's runtime, and must be within reach of the smallest net the
    search may prune to (every layer at ``search.ratio_high``), predicted on the latency table from the untrained
    model (latency does not depend on the weights): else training the baseline would be wasted."""
    target = cfg.search.target
    try:
        table = stages.latency_table(cfg)
    except ProviderUnavailable as err:
        raise ConfigError(f"search.target.metric {target.metric}: {err}") from None
    with tempfile.TemporaryDirectory(prefix="pruneflow-preflight-") as scratch:
        exported = export_onnx(model, example, Path(scratch) / "model.onnx", cfg.export.opset)
        predictor = LatencyPredictor(model, example, exported, table, cfg.evaluate.latency_batch)
    smallest = copy.deepcopy(model)
    create_method("l1").prune(smallest, example, PrunePlan(  # uniform: every layer at the search's bound
        ratio=cfg.search.ratio_high, round_to=cfg.prune.round_to if cfg.prune.round_to != "auto" else None,
        max_layer_ratio=cfg.prune.max_layer_ratio))
    costs = predictor.costs(smallest)
    if target_gap(cfg.search, costs) > 0:
        raise ConfigError(
            f"search.target: {target.metric} {target.value:g} is out of reach on this machine: the smallest net the "
            f"search may reach (every layer at search.ratio_high={cfg.search.ratio_high:g}) is predicted at "
            f"{costs['latency_ms']:.3f} ms, {costs['speedup']:.2f}x the baseline's {predictor.baseline_ms:.3f} ms "
            f"(batch {cfg.evaluate.latency_batch}); relax search.target or raise search.ratio_high")


def _allocate_copy(cfg: PipelineConfig, spec: ModelSpec, model: nn.Module, example: torch.Tensor, method: str,
                   calibration: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """A method that allocates under the run's latency budget (``halp``) allocates on a copy and prunes it: a budget
    below what the smallest net it may prune to reaches (predicted on the table; latency does not depend on the
    weights) or a target runtime that is not installed stops the run here, not after training."""
    pruner = create_method(method, cfg.methods[method])
    pruned = _as_trained(copy.deepcopy(model), pruner)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Torch-Pruning warns about unwrapped parameters; the error says more
            plan = stages.allocated(cfg, pruner, pruned, example, stages.latency_plan(cfg, method), None, calibration)
            pruner.prune(pruned, example, plan, calibration)
            with torch.no_grad():
                pruned.eval()(example)
    except BudgetError as err:
        raise ConfigError(str(err)) from None  # it names the key that set the budget
    except ProviderUnavailable as err:
        raise ConfigError(f"methods.{method}: {err}") from None
    except MethodUnsuitable as err:
        raise ConfigError(f"methods.{method}: {err}") from None
    except Exception as err:  # Torch-Pruning fails on unknown layers with any error (IndexError, RuntimeError...)
        raise unprunable(spec.name, model, err, method) from None


def build_checked(spec: ModelSpec) -> nn.Module:
    """``spec.build()``, with a user factory's exception or non-module result turned into a ConfigError."""
    arguments = ", ".join(f"{key}={value!r}" for key, value in {
        "in_channels": spec.in_channels,
        **({} if spec.num_classes is None else {"num_classes": spec.num_classes}),
        **spec.kwargs,
    }.items())
    try:
        model = spec.build()
    except Exception as err:  # a user's factory can raise anything; the run would fail the same way later
        hint = " (check model.kwargs)" if isinstance(err, TypeError) else ""  # an argument it does not take
        raise ConfigError(f"model {spec.name!r}: the factory failed when called with ({arguments}): "
                          f"{type(err).__name__}: {err}{hint}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {spec.name!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _run(spec: ModelSpec, model: nn.Module, example: torch.Tensor) -> None:
    """A batch shaped like the data goes through, and a classifier gives one score per class."""
    shape = "x".join(map(str, example.shape))
    try:
        with torch.no_grad():
            output = model.eval()(example)
    except Exception as err:
        raise ConfigError(f"model {spec.name!r}: a forward pass on a {shape} batch of the data failed: "
                          f"{type(err).__name__}: {first_line(err)}") from None
    if spec.num_classes is not None and tuple(getattr(output, "shape", ())) != (len(example), spec.num_classes):
        got = "x".join(map(str, output.shape)) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ConfigError(f"model {spec.name!r}: a {shape} batch gives {got}, not {len(example)}x{spec.num_classes} "
                          f"class scores (num_classes={spec.num_classes} comes from the data's class folders)")


def _prune_copy(cfg: PipelineConfig, spec: ModelSpec, model: nn.Module, example: torch.Tensor, method: str,
                calibration: list[tuple[torch.Tensor, torch.Tensor]], export: bool) -> None:
    """Prune a copy with ``method`` as far as the run may (``prune.ratio``, else ``search.ratio_high``), run it,
    ``export`` it to ONNX if asked, and check that the pruning removed something.

    The copy is untrained, so it is first given what training would leave: distinct BatchNorm scales (slimming
    ranks by them) and recorded statistics for methods that score the training history. Data-driven methods
    calibrate on one small batch: this checks that the model can be pruned, not how well.
    """
    ratio, ratio_key = ((cfg.prune.ratio, "prune.ratio") if cfg.prune.ratio is not None
                        else (cfg.search.ratio_high, "search.ratio_high"))
    plan = PrunePlan.from_config(cfg.prune, ratio=ratio)
    auto = plan.round_to == "auto"
    if auto:
        plan.round_to = None  # resolved per layer by the prune stage, from the counts asked unrounded
    pruner = create_method(method, cfg.methods[method])
    pruned = _as_trained(copy.deepcopy(model), pruner)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Torch-Pruning warns about unwrapped parameters; the error says more
            result = pruner.prune(pruned, example, plan, calibration if pruner.needs_calibration else None)
            with torch.no_grad():
                pruned.eval()(example)
    except MethodUnsuitable as err:
        raise ConfigError(f"methods.{method}: {err}") from None
    except Exception as err:  # Torch-Pruning fails on unknown layers with any error (IndexError, RuntimeError...)
        raise unprunable(spec.name, model, err, method) from None
    if export:
        _export(cfg, spec, pruned, example)
    if auto:  # each count at least raised to a multiple of the runtime's block: does any layer stay thinner?
        block = stages.latency_table(cfg).channel_block() or 1
        result = replace(result, layers=[replace(layer, channels_after=min(
            layer.channels_before, -(-layer.channels_after // block) * block)) for layer in result.layers])
        plan.round_to = "auto"
    try:
        gates.check_removed(method, pruner.structured, plan, result, keys=(ratio_key, "prune.round_to"))
    except gates.GateError as err:
        raise ConfigError(f"model {spec.name!r}: {err}") from None


def _as_trained(model: nn.Module, pruner: PruningMethod) -> nn.Module:
    """Distinct BatchNorm scales, as any training leaves them, and the method's recorded statistics, if any."""
    generator = torch.Generator().manual_seed(0)
    for norm in model.modules():
        if isinstance(norm, nn.BatchNorm2d) and norm.affine:
            with torch.no_grad():
                norm.weight.copy_(torch.rand(norm.num_features, generator=generator) * 0.9 + 0.1)
    recorder = pruner.recorder()
    if recorder is not None:
        for epoch in (1, 2):
            recorder.on_epoch_end(model, epoch)
        pruner.use_records(recorder.state())
    return model


def _export(cfg: PipelineConfig, spec: ModelSpec, pruned: nn.Module, example: torch.Tensor) -> None:
    with tempfile.TemporaryDirectory(prefix="pruneflow-preflight-") as scratch:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_onnx(pruned, example, Path(scratch) / "model.onnx", cfg.export.opset)
        except Exception as err:  # the exporter's errors are many and multi-page; their summary line suffices
            raise ConfigError(f"model {spec.name!r}: ONNX export (opset {cfg.export.opset}) fails: "
                              f"{type(err).__name__}: {first_line(err)}") from None


def unprunable(name: str, model: nn.Module, err: Exception, method: str) -> ConfigError:
    """The error for a model Torch-Pruning failed on with ``method``: its own error, and the layers it most likely
    failed at."""
    foreign = unprunable_layers(model)
    hint = (f"; layers it has no pruner for: {', '.join(foreign)}. Replace them, or return them and the layers "
            "feeding them from a pruneflow_ignored_layers() method of the model" if foreign else "")
    return ConfigError(f"model {name!r}: Torch-Pruning cannot prune it ({type(err).__name__}: "
                       f"{first_line(err)}; method {method}){hint}")


def unprunable_layers(model: nn.Module) -> list[str]:
    """Layers holding parameters that Torch-Pruning has no pruner for (``rnn (GRU)``), and bare parameters of
    container modules (``mix (nn.Parameter)``): where its dependency graph loses track of the channels."""
    known = set(tp.pruner.function.PrunerBox) - {tp.ops.OPTYPE.ELEMENTWISE}
    found = []
    for name, module in model.named_modules():
        own = [param_name for param_name, _ in module.named_parameters(recurse=False)]
        if not own or tp.ops.module2type(module) in known:
            continue
        if any(True for _ in module.children()) or not name:
            found += [f"{name}.{param_name}".lstrip(".") + " (nn.Parameter)" for param_name in own]
        else:
            found.append(f"{name} ({type(module).__name__})")
    return found


def first_line(err: BaseException) -> str:
    """The line that says what went wrong: torch.onnx's errors open with advice and put the cause under
    '## Exception summary'; others say it first. ANSI colour codes are dropped."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines()]
    if "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1:]
    text = next((line for line in lines if line), type(err).__name__)
    if text.startswith("<class '"):  # "<class 'x.DispatchError'>: No ONNX function found for ..."
        text = text.partition(">: ")[2] or text
    return text[:300]
