"""Structural pruning of the default CNN, checkpoints that rebuild it, and its ONNX export."""

from __future__ import annotations

import pytest
import torch

from pruneflow.checkpoint import ModelSpec, load_model, save_model
from pruneflow.export import ExportError, check_parity, export_onnx, onnx_max_abs_diff
from pruneflow.methods import METHODS, create_method
from pruneflow.metrics import count_macs_params
from pruneflow.plan import PrunePlan
from pruneflow.registry import Registry, UnknownNameError

SPEC = ModelSpec("small_cnn", in_channels=1, num_classes=10, input_shape=(1, 8, 8))


def test_registry_lists_the_default_methods_with_descriptions():
    assert {"l1", "slimming", "random"} <= set(METHODS)
    assert all(cls.description for _, cls in METHODS.items())


def test_registry_rejects_unknown_and_duplicate_names():
    registry: Registry[int] = Registry("thing")
    registry.register("a")(1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a")(2)
    with pytest.raises(UnknownNameError, match="known: a"):
        registry.get("b")


@pytest.mark.parametrize("method", ["l1", "random", "slimming"])
def test_macs_drop_as_the_ratio_grows_and_the_output_shape_is_kept(method):
    x = SPEC.example_inputs(4)
    base_macs = count_macs_params(SPEC.build(), x[:1])[0]
    reductions = []
    for ratio in (0.25, 0.5, 0.75):
        torch.manual_seed(0)
        model = SPEC.build()
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            torch.nn.init.uniform_(bn.weight, 0.1, 1.0)  # distinct γ so slimming's global threshold is defined
        create_method(method).prune(model, x, PrunePlan(ratio=ratio, round_to=None))
        assert model(x).shape == (4, 10)
        reductions.append(1 - count_macs_params(model, x[:1])[0] / base_macs)
    assert 0 < reductions[0] < reductions[1] < reductions[2]


def test_round_to_keeps_channel_counts_multiples_of_8():
    model = SPEC.build()
    result = create_method("l1").prune(model, SPEC.example_inputs(), PrunePlan(ratio=0.3, round_to=8))
    assert all(layer.channels_after % 8 == 0 for layer in result.layers if layer.name != "classifier")


def test_stem_and_classifier_keep_their_channels():
    result = create_method("l1").prune(SPEC.build(), SPEC.example_inputs(), PrunePlan(ratio=0.5))
    kept = {layer.name: layer for layer in result.layers}
    assert kept["features.0.0"].channels_after == kept["features.0.0"].channels_before
    assert kept["classifier"].channels_after == 10


def test_checkpoint_rebuilds_the_pruned_model_from_its_history(tmp_path):
    model = SPEC.build().eval()
    result = create_method("l1").prune(model, SPEC.example_inputs(), PrunePlan(ratio=0.5))
    path = save_model(tmp_path / "pruned.pt", model, SPEC, result.history)
    loaded, spec, surgery = load_model(path)
    x = torch.randn(3, 1, 8, 8)
    assert spec == SPEC and surgery.history
    torch.testing.assert_close(loaded(x), model(x))


def test_onnx_export_matches_pytorch_and_a_zero_tolerance_fails(tmp_path):
    model = SPEC.build().eval()
    create_method("l1").prune(model, SPEC.example_inputs(), PrunePlan(ratio=0.5))
    path = export_onnx(model, SPEC.example_inputs(), tmp_path / "model.onnx")
    batches = [(torch.randn(5, 1, 8, 8), None), (torch.randn(1, 1, 8, 8), None)]  # dynamic batch axis
    assert onnx_max_abs_diff(path, model, batches) < 1e-4
    with torch.no_grad():
        model.classifier.bias += 1e-3  # the file no longer reproduces the model
    with pytest.raises(ExportError, match="export.atol"):
        check_parity(path, model, batches, atol=1e-5)
