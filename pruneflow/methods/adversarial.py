"""``adversarial``: adversarial architecture selection (Wei 2023, AMAS; after GAL, Lin et al. 2019).

[public] The teacher is the model before pruning, frozen. The student is a copy whose channels are scaled
by learnable soft masks m ≥ 0 on the BatchNorm outputs; a small MLP discriminator D tells the teacher's
logits from the student's. The masks minimise MSE(teacher, student logits) + BCE(D(student), 1) + λ·‖m‖₁,
the L1 term through its proximal step m ← max(0, m − lr·λ) after each gradient step, while D minimises
BCE(D(teacher), 1) + BCE(D(student), 0). Channels whose mask reaches 0 are removed through Torch-Pruning.

[ours] What this implementation decides (knobs in ``AdversarialParams``):
- One mask per channel group (groups.py) scales every BatchNorm over the group's channels, so a zero mask
  silences the channel wherever it appears (residual stages included) and removing it changes nothing.
  Groups without BatchNorm keep their channels.
- The student's weights stay frozen (BatchNorm in eval mode): only the masks and D learn, for ``epochs``
  passes over the calibration batches. (GAL trains the weights too.) The masks *select* the architecture:
  dead channels go, survivors keep the teacher's weights unscaled. Folding the soft survivors into the
  BatchNorms instead (γ, β ← m·γ, m·β) would scale frozen weights that were never co-adapted to the shrunken
  masks, and residual adds would mix scaled with unscaled paths (docs/benchmarks/cifar10-methods.md).
- The MSE is summed over the classes (averaged over the batch), and each mask's gradient is clamped to
  ±``max_grad`` (1) before its step, with masks kept in [0, 1]: unclamped, the summed MSE can diverge.
  Clamped, a mask dies when the loss's pull on it stays below λ, so λ ∈ (0, 1) is a threshold on the
  channel's importance. A non-finite loss stops the method with an error naming ``mask_lr``.
- Where the ratio target enters: a layer loses the share of its channels whose masks died, at most
  ``plan.ratio`` (and ``max_layer_ratio``), so the search's ratio still caps the cut. The count kept is
  rounded as every method rounds it (``base.kept_channels``), so rounding may keep a dead channel or remove
  the live one with the lowest mask.
- Selection: one candidate per λ in ``lambdas``; each is fine-tuned for ``finetune_epochs`` on all
  calibration batches but the last and scored on the last (on all of them when there is only one). The
  candidate that removes the most channels with accuracy ≥ the teacher's − δ wins, else the most accurate.
  The model returned is the winner pruned *without* that brief fine-tune: the retrain stage does the real one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pruneflow import training
from pruneflow.config import TrainConfig
from pruneflow.methods import register_method
from pruneflow.methods.base import Batches, PruneResult, PruningMethod, exact_ratio, kept_channels
from pruneflow.methods.groups import ChannelGroup, Member, ScoreImportance, channel_groups
from pruneflow.plan import PrunePlan

LabelledBatches = list[tuple[torch.Tensor, torch.Tensor]]


class AdversarialParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(40, ge=1, description="passes over the calibration batches while the masks learn")
    mask_lr: float = Field(0.05, gt=0, description="step size of the masks' proximal gradient steps")
    disc_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the discriminator")
    lambdas: list[float] = Field([0.4, 0.6, 0.8, 1.0], min_length=1, description="λ grid, one candidate each")
    delta: float = Field(0.5, ge=0, description="accuracy points a candidate may lose against the teacher")
    finetune_epochs: int = Field(1, ge=0, description="brief fine-tune of each candidate before it is scored")
    finetune_lr: float = Field(0.01, gt=0)
    max_grad: float = Field(1.0, gt=0, description="each mask's gradient is clamped to ±max_grad before its step")


@dataclass
class Candidate:
    strength: float  # λ
    masks: list[torch.Tensor]
    removed: int  # channels
    accuracy: float


def norm_mask(mask: torch.Tensor, norm: Member) -> torch.Tensor:
    """The group mask in the order of one BatchNorm's channels."""
    order = torch.empty(len(norm.idxs), dtype=torch.long)
    order[torch.tensor(norm.idxs)] = torch.tensor(norm.root_idxs)
    return mask[order]


def scale_outputs(mask: torch.Tensor, norm: Member):
    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return output * norm_mask(mask, norm).view(1, -1, *([1] * (output.dim() - 2)))
    return hook


class MasksDiverged(RuntimeError):
    """The mask updates produced NaN/inf: the step is too large for this model."""


