"""The one training loop (baseline, search fine-tunes and retraining all use it) and evaluation, for every task.

The loss and the metrics are those of the batches' task (``pruneflow.task.task_of``): cross-entropy and accuracy
for class labels, MSE and PSNR/SSIM for super-resolution images. Retraining a pruned net may also learn from
the baseline's outputs (``Distillation``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pruneflow import gates
from pruneflow.config import DistillConfig, TrainConfig
from pruneflow.task import CLASSIFICATION, Batches, Task, mean_scores, task_of

Regularizer = Callable[[nn.Module], torch.Tensor]  # a sparsity term added to the loss (pruning methods give them)


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_metric: float | None  # the task's main metric on the validation batches (accuracy %, PSNR dB)
    seconds: float

    @property
    def val_score(self) -> float:
        """``val_metric`` of an epoch trained with validation batches; asking it of one without is a bug."""
        if self.val_metric is None:
            raise ValueError(f"epoch {self.epoch} ran without validation batches: it has no val_metric")
        return self.val_metric


@dataclass
class Distillation:
    """A teacher whose outputs the trained net learns from, as ``weight`` of the loss (the labels give the rest).

    Classification: Hinton et al. 2015's KD term, T²·KL(softmax(teacher/T) ‖ softmax(student/T)) — the soft
    targets carry how the teacher ranks the wrong classes, and T² keeps the term's gradients at the scale of the
    cross-entropy's. Super-resolution has no class probabilities to soften: the term is the MSE between the
    student's and the teacher's output images (temperature unused), which pulls the pruned net towards what the
    baseline reconstructs where the ground truth alone is a harder target.
    """

    teacher: nn.Module
    weight: float
    temperature: float = 4.0

    def loss(self, task: Task, outputs: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of one batch: (1 − weight)·the task's loss on the targets + weight·the teacher term."""
        with torch.no_grad():
            taught = self.teacher(inputs)
        if task is CLASSIFICATION:
            t = self.temperature
            term = F.kl_div(F.log_softmax(outputs / t, dim=1), F.log_softmax(taught / t, dim=1), reduction="batchmean",
                            log_target=True) * t * t
        else:
            term = F.mse_loss(outputs, taught)
        return (1 - self.weight) * task.loss(outputs, targets) + self.weight * term


def distillation(cfg: DistillConfig, teacher: nn.Module | None) -> Distillation | None:
    """What ``train`` needs for ``retrain.distill``: None when it is off; the teacher (the baseline) is required
    when it is on."""
    if cfg.weight == 0:
        return None
    if teacher is None:
        raise ValueError(f"retrain.distill.weight is {cfg.weight:g} but no teacher was given: distillation needs the "
                         "baseline model")
    return Distillation(teacher, cfg.weight, cfg.temperature)


def train(model: nn.Module, batches: Batches, cfg: TrainConfig, *, val_batches: Batches | None = None,
          regularizers: Iterable[Regularizer] = (), on_epoch_end: Callable[[EpochResult], None] | None = None,
          distill: Distillation | None = None) -> list[EpochResult]:
    """SGD with momentum (or Adam) and a cosine (or constant) learning rate; regularisers add sparsity terms to the
    loss, which is the task's (cross-entropy for labels, MSE for images), mixed with a teacher's term by ``distill``.

    ``on_epoch_end`` sees each epoch's result: it reports progress, records training-time statistics,
    or raises to stop (the search uses that to prune hopeless trials). Training runs on ``cfg.device`` (the
    teacher too, in eval mode); the models always come back on the CPU, where pruning, checkpoints and export
    expect them.

    A loss or a weight that is NaN or infinite raises ``gates.GateError`` (the run diverged): nothing trained
    here goes on to be saved, pruned or exported with broken weights.
    """
    history = []
    with contextlib.closing(train_epochs(model, batches, cfg, val_batches=val_batches, regularizers=regularizers,
                                         distill=distill)) as epochs:
        for result in epochs:
            history.append(result)
            if on_epoch_end:
                on_epoch_end(result)
    return history


def train_epochs(model: nn.Module, batches: Batches, cfg: TrainConfig, *, val_batches: Batches | None = None,
                 regularizers: Iterable[Regularizer] = (), distill: Distillation | None = None,
                 ) -> Generator[EpochResult, None, None]:
    """``train``, one epoch per step of the iterator, so that a caller can interleave the training of several
    models (benchmarks time them in turn). The models are on ``cfg.device`` until the iterator ends or is closed;
    the weights are checked for NaN/Inf when it ends."""
    regularizers = list(regularizers)
    device = resolve_device(cfg.device)
    model.to(device)
    if distill is not None:
        distill.teacher.to(device).eval()
    try:
        optimizer: torch.optim.Optimizer
        if cfg.optimizer == "adam":
            optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                        weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
        steps = max(1, cfg.epochs * len(batches))  # type: ignore[arg-type]
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, (lambda step: 1.0) if cfg.schedule == "constant" else
            (lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))))
        task = task_of(batches)
        for epoch in range(1, cfg.epochs + 1):
            start, total, count = time.perf_counter(), 0.0, 0
            model.train()
            for batch, (images, labels) in enumerate(batches, 1):
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                outputs = model(images)
                loss = distill.loss(task, outputs, images, labels) if distill else task.loss(outputs, labels)
                for regularizer in regularizers:
                    loss = loss + regularizer(model)
                value = loss.item()
                gates.check_finite_loss(value, epoch, batch, cfg.lr)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += value * len(labels)
                count += len(labels)
            val_metric = evaluate(model, val_batches) if val_batches is not None else None
            yield EpochResult(epoch, total / max(count, 1), val_metric, time.perf_counter() - start)
        gates.check_finite_weights(model, cfg.lr)
    finally:
        model.to("cpu")
        model.eval()
        if distill is not None:
            distill.teacher.to("cpu")


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
