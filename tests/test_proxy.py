"""The adaptive-BN proxy: it rewrites BatchNorm running statistics and nothing else, deterministically."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pruneflow.proxy import adaptive_bn_score, recalibrate_batchnorm


class Scale(nn.Module):
    """A layer with a buffer of its own, which recalibration must not touch."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("factor", torch.full((1,), 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), Scale(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def batches(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=generator) * 3 + 1, torch.randint(0, 10, (16,), generator=generator))
            for _ in range(count)]


def is_bn_statistic(name: str, model: nn.Module) -> bool:
    owner = model.get_submodule(name.rpartition(".")[0])
    return isinstance(owner, nn.BatchNorm2d) and name.rpartition(".")[2] in ("running_mean", "running_var",
                                                                           "num_batches_tracked")


def test_recalibration_changes_bn_statistics_and_nothing_else() -> None:
    model = tiny_net()
    before = copy.deepcopy(model.state_dict())
    assert recalibrate_batchnorm(model, batches(3, seed=1)) == 2
    after = model.state_dict()
    assert not model.training and model[1].momentum == 0.1  # modes and momentum restored
    for name, value in after.items():
        if is_bn_statistic(name, model):
            assert not torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, before[name]), name  # weights, biases, γ, β, the Scale buffer: bit-identical
    assert after["1.num_batches_tracked"].item() == 3


def test_recalibration_is_the_plain_average_of_the_batches_statistics() -> None:
    model = tiny_net()
    data = batches(4, seed=2)
    recalibrate_batchnorm(model, data)
    first = torch.cat([images for images, _ in data])
    activations = model[0](first)
    per_batch = activations.detach().view(4, 16, 8, 8, 8)
    means = per_batch.mean(dim=(1, 3, 4))
    assert torch.allclose(model[1].running_mean, means.mean(0), atol=1e-5)


def test_score_is_deterministic_and_needs_batches() -> None:
    scores, states = [], []
    for _ in range(2):
        model = tiny_net()
        scores.append(adaptive_bn_score(model, batches(3, seed=1), batches(2, seed=3)))
        states.append(model.state_dict())
    assert scores[0] == scores[1]
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(tiny_net(), [])