def learn_masks(model: nn.Module, groups: list[ChannelGroup], batches: LabelledBatches, strength: float,
                params: AdversarialParams) -> list[torch.Tensor]:
    """Soft channel masks of a frozen copy of ``model``, trained against the teacher logits in ``batches``."""
    student = copy.deepcopy(model).eval().requires_grad_(False)
    masks = [torch.ones(group.channels, requires_grad=True) for group in groups]
    for group, mask in zip(groups, masks, strict=True):
        for norm in group.norms:
            student.get_submodule(norm.name).register_forward_hook(scale_outputs(mask, norm))
    critic = nn.Sequential(nn.Linear(batches[0][1].shape[1], 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=params.disc_lr)
    mask_optimizer = torch.optim.SGD(masks, lr=params.mask_lr)
    bce = nn.BCEWithLogitsLoss()
    for _ in range(params.epochs):
        for images, teacher in batches:
            real, fake = torch.ones(len(images), 1), torch.zeros(len(images), 1)
            student_logits = student(images)
            critic_loss = bce(critic(teacher), real) + bce(critic(student_logits.detach()), fake)
            critic_optimizer.zero_grad()
            critic_loss.backward()
            critic_optimizer.step()
            loss = (student_logits - teacher).pow(2).sum(1).mean() + bce(critic(student_logits), real)
            mask_optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_value_(masks, params.max_grad)
            mask_optimizer.step()
            with torch.no_grad():
                for mask in masks:
                    mask.sub_(params.mask_lr * strength).clamp_(0, 1)  # proximal step of λ‖m‖₁, 0 ≤ m ≤ 1
            if not torch.isfinite(loss):
                raise MasksDiverged(f"adversarial: the mask loss became {loss.item()} at λ={strength:g}; "
                                    f"lower methods.adversarial.mask_lr (now {params.mask_lr:g})")
    return [mask.detach() for mask in masks]


@register_method
class Adversarial(PruningMethod):
    name = "adversarial"
    accepts_layer_ratios = False
    tasks = ("classification",)  # the discriminator reads class logits
    description = "soft channel masks learnt against the frozen model with a discriminator, λ-grid selection (AMAS)"
    Params = AdversarialParams
    params: AdversarialParams
    needs_calibration = True

    def __init__(self, params: BaseModel | dict | None = None) -> None:
        super().__init__(params)
        self.scorer = ScoreImportance()  # the masks of the candidate being pruned

    def importance(self) -> tp.importance.Importance:
        return self.scorer

    def kept(self, groups: list[ChannelGroup], masks: list[torch.Tensor], plan: PrunePlan) -> list[int]:
        """Channels each group keeps: the dead ones go, at most the target's share of the group."""
        cap = min(plan.ratio, plan.max_layer_ratio)
        return [kept_channels(group.channels, min(int((mask == 0).sum()) / group.channels, cap), plan.round_to)
                for group, mask in zip(groups, masks, strict=True)]

    def apply(self, model: nn.Module, example_inputs: torch.Tensor, plan: PrunePlan, groups: list[ChannelGroup],
              masks: list[torch.Tensor], batches: LabelledBatches) -> tuple[PruneResult, int]:
        """Prune ``model`` in place, lowest masks first; also returns the number of channels removed."""
        kept = self.kept(groups, masks, plan)
        self.scorer.scores = {model.get_submodule(group.name): mask for group, mask in zip(groups, masks, strict=True)}
        ratios = {group.name: exact_ratio(group.channels, count) for group, count in zip(groups, kept, strict=True)}
        result = super().prune(model, example_inputs, replace(plan, layer_ratios=ratios), batches)
        return result, sum(group.channels - count for group, count in zip(groups, kept, strict=True))

    def prune(self, model: nn.Module, example_inputs: torch.Tensor, plan: PrunePlan,
              calib_batches: Batches | None = None) -> PruneResult:
        batches = list(calib_batches or [])
        if not batches:
            raise ValueError(f"method {self.name} learns its masks on data and needs calibration batches")
        fit, held = (batches[:-1], batches[-1:]) if len(batches) > 1 else (batches, batches)
        model.eval()
        with torch.no_grad():
            soft_targets = [(images, model(images)) for images, _ in fit]
        baseline = training.evaluate(model, held)
        groups = [group for group in channel_groups(model, example_inputs)
                  if group.norms and all(norm.module.affine for norm in group.norms)]
        finetune = TrainConfig(epochs=self.params.finetune_epochs, lr=self.params.finetune_lr)
        candidates = []
        for strength in self.params.lambdas:
            masks = learn_masks(model, groups, soft_targets, strength, self.params)
            trial = copy.deepcopy(model)
            _, removed = self.apply(trial, example_inputs, plan, groups, masks, batches)
            training.train(trial, fit, finetune)
            candidates.append(Candidate(strength, masks, removed, training.evaluate(trial, held)))
        good = [c for c in candidates if c.accuracy >= baseline - self.params.delta]
        best = max(good, key=lambda c: (c.removed, c.accuracy)) if good else max(candidates, key=lambda c: c.accuracy)
        result, _ = self.apply(model, example_inputs, plan, groups, best.masks, batches)
        tried = ", ".join(f"λ={c.strength:g} removes {c.removed} channels at {c.accuracy:.2f}" for c in candidates)
        result.notes = (f"teacher accuracy {baseline:.2f} on the held-out calibration batch; candidates: {tried}; "
                        f"chose λ={best.strength:g}")
        return result
