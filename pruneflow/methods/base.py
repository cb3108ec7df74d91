"""The one interface every pruning method implements, and the Torch-Pruning surgery they share.

A method contributes an importance score (and optionally a sparsity regulariser for training and a
calibration pass over data); the structural removal is always Torch-Pruning's DependencyGraph, so
residual adds, concatenations and depthwise groups stay consistent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable

import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict
from torch import nn

from pruneflow.metrics import PRUNABLE, LayerChange, layer_changes, layer_stats

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Regularizer = Callable[[nn.Module], torch.Tensor]


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class PruneTarget:
    """What to remove: a global channel ratio, optionally overridden per layer (module name -> ratio)."""

    ratio: float = 0.5
    layer_ratios: dict[str, float] = field(default_factory=dict)
    round_to: int | None = 8
    max_layer_ratio: float = 0.9


@dataclass
class PruneResult:
    model: nn.Module
    history: list  # Torch-Pruning's pruning history: replaying it on the baseline rebuilds the pruned net
    layers: list[LayerChange]
    notes: str = ""


class PruningMethod:
    """Subclass, set ``name``/``description``, and provide ``importance()``; register with ``@register_method``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    needs_calibration: ClassVar[bool] = False
    global_pruning: ClassVar[bool] = False

    def __init__(self, params: BaseModel | dict | None = None) -> None:
        self.params = params if isinstance(params, self.Params) else self.Params.model_validate(params or {})

    def regularizer(self) -> Regularizer | None:
        """A sparsity term added to the baseline's training loss, for methods whose scores need one."""
        return None

    def importance(self) -> tp.importance.Importance:
        raise NotImplementedError

    def calibrate(self, model: nn.Module, batches: Batches) -> None:
        """Data-driven methods gather what their importance needs (gradients, activations) here."""

    def prune(self, model: nn.Module, example_inputs: torch.Tensor, target: PruneTarget,
              calib_batches: Batches | None = None) -> PruneResult:
        """Prune ``model`` in place and report what changed, layer by layer."""
        before = layer_stats(model, example_inputs)
        modules = dict(model.named_modules())
        unknown = sorted(set(target.layer_ratios) - set(modules))
        if unknown:
            raise ValueError(f"layer_ratios name layers the model lacks: {', '.join(unknown)}")
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs,
            importance=self.importance(),
            global_pruning=self.global_pruning,
            pruning_ratio=target.ratio,
            pruning_ratio_dict={modules[name]: ratio for name, ratio in target.layer_ratios.items()},
            max_pruning_ratio=target.max_layer_ratio,
            ignored_layers=ignored_layers(model),
            round_to=target.round_to,
        )
        if self.needs_calibration:
            if calib_batches is None:
                raise ValueError(f"method {self.name} is data-driven and needs calibration batches")
            self.calibrate(model, calib_batches)
        pruner.step()
        model.zero_grad(set_to_none=True)
        return PruneResult(model, pruner.pruning_history(), layer_changes(before, layer_stats(model, example_inputs)))


def ignored_layers(model: nn.Module) -> list[nn.Module]:
    """The stem conv and the output layer keep their channels (METHODS.md's rule for every method).

    A model can name its own list by defining ``pruneflow_ignored_layers() -> list[nn.Module]``.
    """
    custom = getattr(model, "pruneflow_ignored_layers", None)
    if callable(custom):
        return list(custom())
    layers = [module for module in model.modules() if isinstance(module, PRUNABLE)]
    return [layers[0], layers[-1]] if len(layers) > 1 else layers


def rebuild_pruned(baseline: nn.Module, example_inputs: torch.Tensor, history: list) -> nn.Module:
    """Replay a pruning history on a freshly built baseline so a pruned state dict fits it."""
    graph = tp.DependencyGraph().build_dependency(baseline, example_inputs=example_inputs)
    graph.load_pruning_history([tuple(step) for step in history])
    return baseline
