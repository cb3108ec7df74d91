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
from pathlib import Path
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from pruneflow import stages
from pruneflow.checkpoint import ModelSpec
from pruneflow.config import ConfigError, PipelineConfig
from pruneflow.data import DataSplits, prepare_dataset
from pruneflow.export import export_onnx
from pruneflow.layout import ProjectLayout
from pruneflow.methods import create_method
from pruneflow.models import MODELS
from pruneflow.plan import PrunePlan

CHECK_METHOD = "l1"  # every method prunes through the same dependency graph; l1 needs no data or training
_checked: set[str] = set()  # models that passed, so the flow does not redo the CLI's check in the same process


def check_inputs(cfg: PipelineConfig, root: Path, log: Callable[[str], None]) -> None:
    """Prepare and decode the data, then build, run, prune and export the model on it; raise ConfigError if any fails.

    The flow reuses the work: the prepared folder is current and ``stages.load_data`` caches the decoded splits.
    """
    check_model(cfg, check_data(cfg, ProjectLayout(root, cfg), log))


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
    """Build the model for the data and run a batch through it. Models from outside the registry (a user's
    factory, ``torchvision:<name>``) are also pruned once on a copy and exported to ONNX, as the pipeline will:
    the registered ones are tested for both, a user's model may hold layers neither tool handles."""
    spec = stages.model_spec(cfg, splits)
    key = repr((spec, cfg.prune.model_dump(), cfg.search.ratio_high, cfg.export.opset))
    if key in _checked:
        return
    model = build_checked(spec)
    example = spec.example_inputs()
    _run(spec, model, example)
    if spec.name not in MODELS:
        _prune_and_export(cfg, spec, model, example)
    _checked.add(key)


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
                          f"{type(err).__name__}: {_first_line(err)}") from None
    if spec.num_classes is not None and tuple(getattr(output, "shape", ())) != (len(example), spec.num_classes):
        got = "x".join(map(str, output.shape)) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ConfigError(f"model {spec.name!r}: a {shape} batch gives {got}, not {len(example)}x{spec.num_classes} "
                          f"class scores (num_classes={spec.num_classes} comes from the data's class folders)")


def _prune_and_export(cfg: PipelineConfig, spec: ModelSpec, model: nn.Module, example: torch.Tensor) -> None:
    """Prune a copy as far as the run may (``prune.ratio``, else ``search.ratio_high``), run it, export it to ONNX."""
    pruned = copy.deepcopy(model)
    ratio = cfg.prune.ratio if cfg.prune.ratio is not None else cfg.search.ratio_high
    plan = PrunePlan.from_config(cfg.prune, ratio=ratio)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Torch-Pruning warns about unwrapped parameters; the error says more
            create_method(CHECK_METHOD).prune(pruned, example, plan)
            with torch.no_grad():
                pruned.eval()(example)
    except Exception as err:  # Torch-Pruning fails on unknown layers with any error (IndexError, RuntimeError...)
        raise unprunable(spec.name, model, err) from None
    with tempfile.TemporaryDirectory(prefix="pruneflow-preflight-") as scratch:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_onnx(pruned, example, Path(scratch) / "model.onnx", cfg.export.opset)
        except Exception as err:  # the exporter's errors are many and multi-page; their summary line suffices
            raise ConfigError(f"model {spec.name!r}: ONNX export (opset {cfg.export.opset}) fails: "
                              f"{type(err).__name__}: {_first_line(err)}") from None


def unprunable(name: str, model: nn.Module, err: Exception) -> ConfigError:
    """The error for a model Torch-Pruning failed on: its own error, and the layers it most likely failed at."""
    foreign = unprunable_layers(model)
    hint = (f"; layers it has no pruner for: {', '.join(foreign)}. Replace them, or return them and the layers "
            "feeding them from a pruneflow_ignored_layers() method of the model" if foreign else "")
    return ConfigError(f"model {name!r}: Torch-Pruning cannot prune it ({type(err).__name__}: "
                       f"{_first_line(err)}){hint}")


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


def _first_line(err: BaseException) -> str:
    """The line that says what went wrong: torch.onnx's errors open with advice and put the cause under
    '## Exception summary'; others say it first. ANSI colour codes are dropped."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines()]
    if "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1:]
    text = next((line for line in lines if line), type(err).__name__)
    if text.startswith("<class '"):  # "<class 'x.DispatchError'>: No ONNX function found for ..."
        text = text.partition(">: ")[2] or text
    return text[:300]
