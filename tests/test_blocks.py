"""Removable residual blocks found by tracing, and ``cascade`` on a model that declares none."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from pruneflow.methods import create_method
from pruneflow.methods.blocks import find_residual_blocks, removable_blocks
from pruneflow.models import build_model
from pruneflow.plan import PrunePlan


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_block_finder_on_torchvision(name):
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    blocks = find_residual_blocks(model, torch.zeros(1, 3, 32, 32))
    expected = {"resnet18": ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"],
                "mobilenet_v2": ["features.3", "features.5", "features.6", "features.8", "features.9",
                                 "features.10", "features.12", "features.13", "features.15", "features.16"]}
    assert blocks == expected[name]


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2", "vgg16_bn"])
def test_block_finder_agrees_with_the_project_models(name):
    model = build_model(name, 3, 10)
    declared = model.removable_blocks() if hasattr(model, "removable_blocks") else []
    assert find_residual_blocks(model, torch.zeros(1, 3, 32, 32)) == declared


def test_cascade_removes_blocks_of_a_model_that_declares_none():
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    assert removable_blocks(model, x) == find_residual_blocks(model, x)
    result = create_method("cascade", {"blocks": ["layer1.1", "layer3.1"]}).prune(model, x, PrunePlan())
    assert result.removed_blocks == ["layer1.1", "layer3.1"] and isinstance(model.layer3[1], nn.Identity)
    assert model(x).shape == (2, 10)
