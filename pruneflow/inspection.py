"""Prune one model once and report what changed: the library side of ``pruneflow prune``.

It answers "what does method X at ratio r do to model M" in seconds, without a project, a trained
baseline or tracking, so a model/method pair can be checked before a pipeline run is spent on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

from pruneflow import gates
from pruneflow.checkpoint import (
    ModelSpec,
    Surgery,
    is_model_file,
    load_foreign_model,
    load_trained,
    read_checkpoint,
    save_model,
)
from pruneflow.config import DataConfig
from pruneflow.data import DATASETS, DataSplits, load_dataset, prepare_dataset
from pruneflow.latency.rounding import AUTO, cache_folder, rounding_table, step_rounded
from pruneflow.latency.table import LatencyTable
from pruneflow.methods import MethodUnsuitable, PruneResult, PruningMethod
from pruneflow.metrics import count_macs_params, zero_weight_share
from pruneflow.models import MODELS
from pruneflow.plan import PrunePlan
from pruneflow.preflight import build_checked, first_line, unprunable


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
                    plan: PrunePlan, calib: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                    ) -> tuple[dict[str, Any], PruneResult]:
    """Prune ``model`` in place; return cost before/after and the per-layer report, as plain JSON-able types,
    and the pruning's result (its history rebuilds the pruned net). ``round_to: auto`` rounds as the pipeline
    does: every group's count at a step edge of this machine's latency table (ONNX Runtime CPU, 2 threads; built
    on first use, then cached), each group's rounding and why in the report."""
    example = torch.zeros(2, *input_shape)
    macs_before, params_before = count_macs_params(model, example[:1])
    asked = plan
    rounding: list[dict[str, Any]] = []
    try:
        if plan.round_to == AUTO:
            plan, rounding = step_rounded(pruner, model, example, plan, LatencyTable(cache_folder()), calib)
        result = pruner.prune(model, example, plan, calib)
    except MethodUnsuitable:  # the method's own rule (cascade's declared blocks): its message says what to do
        raise
    except Exception as err:
        if model_name in MODELS:  # the registered models are tested with every method: a failure is a bug
            raise
        raise unprunable(model_name, model, err, pruner.name) from None  # a user's layer Torch-Pruning cannot handle
    gates.check_removed(pruner.name, pruner.structured, plan, result, keys=("--ratio", "--round-to"))
    macs_after, params_after = count_macs_params(model, example[:1])
    return {
        "model": model_name,
        "method": pruner.name,
        "ratio": asked.ratio,
        "round_to": asked.round_to,
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
        "rounding": rounding,
        "layers": [layer.as_dict() for layer in result.layers],
    }, result


def sized_spec(name: str, splits: DataSplits | None, in_channels: int | None, num_classes: int | None,
               input_size: int | None) -> ModelSpec:
    """The model sized by the options given and, for the rest, by the data (``splits`` None: all were given)."""
    if splits is None:
        if in_channels is None or num_classes is None or input_size is None:
            raise ValueError(f"{name}: without data to size it, give in_channels, num_classes and input_size")
        return ModelSpec(name, in_channels, num_classes, (in_channels, input_size, input_size))
    channels = in_channels or splits.in_channels
    return ModelSpec(name, channels, num_classes or splits.num_classes, (channels, *splits.input_shape[1:]),
                     splits.model_kwargs, splits.mean, splits.std)


