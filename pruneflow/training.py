"""The one training loop (baseline, search fine-tunes and retraining all use it) and evaluation, for every task.

The loss and the metrics are those of the batches' task (``pruneflow.task.task_of``): cross-entropy and accuracy
for class labels, MSE and PSNR/SSIM for super-resolution images.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from pruneflow.config import TrainConfig
from pruneflow.task import Batches, mean_scores, task_of

Regularizer = Callable[[nn.Module], torch.Tensor]  # a sparsity term added to the loss (pruning methods give them)


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_metric: float | None  # the task's main metric on the validation batches (accuracy %, PSNR dB)
    seconds: float


def train(model: nn.Module, batches: Batches, cfg: TrainConfig, *, val_batches: Batches | None = None,
          regularizers: Iterable[Regularizer] = (), on_epoch_end: Callable[[EpochResult], None] | None = None,
          ) -> list[EpochResult]:
    """SGD with momentum (or Adam) and a cosine (or constant) learning rate; regularisers add sparsity terms to the
    loss, which is the task's (cross-entropy for labels, MSE for images).

    ``on_epoch_end`` sees each epoch's result: it reports progress, records training-time statistics,
    or raises to stop (the search uses that to prune hopeless trials). Training runs on ``cfg.device``;
    the model always comes back on the CPU, where pruning, checkpoints and export expect it.
    """
    history = []
    with contextlib.closing(train_epochs(model, batches, cfg, val_batches=val_batches,
                                         regularizers=regularizers)) as epochs:
        for result in epochs:
            history.append(result)
            if on_epoch_end:
                on_epoch_end(result)
    return history


def train_epochs(model: nn.Module, batches: Batches, cfg: TrainConfig, *, val_batches: Batches | None = None,
                 regularizers: Iterable[Regularizer] = ()) -> Iterator[EpochResult]:
    """``train``, one epoch per step of the iterator, so that a caller can interleave the training of several
    models (benchmarks time them in turn). The model is on ``cfg.device`` until the iterator ends or is closed."""
    regularizers = list(regularizers)
    device = resolve_device(cfg.device)
    model.to(device)
    try:
        if cfg.optimizer == "adam":
            optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                        weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
        steps = max(1, cfg.epochs * len(batches))  # type: ignore[arg-type]
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, (lambda step: 1.0) if cfg.schedule == "constant" else
            (lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))))
        loss_of = task_of(batches).loss
        for epoch in range(1, cfg.epochs + 1):
            start, total, count = time.perf_counter(), 0.0, 0
            model.train()
            for images, labels in batches:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                loss = loss_of(model(images), labels)
                for regularizer in regularizers:
                    loss = loss + regularizer(model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(labels)
                count += len(labels)
            val_metric = evaluate(model, val_batches) if val_batches is not None else None
            yield EpochResult(epoch, total / max(count, 1), val_metric, time.perf_counter() - start)
    finally:
        model.to("cpu")
        model.eval()


def resolve_device(name: str) -> torch.device:
    """``auto`` picks a CUDA GPU when one is visible; asking for ``cuda`` without one is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but torch sees no CUDA GPU (use 'auto' or 'cpu')")
    return torch.device(name)


@torch.no_grad()
def evaluate_all(model: nn.Module, batches: Batches) -> dict[str, float]:
    """Every metric of the batches' task (accuracy; or PSNR and SSIM), on whichever device the model is on."""
    model.eval()
    device = next(model.parameters()).device
    return mean_scores(batches, lambda inputs: model(inputs.to(device, non_blocking=True)))


def evaluate(model: nn.Module, batches: Batches) -> float:
    """The task's main metric: top-1 accuracy in percent, or PSNR in dB (NaN without batches)."""
    return next(iter(evaluate_all(model, batches).values()), float("nan"))
