"""Model size and cost: MACs, parameters, per-layer channels, size on disk."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

PRUNABLE = (nn.Conv2d, nn.Linear)


@dataclass
class LayerChange:
    name: str
    channels_before: int
    channels_after: int
    macs_before: int
    macs_after: int

    def as_dict(self) -> dict:
        return asdict(self)


def count_macs_params(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """MACs and parameters, both counted by Torch-Pruning so every row of a table uses one tool."""
    macs, params, _ = _torch_pruning_counts(model, example_inputs)
    return macs, params


def layer_macs(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, int]:
    """The MACs of every leaf module for one input, by name, as Torch-Pruning counts them (``layer_wise``): they
    add up to ``count_macs_params``' total, normalisation layers and activations included."""
    _, _, per_module = _torch_pruning_counts(model, example_inputs[:1])
    return {name: int(per_module.get(module) or 0) for name, module in model.named_modules()
            if next(module.children(), None) is None}


def forward_hooked(model: nn.Module, example_inputs: torch.Tensor, hooks: dict[nn.Module, Callable]) -> None:
    """One eval-mode, no-grad forward pass on one example with forward hooks on some modules; the hooks are
    removed and the model's train/eval mode restored afterwards."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_inputs[:1])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def layer_stats(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Output channels and MACs of every conv/linear layer for one input, counted as ``layer_macs`` counts them,
    for the per-layer pruning report."""
    _, _, per_module = _torch_pruning_counts(model, example_inputs[:1])
    return {name: (module.weight.shape[0], int(per_module.get(module) or 0))
            for name, module in model.named_modules() if isinstance(module, PRUNABLE)}


def _torch_pruning_counts(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int, dict[nn.Module, float]]:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, params, per_module, _ = tp.utils.count_ops_and_params(model, example_inputs, layer_wise=True)
    model.train(was_training)
    return int(macs), int(params), per_module


def layer_changes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[LayerChange]:
    return [LayerChange(name, c0, after.get(name, (0, 0))[0], m0, after.get(name, (0, 0))[1])
            for name, (c0, m0) in before.items()]


def zero_weight_share(model: nn.Module) -> float:
    """Share of conv/linear weights that are exactly zero (what mask-based pruning removes)."""
    weights = [m.weight for m in model.modules() if isinstance(m, PRUNABLE)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)


def reductions(model: nn.Module, example: torch.Tensor, base_macs: float, base_params: float,
               structured: bool) -> dict[str, float]:
    """``macs_reduction`` and ``params_reduction`` of a pruned model, as fractions of the baseline's.

    A mask-based (unstructured) method cannot lower dense MACs or parameters, so both then read as the share
    of zeroed conv/linear weights: the quantity its targets and searches steer.
    """
    if not structured:
        return dict.fromkeys(("macs_reduction", "params_reduction"), zero_weight_share(model))
    macs, params = count_macs_params(model, example)
    return {"macs_reduction": 1.0 - macs / base_macs, "params_reduction": 1.0 - params / base_params}


def file_size_mb(path: Path) -> float:
    return path.stat().st_size / 2**20