def prune_once(pruner: PruningMethod, plan: PrunePlan, model_name: str | None = None,
               checkpoint: Path | None = None, data: DataConfig | None = None, data_dir: Path = Path("data"),
               calib_batches: int = 4, input_size: int | None = None,
               log: Callable[[str], None] = print, *, in_channels: int | None = None,
               num_classes: int | None = None, out: Path | None = None) -> dict[str, Any]:
    """Prune a fresh ``model_name``, a trained ``checkpoint`` of it or a model file once and report the change.

    ``checkpoint`` is a model file pruneflow wrote (it names its model and input), or a plain state_dict for
    ``model_name``. A model is sized by ``in_channels``, ``num_classes`` and ``input_size`` (the side of a square
    input) where given, else by the dataset; the dataset is prepared under ``data_dir`` only when something is
    left to size, or to calibrate a data-driven method. ``out`` writes the pruned model as a model file (its
    architecture replayed from the pruning history), which the pipeline's stages and this command read back.
    """
    data = data or DataConfig()
    from_file = checkpoint is not None and is_model_file(read_checkpoint(checkpoint))
    sized = None not in (in_channels, num_classes, input_size)
    splits = None
    if not (from_file or sized) or pruner.needs_calibration:
        DATASETS.get(data.dataset).check_config(data)
        splits = load_dataset(data, prepare_dataset(data, data_dir, log=log))
    if from_file:
        if in_channels or num_classes:
            raise ValueError(f"{checkpoint} is a model file, which names its own input channels and classes")
        assert checkpoint is not None  # from_file
        model, spec, surgery = load_foreign_model(checkpoint, model_name)
        if model_name is not None and model_name != spec.name:
            raise ValueError(f"model {model_name} differs from the checkpoint's model {spec.name}")
    elif model_name is not None:
        spec = sized_spec(model_name, splits, in_channels, num_classes, input_size)
        torch.manual_seed(0)
        model = build_checked(spec).eval()
        if checkpoint is not None:
            model, spec = load_trained(checkpoint, spec)
        surgery = Surgery()
    else:
        raise ValueError("give a model name, or a model file pruneflow wrote" if checkpoint is None else
                         f"{checkpoint} is a state_dict: give --model, the model its weights are for")
    if input_size:
        spec = replace(spec, input_shape=(spec.input_shape[0], input_size, input_size))
    shape = spec.input_shape
    check_input_fits(spec.name, model, shape)
    calib = None
    if pruner.needs_calibration:
        assert splits is not None  # loaded above for the calibration
        if splits.input_shape != shape:
            log(f"calibrating on {data.dataset} images {'x'.join(map(str, splits.input_shape))} "
                f"fitted to the model's input {'x'.join(map(str, shape))}")
        calib = calibration_batches(splits, calib_batches, shape)
    report, result = inspect_pruning(spec.name, model, shape, pruner, plan, calib)
    if out is not None:
        if surgery.history and result.removed_blocks:
            raise ValueError(f"{checkpoint}: a pruned model cannot lose blocks too (its history would not replay)")
        save_model(out, model, spec, [*surgery.history, *result.history], [*surgery.removed_blocks,
                                                                          *result.removed_blocks])
        report["out"] = str(out)
    return report


def check_input_fits(model_name: str, model: nn.Module, shape: tuple[int, ...]) -> None:
    """A batch of the input shape goes through; else a ValueError that names the model, the input and the remedy
    (an ImageNet net's pooling cannot shrink an 8x8 digit: "Calculated output size: (256x0x0)")."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
    except Exception as err:
        raise ValueError(f"model {model_name!r} cannot run on a {'x'.join(map(str, shape))} input "
                         f"({type(err).__name__}: {first_line(err)}); set the input side with --input-size (e.g. 32, "
                         "or 224 for ImageNet models)") from None


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
    if "out" in report:
        lines.append(f"pruned model written to {report['out']}")
    if report["rounding"]:
        lines += ["", "channels kept at latency step edges (round_to auto):",
                  tabulate(rounding_table(report["rounding"]), ["group", "channels", "asked", "kept", "why"],
                           disable_numparse=True)]
    width = max(len("layer"), *(len(layer["name"]) for layer in report["layers"]))
    lines += ["", f"{'layer':<{width}}  {'channels':^14}  {'MACs':^24}"]
    lines += [f"{layer['name']:<{width}}  {layer['channels_before']:>5} -> {layer['channels_after']:<5}  "
              f"{layer['macs_before']:>10} -> {layer['macs_after']}" for layer in report["layers"]]
    return "\n".join(lines)
