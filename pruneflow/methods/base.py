"""The one interface every pruning method implements, and the Torch-Pruning surgery they share.

A method contributes an importance score (and optionally a sparsity regulariser for training and a
calibration pass over data); the structural removal is always Torch-Pruning's DependencyGraph, so
residual adds, concatenations and depthwise groups stay consistent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict
from torch import nn

from pruneflow.metrics import PRUNABLE, LayerChange, layer_changes, layer_stats
from pruneflow.plan import PrunePlan
from pruneflow.task import Batches
from pruneflow.training import Regularizer


class MethodUnsuitable(ValueError):
    """The method's own precondition fails on this model (cascade needs declared blocks, slimming distinct BN
    scales): a choice of method to change, not a layer Torch-Pruning cannot handle."""


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
    # Per group, the count the method asked and the count kept, with why (``prune.round_to: auto``)
    rounding: list[dict] = field(default_factory=list)

    @property
    def removed_blocks(self) -> list[str]:
        """Submodules replaced by identity (or removed by the model's ``remove_block``), before the history."""
        return self.plan.removed_blocks


class PruningMethod:
    """Subclass, set ``name``/``description``, and provide ``importance()``; register with ``@register_method``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    # The validated ``Params``; a method that reads its fields declares ``params: ItsParams`` beside ``Params``.
    params: BaseModel
    needs_calibration: ClassVar[bool] = False
    # True: one threshold over every layer's scores decides how many channels each layer keeps
    # (``global_kept_channels``); False: every layer loses the same share.
    global_pruning: ClassVar[bool] = False
    # False for mask-based methods: they zero weights but keep every channel, so dense MACs do not drop and
    # the search measures their reduction as the share of zeroed conv/linear weights instead.
    structured: ClassVar[bool] = True
    # False for methods that allocate per-layer ratios themselves (entropy allocation, masks, blocks): the
    # search then offers them the global ratio only.
    accepts_layer_ratios: ClassVar[bool] = True
    # True for methods that meet a latency budget themselves (``halp``): they get a plan with ``latency_ms`` or
    # ``speedup`` instead of a searched ratio, and ``allocate`` turns it into kept channels on the latency table.
    allocates_latency: ClassVar[bool] = False
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

    def recorder(self) -> TrainingRecorder | None:
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
        ratios: dict[nn.Module, float] = {}
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
        fixed_rounding(plan.round_to)
        before = layer_stats(model, example_inputs)
        remove_blocks(model, plan.removed_blocks)
        modules = dict(model.named_modules())
        unknown = sorted({*plan.layer_ratios, *plan.kept_channels} - set(modules))
        if unknown:
            raise ValueError(f"the plan names layers the model lacks: {', '.join(unknown)}")
        if self.needs_calibration:
            if calib_batches is None:
                raise ValueError(f"method {self.name} is data-driven and needs calibration batches")
            self.calibrate(model, calib_batches)
        if self.global_pruning:  # one threshold across groups, decided here as each group's kept count
            plan = replace(plan, kept_channels={**self.global_kept_channels(model, example_inputs, plan),
                                                **plan.kept_channels})
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs,
            importance=self.importance(),
            pruning_ratio=plan.ratio,
            pruning_ratio_dict=self.layer_ratios(model, plan),
            max_pruning_ratio=plan.max_layer_ratio,
            ignored_layers=ignored_layers(model),
            round_to=plan.round_to,
        )
        pruner.step()
        model.zero_grad(set_to_none=True)
        return PruneResult(model, pruner.pruning_history(), layer_changes(before, layer_stats(model, example_inputs)),
                           plan)

    def global_kept_channels(self, model: nn.Module, example_inputs: torch.Tensor,
                             plan: PrunePlan) -> dict[str, int]:
        """One threshold across layers, as the channels each layer group keeps (named by its root).

        The ``plan.ratio`` share of all channels with the lowest scores is marked, ties in a fixed order; each
        group loses its marked channels, at most ``max_layer_ratio`` of them and never the last one, and keeps a
        count rounded as ``kept_channels`` says. Torch-Pruning's own global pruning instead leaves a group whole
        when the threshold would empty it, so a higher ratio could remove *less* (slimming: 93 % of the MACs at
        0.56, 9 % at 0.62). Here the marked set only grows with the ratio, so every group's kept count, and the
        MACs removed, are monotone in it. Groups the plan names (``layer_ratios``, ``kept_channels``) keep their
        own setting and take no part in the ranking.
        """
        from pruneflow.methods.groups import build_graph  # groups imports this module

        graph = build_graph(model, example_inputs)
        ignored = [sub for layer in ignored_layers(model) for sub in layer.modules()]
        names = {module: name for name, module in model.named_modules()}
        importance = self.importance()
        ranked: list[tuple[str, torch.Tensor]] = []  # group name, its channels' scores
        for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE):
            name = names[group[0].dep.target.module]
            if name not in plan.layer_ratios and name not in plan.kept_channels:
                ranked.append((name, importance(group).detach().float().flatten().cpu()))
        if not ranked:
            return {}
        sizes = torch.tensor([len(scores) for _, scores in ranked])
        total = int(sizes.sum())
        order = torch.argsort(torch.cat([scores for _, scores in ranked]), stable=True)
        marked = order[:total - int(total * (1 - plan.ratio))]  # as many as Torch-Pruning's threshold would take
        owners = torch.repeat_interleave(torch.arange(len(ranked)), sizes)
        kept = {}
        taken = torch.bincount(owners[marked], minlength=len(ranked)).tolist()  # marked channels per group
        for (name, scores), count in zip(ranked, taken, strict=True):
            channels = len(scores)
            left = max(channels - count, math.ceil(channels * (1 - plan.max_layer_ratio) - 1e-9), 1)
            kept[name] = kept_channels(channels, 1.0 - left / channels, plan.round_to)
        return kept


class TrainingRecorder:
    """Collects per-epoch statistics during baseline training; ``state()`` must be tensors/plain types."""

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        raise NotImplementedError

    def state(self) -> dict:
        raise NotImplementedError


def kept_channels(channels: int, ratio: float, round_to: int | str | None) -> int:
    """The channels a layer keeps when ``ratio`` of them go: ``channels·(1 − ratio)`` rounded to the nearest
    multiple of ``round_to`` (of 1 without it), at least one multiple, so a layer of ``round_to`` channels or
    fewer stays whole.

    Every method that decides how many channels a layer keeps uses this rule and hands Torch-Pruning the count
    (``exact_ratio``). Torch-Pruning's own ``round_to`` rounds the kept count *down* and leaves a layer whole when
    that would empty it: a 16-channel layer loses half its channels at ratio 0.1 and none at 0.6, so the MACs
    removed jump and even fall as the ratio grows. Searches and bisections need a reduction that grows with
    the ratio, which this rule gives.
    """
    step = fixed_rounding(round_to) or 1
    return min(channels, max(step, step * round(channels * (1.0 - ratio) / step)))


def fixed_rounding(round_to: int | str | None) -> int | None:
    """``round_to`` as a multiple; ``auto`` is not one: the prune stage resolves it to kept channels first."""
    if round_to is None or isinstance(round_to, int):
        return round_to
    raise ValueError(f"round_to {round_to!r} is resolved to kept channels before pruning "
                     "(pruneflow.latency.rounding.step_rounded), not by the method")


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
    layers: list[nn.Module] = [module for module in model.modules() if isinstance(module, PRUNABLE)]
    return [layers[0], layers[-1]] if len(layers) > 1 else layers


def remove_blocks(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Remove the named blocks (``blocks.removable_blocks``: residual blocks, or units the model declares).

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
