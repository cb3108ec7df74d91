"""What a model is trained for (params' ``task``): its loss, its metrics and which of them is the main one.

``classification``: cross-entropy on integer labels, top-1 accuracy in percent.
``super_resolution``: MSE against the high-resolution image, PSNR (dB) on Y as the main metric and SSIM
beside it (``pruneflow.image_quality``).

The main metric is what the search maximises, what ``<metric>_drop`` compares against the baseline and
what the tables lead with. The training loop and evaluation pick the task from the targets a batch carries
(``task_of``): class labels are integers, images are floats. So the baseline, the search's fine-tunes,
retraining and the methods' own recipes (grafting, calibration losses) all use the right loss without
the task being threaded through every call, and a loader can never be trained with the wrong one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from pruneflow.image_quality import psnr_y, ssim_y

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (inputs, targets) pairs: a loader, or a plain list
Scores = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


@dataclass(frozen=True)
class Task:
    name: str
    metrics: tuple[str, ...]  # the first is the main metric
    unit: str  # how the main metric reads in logs
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scores: Scores  # (outputs, targets) -> each metric summed over the batch's samples, in ``metrics`` order

    @property
    def metric(self) -> str:
        return self.metrics[0]

    @property
    def drop(self) -> str:
        """The metric name of ``baseline − pruned`` for the main metric."""
        return f"{self.metric}_drop"


def _accuracy_sums(outputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"accuracy": 100.0 * (outputs.argmax(dim=1) == labels).sum().item()}


def _image_sums(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    return {"psnr": psnr_y(outputs, targets).sum().item(), "ssim": ssim_y(outputs, targets).sum().item()}


CLASSIFICATION = Task("classification", ("accuracy",), "%", F.cross_entropy, _accuracy_sums)
SUPER_RESOLUTION = Task("super_resolution", ("psnr", "ssim"), "dB", F.mse_loss, _image_sums)
TASKS = {task.name: task for task in (CLASSIFICATION, SUPER_RESOLUTION)}


def task_of(targets: torch.Tensor) -> Task:
    """The task a batch's targets belong to: float images → super-resolution, integer labels → classification."""
    return SUPER_RESOLUTION if targets.is_floating_point() else CLASSIFICATION


def mean_scores(batches: Batches, predict: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Every metric of the task, averaged over all samples of ``batches``, the main metric first; ``predict``
    maps inputs to outputs (a PyTorch model, or an exported file run the way it is deployed)."""
    sums: dict[str, float] = {}
    count = 0
    for inputs, targets in batches:
        outputs = predict(inputs)
        for name, value in task_of(targets).scores(outputs, targets.to(outputs.device)).items():
            sums[name] = sums.get(name, 0.0) + value
        count += len(targets)
    return {name: value / max(count, 1) for name, value in sums.items()}
