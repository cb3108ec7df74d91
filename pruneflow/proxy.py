"""Judging a pruned candidate without fine-tuning it: adaptive BatchNorm (Li et al., EagleEye, ECCV 2020).

Pruning removes channels from every layer's input, so the BatchNorm running statistics the baseline learnt no
longer describe the activations the pruned net produces: scored as it is, a candidate is judged mostly by how
stale its statistics are, which EagleEye shows says little about the accuracy it reaches after fine-tuning.
Re-estimating them on a few training batches — forward passes only, no gradient step — removes that error, and
the score after it ranks candidates well for a fraction of one fine-tuning epoch's cost, so a search can judge
hundreds. Models without BatchNorm (ESPCN) have nothing to recalibrate: their score is the plain one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pruneflow.task import Batches
from pruneflow.training import evaluate


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Batches) -> int:
    """Replace every BatchNorm's running mean and variance by their average over ``batches``; return how many
    layers were recalibrated.

    The statistics are reset and accumulated as a cumulative average (``momentum=None``), so each batch counts
    once whatever the count, and no trace of the baseline's statistics is left. Only the BatchNorm layers run in
    training mode: dropout and every other layer stay in eval mode, so nothing but the BN buffers changes and the
    result depends only on the batches.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    was_training, momenta = model.training, [norm.momentum for norm in norms]
    device = next(model.parameters()).device
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    seen = 0
    try:
        for images, _ in batches:
            model(images.to(device))
            seen += 1
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)
    if not seen:
        raise ValueError("adaptive BN got no batches to recalibrate BatchNorm statistics on")
    return len(norms)


def adaptive_bn_score(model: nn.Module, calib_batches: Batches, val_batches: Batches) -> float:
    """The task's main metric on ``val_batches`` after ``recalibrate_batchnorm`` on ``calib_batches`` (training
    images, without augmentation so that every candidate sees the same pixels)."""
    recalibrate_batchnorm(model, calib_batches)
    return evaluate(model, val_batches)
