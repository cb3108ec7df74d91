"""``apoz``: Network Trimming (Hu et al. 2016) — channels whose ReLU output is mostly zero go first.

APoZ_c is the share of zeros in channel c's post-ReLU output over N calibration batches; a channel that
rarely fires carries little to the next layer, so importance is 1 − APoZ and each layer loses the same
share of channels (the paper's alternative, a mean + std threshold per layer, is not implemented).

How the post-ReLU output is found is ours (the paper prunes plain VGG-style nets): Torch-Pruning's
dependency graph names, within each group, the module whose output feeds a ReLU (the BatchNorm in
conv-BN-ReLU, the conv itself in conv-ReLU). Every conv/linear/BatchNorm is hooked during calibration and
relu(output) is counted for it; a group scores its channels by the modules that really feed a ReLU. A
group with no such module — a residual sum that is activated only after the add, a linear bottleneck —
has no APoZ and is left unpruned.
"""

from __future__ import annotations

import itertools

import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch_pruning.dependency import Group

from pruneflow.methods import register_method
from pruneflow.methods.base import Batches, PruningMethod

RECORDED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


@torch.no_grad()
def record_apoz(model: nn.Module, batches: Batches) -> dict[nn.Module, torch.Tensor]:
    """Per conv/linear/BatchNorm module, the share of each output channel that a ReLU would zero.

    Runs in eval mode (BatchNorm with its running statistics, as at inference); the hook reads the output
    before an in-place ReLU overwrites it, so relu(x) == 0 is counted as x <= 0.
    """
    zeros: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
        channel_dim = -1 if isinstance(module, nn.Linear) else 1
        dead = (output <= 0).movedim(channel_dim, 0).flatten(1)
        zeros[module] = zeros.get(module, 0) + dead.sum(1)
        counts[module] = counts.get(module, 0) + dead.shape[1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, RECORDED)]
    was_training = model.training
    model.eval()
    try:
        for images, _ in batches:
            model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {module: zeros[module].double() / counts[module] for module in zeros}


# Torch-Pruning names element-wise ops by their autograd function; ReLU6 (MobileNetV2) traces as Hardtanh.
# Our models use Hardtanh only as ReLU6, which zeroes exactly what ReLU zeroes.
RELU_GRAD_FNS = ("ReluBackward", "HardtanhBackward")


def is_relu(node) -> bool:
    """Whether a dependency-graph node is a ReLU or ReLU6."""
    return isinstance(node.module, tp.ops._ElementWiseOp) and node.module._grad_fn.startswith(RELU_GRAD_FNS)


class APoZImportance(tp.importance.Importance):
    """1 − APoZ per channel of a group, averaged over the group's modules that feed a ReLU."""

    def __init__(self) -> None:
        self.apoz: dict[nn.Module, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, group: Group) -> torch.Tensor | None:
        scores = torch.zeros(len(group[0].idxs), dtype=torch.float64)
        sources = 0
        for item in group:
            dep, idxs = item.dep, item.idxs
            apoz = self.apoz.get(dep.source.module)
            if apoz is None or not is_relu(dep.target) or any(i is None for i in item.root_idxs):
                continue
            scores.scatter_add_(0, torch.tensor(item.root_idxs), 1.0 - apoz[idxs])
            sources += 1
        return (scores / sources).float() if sources else None


class APoZParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batches: int = Field(10, ge=1, description="calibration batches to average APoZ over (at most what is given)")


@register_method
class APoZ(PruningMethod):
    name = "apoz"
    description = "share of zero post-ReLU outputs on calibration batches, uniform ratio (Hu et al. 2016)"
    Params = APoZParams
    params: APoZParams
    needs_calibration = True

    def __init__(self, params: BaseModel | dict | None = None) -> None:
        super().__init__(params)
        self.scorer = APoZImportance()  # given to the pruner first, filled by calibrate() before it ranks

    def importance(self) -> tp.importance.Importance:
        return self.scorer

    def calibrate(self, model: nn.Module, batches: Batches) -> None:
        self.scorer.apoz = record_apoz(model, itertools.islice(batches, self.params.batches))
        if not self.scorer.apoz:
            raise ValueError(f"method {self.name} got no calibration batches: APoZ is measured on data")
