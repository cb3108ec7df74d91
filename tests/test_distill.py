"""Retraining with distillation: the pruned net learns from a teacher's outputs as well as from the labels."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruneflow.config import DistillConfig, TrainConfig, validate
from pruneflow.task import CLASSIFICATION, SUPER_RESOLUTION
from pruneflow.training import Distillation, distillation, train

CFG = TrainConfig(epochs=15, lr=0.05, device="cpu")


def batches(targets: str = "labels") -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    data = []
    for _ in range(4):
        x = torch.randn(32, 6, generator=generator)
        y = (torch.randint(0, 3, (32,), generator=generator) if targets == "labels"
             else torch.rand(32, 2, generator=generator))
        data.append((x, y))
    return data


def net(seed: int, outputs: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, outputs))


def disagreement(student: nn.Module, teacher: nn.Module, data) -> float:
    with torch.no_grad():
        return sum(F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(teacher(x), 1), reduction="batchmean",
                            log_target=True).item() for x, _ in data)


def test_with_weight_the_student_learns_the_teachers_outputs_and_the_teacher_is_left_alone() -> None:
    teacher = net(seed=7)
    with torch.no_grad():
        teacher[2].weight.mul_(4)  # confident, and unlike anything the labels alone would teach
    frozen = copy.deepcopy(teacher.state_dict())
    data = batches()
    plain, taught = net(seed=1), net(seed=1)
    train(plain, data, CFG)
    train(taught, data, CFG, distill=Distillation(teacher, weight=0.9, temperature=2.0))
    assert disagreement(taught, teacher, data) < 0.5 * disagreement(plain, teacher, data)
    assert all(torch.equal(value, frozen[key]) for key, value in teacher.state_dict().items())
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())


def test_loss_mixes_the_task_loss_and_the_teacher_term() -> None:
    x, y = batches()[0]
    teacher = net(seed=7)
    outputs = teacher(x).detach()
    kd = Distillation(teacher, weight=0.25, temperature=3.0)
    # agreeing: no KD term
    assert torch.allclose(kd.loss(CLASSIFICATION, outputs, x, y), 0.75 * F.cross_entropy(outputs, y))
    x, images = batches("images")[0]  # super-resolution-like float targets: MSE to the teacher's output
    teacher = net(seed=7, outputs=2)
    student = torch.zeros(32, 2)
    expected = 0.75 * F.mse_loss(student, images) + 0.25 * F.mse_loss(student, teacher(x))
    assert torch.allclose(Distillation(teacher, 0.25).loss(SUPER_RESOLUTION, student, x, images), expected)


def test_distillation_is_off_by_default_and_needs_a_teacher_when_on() -> None:
    assert validate({}).retrain.distill.weight == 0
    assert distillation(DistillConfig(), None) is None
    with pytest.raises(ValueError, match="retrain.distill.weight is 0.5 but no teacher was given"):
        distillation(DistillConfig(weight=0.5), None)
    assert distillation(DistillConfig(weight=0.5, temperature=2), net(0)).temperature == 2
