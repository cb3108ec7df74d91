"""The one interface every pruning method implements, and the Torch-Pruning surgery they share.

A method contributes an importance score (and optionally a sparsity regulariser for training and a
calibration pass over data); the structural removal is always Torch-Pruning's DependencyGraph, so
residual adds, concatenations and depthwise groups stay consistent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict
from torch import nn

from pruneflow.metrics import PRUNABLE, LayerChange, layer_changes, layer_stats
from pruneflow.plan import PrunePlan
from pruneflow.task import Batches
from pruneflow.training import Regularizer


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class PruneResult:
    model: nn.Module
    history: list  # Torch-Pruning's pruning history: replaying it on the baseline rebuilds the pruned net
    layers: list[LayerChange]
    # What was really pruned: the plan given, with what the method decided itself (its per-group ratios, the
    # blocks it removed)
    plan: PrunePlan
    notes: str = ""

    @property
    def removed_blocks(self) -> list[str]:
        """Submodules replaced by identity (or removed by the model's ``remove_block``), before the history."""
        return self.plan.removed_blocks


class PruningMethod:
    """Subclass, set ``name``/``description``, and provide ``importance()``; register with ``@register_method``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    needs_calibration: ClassVar[bool] = False
    global_pruning: ClassVar[bool] = False
    # False for mask-based methods: they zero weights but keep every channel, so dense MACs do not drop and
    # the search measures their reduction as the share of zeroed conv/linear weights instead.
    structured: ClassVar[bool] = True
    # False for methods that allocate per-layer ratios themselves (entropy allocation, masks, blocks): the
    # search then offers them the global ratio only.
    accepts_layer_ratios: ClassVar[bool] = True
    # The tasks (params' ``task``) whose models the method can prune; config validation checks it.
    tasks: ClassVar[tuple[str, ...]] = ("classification", "super_resolution")

    def __init__(self, params: BaseModel | dict | None = None) -> None:
        self.params = params if isinstance(params, self.Params) else self.Params.model_validate(params or {})

    def regularizer(self) -> Regularizer | None:
        """A sparsity term added to the baseline's training loss, for methods whose scores need one."""
        return None

    def fixed_by_params(self) -> bool:
        """True when the params alone say how much goes (the pruning ratio is ignored): nothing to search."""
        return False

    def recorder(self) -> "TrainingRecorder | None":
        """Something to run after every baseline epoch, for methods that score filters by training history."""
        return None

    def use_records(self, records: dict) -> None:
        """Receive what ``recorder()`` recorded during baseline training (the baseline stage saved it)."""

    def retrain(self, model: nn.Module, train_batches: Batches, val_batches: Batches, cfg,
                on_epoch_end: Callable | None = None) -> list | None:
        """A method-specific retraining recipe; ``None`` means the standard loop (pruneflow.training.train)."""
        return None

    def importance(self) -> tp.importance.Importance:
        raise NotImplementedError

    @staticmethod
    def layer_ratios(model: nn.Module, plan: PrunePlan) -> dict[nn.Module, float]:
        """Per-layer ratios for uniform pruning: the exact ratio of each group listed in ``kept_channels``, else
        ``layer_ratios`` or ``ratio`` with the channels kept rounded as ``kept_channels`` says."""
        ratios = {}
        for name, module in model.named_modules():
            if isinstance(module, PRUNABLE):
                channels = module.weight.shape[0]
                ratio = min(plan.layer_ratios.get(name, plan.ratio), plan.max_layer_ratio)
                kept = plan.kept_channels.get(name, kept_channels(channels, ratio, plan.round_to))
                ratios[module] = exact_ratio(channels, kept)
        return ratios

    def calibrate(self, model: nn.Module, batches: Batches) -> None:
        """Data-driven methods gather what their importance needs (gradients, activations) here."""

    def prune(self, model: nn.Module, example_inputs: torch.Tensor, plan: PrunePlan,
              calib_batches: Batches | None = None) -> PruneResult:
        """Prune ``model`` in place as ``plan`` says and report what changed, layer by layer."""
        before = layer_stats(model, example_inputs)
        remove_blocks(model, plan.removed_blocks)
        modules = dict(model.named_modules())
        unknown = sorted({*plan.layer_ratios, *plan.kept_channels} - set(modules))
        if unknown:
            raise ValueError(f"the plan names layers the model lacks: {', '.join(unknown)}")
        explicit = {modules[name]: ratio for name, ratio in plan.layer_ratios.items()}
        explicit.update({modules[name]: exact_ratio(modules[name].weight.shape[0], kept)
                         for name, kept in plan.kept_channels.items()})
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs,
            importance=self.importance(),
            global_pruning=self.global_pruning,
            pruning_ratio=plan.ratio,
            pruning_ratio_dict=explicit if self.global_pruning else self.layer_ratios(model, plan),
            max_pruning_ratio=plan.max_layer_ratio,
            ignored_layers=ignored_layers(model),
            round_to=plan.round_to,
        )
        if self.needs_calibration:
            if calib_batches is None:
                raise ValueError(f"method {self.name} is data-driven and needs calibration batches")
            self.calibrate(model, calib_batches)
        pruner.step()
        model.zero_grad(set_to_none=True)
        return PruneResult(model, pruner.pruning_history(), layer_changes(before, layer_stats(model, example_inputs)),
                           plan)


