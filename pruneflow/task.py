"""What a model is trained for (params' ``task``): its loss, its metrics, which of them is the main one, and what
the data fixes in its model.

``classification``: cross-entropy on integer labels, top-1 accuracy in percent; the model gets ``num_classes``.
``super_resolution``: MSE against the high-resolution image, PSNR (dB) on Y as the main metric and SSIM
beside it (``pruneflow.image_quality``); the model gets ``upscale_factor``.

The main metric is what the search maximises, what ``<metric>_drop`` compares against the baseline and
what the tables lead with. The training loop, evaluation and the methods' own recipes (grafting,
calibration losses) ask the batches they are given for their task (``task_of``): every pruneflow loader
knows it, so a loader is never trained with the wrong loss and the task need not be threaded through
every call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

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
    model_argument: str  # what the data fixes in a model of this task (see ``pruneflow.models``)

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


CLASSIFICATION = Task("classification", ("accuracy",), "%", F.cross_entropy, _accuracy_sums, "num_classes")
SUPER_RESOLUTION = Task("super_resolution", ("psnr", "ssim"), "dB", F.mse_loss, _image_sums, "upscale_factor")
TASKS = {task.name: task for task in (CLASSIFICATION, SUPER_RESOLUTION)}


def task_of(batches: Batches) -> Task:
    """The task ``batches`` serve. A pruneflow loader says it (``loader.task``); a plain list of (inputs, targets)
    pairs, as a library caller may pass, is told by its targets: class labels are integers, images are floats."""
    task = getattr(batches, "task", None)
    if task is not None:
        return task
    if not isinstance(batches, Sequence):
        raise TypeError(f"cannot tell the task of a {type(batches).__name__}: pass a pruneflow loader or a list of "
                        "(inputs, targets) pairs")
    if not batches:
        return CLASSIFICATION  # nothing to score or train on: either task does nothing
    return SUPER_RESOLUTION if batches[0][1].is_floating_point() else CLASSIFICATION


def mean_scores(batches: Batches, predict: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Every metric of the task, averaged over all samples of ``batches``, the main metric first; ``predict``
    maps inputs to outputs (a PyTorch model, or an exported file run the way it is deployed)."""
    task = task_of(batches)
    sums: dict[str, float] = {}
    count = 0
    for inputs, targets in batches:
        outputs = predict(inputs)
        for name, value in task.scores(outputs, targets.to(outputs.device)).items():
            sums[name] = sums.get(name, 0.0) + value
        count += len(targets)
    return {name: value / max(count, 1) for name, value in sums.items()}
