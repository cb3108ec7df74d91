"""The one training loop (baseline, search fine-tunes and retraining all use it) and accuracy evaluation."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from pruneflow.config import TrainConfig
from pruneflow.methods.base import Regularizer

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_accuracy: float | None
    seconds: float


def train(model: nn.Module, batches: Batches, cfg: TrainConfig, *, val_batches: Batches | None = None,
          regularizers: Iterable[Regularizer] = (), on_epoch_end: Callable[[EpochResult], None] | None = None,
          ) -> list[EpochResult]:
    """SGD with momentum and a cosine learning-rate schedule; regularisers add sparsity terms to the loss.

    ``on_epoch_end`` sees each epoch's result: it reports progress, records training-time statistics,
    or raises to stop (the search uses that to prune hopeless trials).
    """
    regularizers = list(regularizers)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                nesterov=cfg.momentum > 0)
    steps = max(1, cfg.epochs * len(batches))  # type: ignore[arg-type]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    loss_fn = nn.CrossEntropyLoss()
    history = []
    for epoch in range(1, cfg.epochs + 1):
        start, total, count = time.perf_counter(), 0.0, 0
        model.train()
        for images, labels in batches:
            loss = loss_fn(model(images), labels)
            for regularizer in regularizers:
                loss = loss + regularizer(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(labels)
            count += len(labels)
        val_accuracy = evaluate(model, val_batches) if val_batches is not None else None
        result = EpochResult(epoch, total / max(count, 1), val_accuracy, time.perf_counter() - start)
        history.append(result)
        if on_epoch_end:
            on_epoch_end(result)
    model.eval()
    return history


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = total = 0
    for images, labels in batches:
        correct += (model(images).argmax(dim=1) == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / max(total, 1)
