"""The model zoo: every registered model builds for any channel count, prunes, exports, and round-trips a checkpoint."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from pruneflow.checkpoint import ModelSpec, load_model, save_model
from pruneflow.config import ConfigError, validate
from pruneflow.export import export_onnx, onnx_max_abs_diff
from pruneflow.methods import PruneResult, create_method
from pruneflow.methods.base import remove_blocks
from pruneflow.metrics import count_macs_params
from pruneflow.models import MODELS, accepts, build_model, resolve_model
from pruneflow.plan import PrunePlan

CIFAR_MODELS = ["resnet20", "resnet56", "resnet110", "vgg16_bn", "mobilenet_v2"]
SHAPE = (3, 8, 8)  # CIFAR's channels at digits' size: global pooling makes every CIFAR net fit 8x8


def settle_batch_norm(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """Give BN running stats from one real pass: with fresh stats (mean 0, var 1) some nets' eval outputs
    shrink to ~1e-10 (MobileNetV2's linear bottlenecks), and a parity check on such outputs proves nothing."""
    momenta = {bn: bn.momentum for bn in model.modules() if isinstance(bn, nn.BatchNorm2d)}
    for bn in momenta:
        bn.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(inputs)
    for bn, momentum in momenta.items():
        bn.momentum = momentum
    return model.eval()


@functools.cache
def pruned(name: str) -> tuple[nn.Module, PruneResult, int]:
    """``name`` pruned by l1 at 0.5, with its MACs before; cached since pruning and export tests share it."""
    torch.manual_seed(0)
    model = settle_batch_norm(build_model(name, SHAPE[0], 10), torch.randn(16, *SHAPE))
    example = torch.zeros(2, *SHAPE)
    macs_before, _ = count_macs_params(model, example[:1])
    return model, create_method("l1").prune(model, example, PrunePlan(ratio=0.5)), macs_before


@pytest.mark.parametrize("name", [name for name in MODELS if accepts(name, "num_classes")])  # SR: tests/test_sr.py
@pytest.mark.parametrize("in_channels", [1, 3])
def test_every_model_builds_for_any_channel_count(name: str, in_channels: int) -> None:
    model = build_model(name, in_channels, 7).eval()
    assert model(torch.zeros(2, in_channels, 8, 8)).shape == (2, 7)


def test_resnet56_has_the_published_size() -> None:
    macs, params = count_macs_params(build_model("resnet56", 3, 10), torch.zeros(1, 3, 32, 32))
    assert 0.84e6 < params < 0.87e6  # He et al.: 0.85 M
    assert 124e6 < macs < 129e6  # ~125.5 M in conv layers; count_macs_params adds BN and ReLU


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_l1_at_half_cuts_macs_and_keeps_the_output(name: str) -> None:
    model, result, macs_before = pruned(name)
    macs_after, _ = count_macs_params(model, torch.zeros(1, *SHAPE))
    assert macs_after <= 0.7 * macs_before
    assert any(layer.channels_after < layer.channels_before for layer in result.layers)
    assert model(torch.randn(2, *SHAPE)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn", "mobilenet_v2"])  # one per family; export takes seconds
def test_pruned_model_exports_to_onnx_with_parity(name: str, tmp_path) -> None:
    model, _, _ = pruned(name)
    path = export_onnx(model, torch.zeros(2, *SHAPE), tmp_path / "model.onnx")
    batches = [(torch.randn(3, *SHAPE), torch.zeros(3))]
    assert model(batches[0][0]).abs().max() > 1e-3  # real outputs, so the comparison means something
    assert onnx_max_abs_diff(path, model, batches) <= 1e-4


def test_pruned_resnet_checkpoint_round_trips(tmp_path) -> None:
    """Block removal plus Torch-Pruning's history replay rebuild the exact pruned architecture and outputs."""
    torch.manual_seed(0)
    spec = ModelSpec("resnet20", 3, 10, SHAPE)
    model = spec.build()
    removed = ["layer1.2", "layer3.1"]
    remove_blocks(model, removed)
    result = create_method("l1").prune(model.eval(), spec.example_inputs(), PrunePlan(ratio=0.5))
    save_model(tmp_path / "pruned.pt", model, spec, result.history, removed)
    loaded, loaded_spec, surgery = load_model(tmp_path / "pruned.pt")
    assert loaded_spec == spec and surgery.removed_blocks == removed
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert count_macs_params(loaded, x[:1]) == count_macs_params(model, x[:1])


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "resnet110", "mobilenet_v2"])
def test_declared_blocks_keep_shape_and_can_all_be_removed(name: str) -> None:
    model = build_model(name, 3, 10).eval()
    names = model.removable_blocks()
    assert names and set(names) <= dict(model.named_modules()).keys()
    shapes = {}
    hooks = [model.get_submodule(block).register_forward_hook(
        lambda module, inputs, output, block=block: shapes.__setitem__(block, (inputs[0].shape, output.shape)))
        for block in names]
    model(torch.zeros(2, *SHAPE))
    for handle in hooks:
        handle.remove()
    assert all(shape_in == shape_out for shape_in, shape_out in shapes.values())
    remove_blocks(model, names)
    assert model(torch.zeros(2, *SHAPE)).shape == (2, 10)


def test_resnet_declares_every_block_but_the_downsampling_ones() -> None:
    blocks = build_model("resnet20", 3, 10).removable_blocks()
    assert blocks == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]


@pytest.mark.parametrize("in_channels", [1, 3])
def test_torchvision_models_by_name(in_channels: int) -> None:
    model = build_model("torchvision:resnet18", in_channels, 5).eval()
    assert model(torch.zeros(2, in_channels, 32, 32)).shape == (2, 5)


def test_unknown_torchvision_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="torchvision has no classification model 'resnet9000'"):
        resolve_model("torchvision:resnet9000")
    with pytest.raises(ConfigError, match="model: .*resnet9000"):
        validate({"model": {"name": "torchvision:resnet9000"}})


USER_MODULE = '''
from torch import nn


def tiny(in_channels, num_classes, width=4):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))


not_a_factory = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "pruneflow_test_user_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "pruneflow_test_user_models"


def test_user_factory_by_dotted_path(user_module: str) -> None:
    model = build_model(f"{user_module}:tiny", 1, 6, {"width": 8})
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 6)
    assert validate({"model": {"name": f"{user_module}:tiny"}}).model.name == f"{user_module}:tiny"


@pytest.mark.parametrize("name, message", [
    ("pruneflow_no_such_module:tiny", "cannot import module 'pruneflow_no_such_module'"),
    ("{module}:missing", "has no attribute 'missing'"),
    ("{module}:not_a_factory", "'not_a_factory' is not callable"),
    ("{module}:", "expected package.module:function"),
])
def test_bad_dotted_paths_are_clear_errors(user_module: str, name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_model(name.format(module=user_module))


def test_unknown_name_lists_the_other_ways_to_name_a_model() -> None:
    with pytest.raises(ValueError, match="resnet56.*torchvision:<name>"):
        resolve_model("resnet57")