class TrainingRecorder:
    """Collects per-epoch statistics during baseline training; ``state()`` must be tensors/plain types."""

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        raise NotImplementedError

    def state(self) -> dict:
        raise NotImplementedError


def kept_channels(channels: int, ratio: float, round_to: int | None) -> int:
    """The channels a layer keeps when ``ratio`` of them go: ``channels·(1 − ratio)`` rounded to the nearest
    multiple of ``round_to`` (of 1 without it), at least one multiple, so a layer of ``round_to`` channels or
    fewer stays whole.

    Every method that decides how many channels a layer keeps uses this rule and hands Torch-Pruning the count
    (``exact_ratio``). Torch-Pruning's own ``round_to`` rounds the kept count *down* and leaves a layer whole when
    that would empty it: a 16-channel layer loses half its channels at ratio 0.1 and none at 0.6, so the MACs
    removed jump and even fall as the ratio grows. Searches and bisections need a reduction that grows with
    the ratio, which this rule gives.
    """
    step = round_to or 1
    return min(channels, max(step, step * round(channels * (1.0 - ratio) / step)))


def exact_ratio(channels: int, kept: int) -> float:
    """The ratio at which exactly ``kept`` channels stay: C·(1 − ratio) is ``kept`` and a quarter, which both
    Torch-Pruning's count (it keeps int(C·(1 − ratio))) and ``kept_channels`` (the nearest count) turn into
    ``kept``, so uniform pruning keeps what a method computed."""
    return max(0.0, (channels - kept - 0.25) / channels)


def ignored_layers(model: nn.Module) -> list[nn.Module]:
    """The stem conv and the output layer keep their channels (METHODS.md's rule for every method).

    A model can name its own list by defining ``pruneflow_ignored_layers() -> list[nn.Module]``.
    """
    custom = getattr(model, "pruneflow_ignored_layers", None)
    if callable(custom):
        return list(custom())
    layers = [module for module in model.modules() if isinstance(module, PRUNABLE)]
    return [layers[0], layers[-1]] if len(layers) > 1 else layers


def remove_blocks(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Remove the named units the model declares in ``removable_blocks()``.

    What removing means depends on how the model combines the unit, so a model that defines
    ``remove_block(name)`` removes its own (a multi-branch model drops the branch and averages over the rest).
    Otherwise the submodule is replaced by identity: right for a residual block, whose input then passes
    through. Checkpoints replay this on load (``rebuild_pruned``), so both kinds reload.
    """
    remove = getattr(model, "remove_block", None)
    for name in names:
        if callable(remove):
            remove(name)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Identity())
    return model


def rebuild_pruned(baseline: nn.Module, example_inputs: torch.Tensor, history: list,
                   removed_blocks: Iterable[str] = ()) -> nn.Module:
    """Redo block removal and replay the pruning history on a fresh baseline, so a pruned state dict fits."""
    remove_blocks(baseline, removed_blocks)
    if not history:
        return baseline
    graph = tp.DependencyGraph().build_dependency(baseline, example_inputs=example_inputs)
    graph.load_pruning_history([tuple(step) for step in history])
    return baseline
