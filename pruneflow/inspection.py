"""Prune one model once and report what changed: the library side of ``pruneflow prune``.

It answers "what does method X at ratio r do to model M" in seconds, without a project, a trained
baseline or tracking, so a model/method pair can be checked before a pipeline run is spent on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from pruneflow.checkpoint import ModelSpec, load_model
from pruneflow.config import DataConfig
from pruneflow.data import DATASETS, DataSplits, load_dataset, prepare_dataset
from pruneflow.methods import PruningMethod
from pruneflow.metrics import count_macs_params, zero_weight_share
from pruneflow.models import MODELS
from pruneflow.plan import PrunePlan
from pruneflow.preflight import build_checked, unprunable


def fit_inputs(images: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
    """Adapt a batch to a model's ``(C, H, W)``: grey is repeated to every channel, colour averaged to grey,
    and images are resized, so that e.g. a 3-channel 32x32 CIFAR net can be calibrated on 8x8 digits."""
    channels, height, width = input_shape
    if images.shape[1] != channels:
        if images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        elif channels == 1:
            images = images.mean(dim=1, keepdim=True)
        else:
            raise ValueError(f"the data has {images.shape[1]} channels and the model takes {channels}")
    if tuple(images.shape[-2:]) != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    return images


def calibration_batches(splits: DataSplits, batches: int, input_shape: tuple[int, ...],
                        batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``batches`` training batches, fitted to the model's input."""
    return [(fit_inputs(images, input_shape), labels)
            for images, labels in splits.loader("train", batch_size, max_batches=batches)]


def inspect_pruning(model_name: str, model: nn.Module, input_shape: tuple[int, ...], pruner: PruningMethod,
                    plan: PrunePlan, calib: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Prune ``model`` in place; return cost before/after and the per-layer report, as plain JSON-able types."""
    example = torch.zeros(2, *input_shape)
    macs_before, params_before = count_macs_params(model, example[:1])
    try:
        result = pruner.prune(model, example, plan, calib)
    except Exception as err:
        if model_name in MODELS:  # the registered models are tested with every method: a failure is a bug
            raise
        raise unprunable(model_name, model, err) from None  # a user's layer Torch-Pruning cannot handle
    macs_after, params_after = count_macs_params(model, example[:1])
    return {
        "model": model_name,
        "method": pruner.name,
        "ratio": plan.ratio,
        "round_to": plan.round_to,
        "input_shape": list(input_shape),
        "macs_before": macs_before,
        "macs_after": macs_after,
        "macs_reduction": 1.0 - macs_after / macs_before,
        "params_before": params_before,
        "params_after": params_after,
        "params_reduction": 1.0 - params_after / params_before,
        "weight_sparsity": zero_weight_share(model),  # what mask-based methods remove instead of channels
        "removed_blocks": result.removed_blocks,
        "notes": result.notes,
        "layers": [layer.as_dict() for layer in result.layers],
    }


def prune_once(pruner: PruningMethod, plan: PrunePlan, model_name: str | None = None,
               checkpoint: Path | None = None, data: DataConfig | None = None, data_dir: Path = Path("data"),
               calib_batches: int = 4, input_size: int | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Prune a fresh ``model_name`` (sized by the dataset) or a ``checkpoint`` once and report the change.

    The dataset is prepared under ``data_dir`` only when needed: to size a fresh model, or to calibrate a
    data-driven method. ``input_size`` overrides the side of the square input (e.g. 32 for CIFAR figures).
    """
    data = data or DataConfig()
    splits = None
    if checkpoint is None or pruner.needs_calibration:
        DATASETS.get(data.dataset).check_config(data)
        splits = load_dataset(data, prepare_dataset(data, data_dir, log=log))
    if checkpoint is not None:
        model, spec, _ = load_model(checkpoint)
        if model_name is not None and model_name != spec.name:
            raise ValueError(f"model {model_name} differs from the checkpoint's model {spec.name}")
        model_name, shape = spec.name, spec.input_shape
    elif model_name is not None:
        torch.manual_seed(0)
        model = build_checked(ModelSpec(model_name, splits.in_channels, splits.num_classes, splits.input_shape,
                                        splits.model_kwargs)).eval()
        shape = splits.input_shape
    else:
        raise ValueError("give a model name or a checkpoint")
    if input_size:
        shape = (shape[0], input_size, input_size)
    calib = None
    if pruner.needs_calibration:
        if splits.input_shape != shape:
            log(f"calibrating on {data.dataset} images {'x'.join(map(str, splits.input_shape))} "
                f"fitted to the model's input {'x'.join(map(str, shape))}")
        calib = calibration_batches(splits, calib_batches, shape)
    return inspect_pruning(model_name, model, shape, pruner, plan, calib)


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table for the terminal."""
    lines = [
        f"{report['model']} on input {'x'.join(map(str, report['input_shape']))}: {report['method']} at ratio "
        f"{report['ratio']:g}, round_to {report['round_to']}",
        f"MACs    {report['macs_before'] / 1e6:10.3f} M -> {report['macs_after'] / 1e6:10.3f} M  "
        f"({report['macs_reduction']:.1%} fewer)",
        f"params  {report['params_before'] / 1e6:10.3f} M -> {report['params_after'] / 1e6:10.3f} M  "
        f"({report['params_reduction']:.1%} fewer)",
    ]
    if report["weight_sparsity"]:
        lines.append(f"zeroed weights: {report['weight_sparsity']:.1%} of conv/linear weights")
    if report["removed_blocks"]:
        lines.append(f"removed blocks: {', '.join(report['removed_blocks'])}")
    if report["notes"]:
        lines.append(report["notes"])
    width = max(len("layer"), *(len(layer["name"]) for layer in report["layers"]))
    lines += ["", f"{'layer':<{width}}  {'channels':^14}  {'MACs':^24}"]
    lines += [f"{layer['name']:<{width}}  {layer['channels_before']:>5} -> {layer['channels_after']:<5}  "
              f"{layer['macs_before']:>10} -> {layer['macs_after']}" for layer in report["layers"]]
    return "\n".join(lines)
