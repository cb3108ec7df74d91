"""Sanity gates: the checks a stage's result must pass before anything is cached, logged as done or registered.

Each gate raises ``GateError`` with one line that names what is wrong and what to change. Without them the
pipeline could finish "successfully" on a baseline trained on zero images, on NaN weights, on one class, or
with a pruning step that removed nothing, and register that model as the champion.

The rules:

- data: the training split holds at least ``MIN_TRAIN_IMAGES`` images (one batch of two: BatchNorm cannot
  train on one), and a classifier's at least two classes;
- training: every batch's loss is finite and every weight and buffer is finite after training
  (``pruneflow.training.train``, which every baseline, fine-tune and retraining goes through);
- learning: a trained classifier scores on its own training images more than three standard errors above
  the majority share, the accuracy of always answering the most common class (``check_learned``);
- pruning: a pruning step asked to remove something removes something (``check_removed``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from pruneflow.metrics import zero_weight_share

if TYPE_CHECKING:
    from pruneflow.config import DataConfig
    from pruneflow.data import DataSplits
    from pruneflow.methods import PruneResult
    from pruneflow.plan import PrunePlan

MIN_TRAIN_IMAGES = 2
CHANCE_SAMPLE = 2048  # training images the learning gate scores: enough for a 3-sigma margin of about 2 points
CHANCE_SIGMAS = 3.0


class GateError(ValueError):
    """A stage's result that must not go further: a broken model, an empty split, a step that did nothing."""


def check_training_split(splits: DataSplits, data: DataConfig) -> None:
    """Enough training images (and classes) to train on, or a GateError naming the data keys to change."""
    images = len(splits.train)
    if images < MIN_TRAIN_IMAGES:
        held = f"data.val_fraction={data.val_fraction:g} of them hold out {len(splits.val)} for validation"
        subset = f"data.subset={data.subset} keeps only {data.subset} image(s) and " if data.subset else ""
        raise GateError(f"the training split holds {images} image(s), less than one batch of "
                        f"{MIN_TRAIN_IMAGES} ({subset}{held}): use more images (data.subset, data.path) or a smaller "
                        "data.val_fraction")
    if splits.task != "classification":
        return
    if len(splits.classes) < 2:
        raise GateError(f"the dataset has one class ({splits.classes[0]}): a classifier needs at least two "
                        "class folders")
    present = torch.unique(splits.train.labels).tolist()
    if len(present) < 2:
        raise GateError(f"the training split holds images of one class only ({splits.classes[present[0]]}): "
                        "a classifier needs at least two; use more images (data.subset)")


def check_finite_loss(loss: float, epoch: int, batch: int, lr: float) -> None:
    if not math.isfinite(loss):
        raise GateError(f"training diverged: the loss is {loss} at epoch {epoch}, batch {batch} (lr {lr:g}); lower "
                        "the learning rate (train.lr for the baseline, retrain.lr for fine-tuning)")


def check_finite_weights(model: nn.Module, lr: float) -> None:
    broken = [name for name, tensor in model.state_dict().items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        total = sum(1 for tensor in model.state_dict().values() if tensor.is_floating_point())
        raise GateError(f"training diverged: {len(broken)} of {total} weight tensors hold NaN or Inf ({broken[0]}, "
                        f"...) (lr {lr:g}); lower the learning rate (train.lr for the baseline, retrain.lr for "
                        "fine-tuning)")


@torch.no_grad()
def check_learned(model: nn.Module, splits: DataSplits, what: str, remedy: str) -> None:
    """Fail a trained classifier that is no better than chance on its own training images.

    Chance is the majority share p: the accuracy of always answering the training split's most common class,
    which is what a net that diverged, collapsed onto one class or never trained scores. The model passes when
    its accuracy on (up to ``CHANCE_SAMPLE`` of) those images exceeds p + 3·sqrt(p(1 − p)/n): a model at chance
    level falls below that bound 99.9 % of the time. Super-resolution models have no chance level; the
    finite-loss and finite-weight gates cover them.
    """
    if splits.task != "classification":
        return
    images = splits.loader("train", 256, max_batches=math.ceil(CHANCE_SAMPLE / 256))
    correct = count = 0
    counts = torch.zeros(len(splits.classes))
    model.eval()
    for inputs, labels in images:
        correct += int((model(inputs).argmax(dim=1) == labels).sum())
        count += len(labels)
        counts += torch.bincount(labels, minlength=len(splits.classes))
    majority = float(counts.max()) / count
    bound = majority + CHANCE_SIGMAS * math.sqrt(majority * (1 - majority) / count)
    accuracy = correct / count
    if accuracy <= bound:
        raise GateError(f"{what} scores {100 * accuracy:.1f} % on {count} of its own training images, no better than "
                        f"chance (always answering the most common class scores {100 * majority:.1f} %; needed "
                        f"> {100 * bound:.1f} %): {remedy}")


def check_removed(method: str, structured: bool, plan: PrunePlan, result: PruneResult,
                  keys: tuple[str, str] = ("prune.ratio", "prune.round_to")) -> None:
    """Fail a pruning step that was asked for a reduction and removed nothing: no channel, no block, or (for a
    mask method, ``structured`` False) no weight. ``keys`` name the ratio and rounding settings the way the
    caller's user sets them (params keys, or ``pruneflow prune``'s options)."""
    asked = (plan.ratio > 0 or any(ratio > 0 for ratio in plan.layer_ratios.values()) or bool(plan.macs_reduction)
             or bool(plan.removed_blocks))
    changed = (result.removed_blocks or any(layer.channels_after < layer.channels_before for layer in result.layers)
               or (not structured and zero_weight_share(result.model) > 0))
    if not asked or changed:
        return
    from pruneflow.methods.base import kept_channels  # the methods import training, which imports this module

    ratio_key, round_key = keys
    inner = [layer.channels_before for layer in result.layers[1:-1]]  # the stem and the output layer stay whole
    widest = max(inner, default=0)
    # auto is no multiple: the prune stage pruned at the asked counts, then moved them to latency step edges
    step = plan.round_to if isinstance(plan.round_to, int) else None
    if step and step >= widest:
        why = (f"{round_key}={plan.round_to} is not below any prunable layer's channel count (the widest has "
               f"{widest}), so no layer can keep a smaller multiple of it; lower {round_key}")
    elif not any(kept_channels(channels, plan.ratio, step) < channels for channels in inner):
        why = (f"at this ratio every layer keeps its full width once kept channels are rounded to the nearest "
               f"multiple of {step or 1}; raise {ratio_key} or lower {round_key}")
    elif plan.round_to == "auto":
        why = (f"at this ratio every layer keeps its full width once its kept count is raised to a multiple of the "
               f"runtime's channel block at a step edge of its latency curve ({round_key}: auto); raise {ratio_key} "
               f"or set {round_key} to a smaller multiple such as 4")
    else:
        why = ("Torch-Pruning found no channel it could remove: the layers feed an operation its dependency graph "
               "cannot follow, or the method scored every channel equally")
    macs = sum(layer.macs_before for layer in result.layers)
    raise GateError(f"{method} at ratio {plan.ratio:g} removed nothing ({macs} MACs before and after): {why}")
