"""Every registered method on every CIFAR architecture the issue names: prune at 0.5, run, export, match.

Inputs are 3x8x8 (the CIFAR nets end in global pooling) and weights untrained, so this checks the
surgery — residual adds, depthwise groups, declared blocks — not accuracy; accuracy lives in the
digits tests and the CIFAR benchmark.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pruneflow.export import export_onnx, onnx_max_abs_diff
from pruneflow.methods import METHODS, create_method
from pruneflow.metrics import count_macs_params, zero_weight_share
from pruneflow.models import build_model
from pruneflow.plan import PrunePlan

MODELS = ("resnet56", "mobilenet_v2", "vgg16_bn")
SHAPE = (3, 8, 8)
# The dynamo exporter (opset 18, the default) takes 5-20 s a net here, the TorchScript one (opset 17) under 1 s:
# each kind of surgery goes through dynamo once — channels removed, weights masked, blocks replaced by identity —
# and the rest through TorchScript (tests/test_models.py exports every model family through dynamo).
DYNAMO = {("l1", "vgg16_bn"), ("magnitude_unstructured", "vgg16_bn"), ("cascade", "resnet56")}
CHEAP = {"adversarial": {"epochs": 3, "mask_lr": 0.5, "lambdas": [1.0], "finetune_epochs": 0}, "apoz": {"batches": 2},
         "channel_sparsity": {"batches": 2}, "statistical": {"epochs": 2}}


def trained_looking(model: nn.Module) -> nn.Module:
    """Give BN distinct scales and real running statistics, as training would.

    With every γ = 1 slimming has nothing to rank, and with fresh running stats some nets' outputs are
    ~1e-10, where a parity check proves nothing.
    """
    generator = torch.Generator().manual_seed(0)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.weight.data = torch.rand(bn.num_features, generator=generator) * 0.9 + 0.1
        bn.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, *SHAPE, generator=generator))
    return model.eval()


def calibration() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, *SHAPE, generator=generator), torch.randint(0, 10, (8,), generator=generator))
            for _ in range(2)]


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", list(METHODS))
def test_method_prunes_model_and_exports(method, model_name, tmp_path):
    torch.manual_seed(0)
    model = trained_looking(build_model(model_name, 3, 10))
    pruner = create_method(method, CHEAP.get(method))
    recorder = pruner.recorder()
    if recorder is not None:
        for epoch in (1, 2):
            recorder.on_epoch_end(model, epoch)
        pruner.use_records(recorder.state())
    x = torch.randn(4, *SHAPE)
    macs_before = count_macs_params(model, x[:1])[0]

    if pruner.allocates_latency:  # halp prunes what it allocated on the latency table: tests/test_latency_model.py
        with pytest.raises(ValueError, match="turns the plan's latency_ms or speedup into kept channels first"):
            pruner.prune(model, x, PrunePlan(ratio=0.5), calibration())
        return
    if method == "cascade" and not hasattr(model, "removable_blocks"):
        with pytest.raises(ValueError, match="removable_blocks"):
            pruner.prune(model, x, PrunePlan(ratio=0.5), calibration())
        return
    result = pruner.prune(model, x, PrunePlan(ratio=0.5), calibration())
    model.eval()
    assert model(x).shape == (4, 10)

    reduction = 1 - count_macs_params(model, x[:1])[0] / macs_before
    if pruner.structured:
        assert reduction >= 0.3, f"{method} on {model_name} removed only {reduction:.1%} of MACs"
    else:
        assert reduction == 0 and zero_weight_share(model) >= 0.45
        assert "no speed-up" in result.notes

    opset = 18 if (method, model_name) in DYNAMO else 17
    path = export_onnx(model, x, tmp_path / "model.onnx", opset=opset)
    assert onnx_max_abs_diff(path, model, [(x, None)]) < 1e-4
