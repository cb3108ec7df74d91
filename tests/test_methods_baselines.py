"""The baseline methods (l2, taylor, fpgm, lamp, apoz, magnitude_unstructured) and the random-vs-l1 sanity check."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch

from pruneflow.config import TrainConfig
from pruneflow.data import load_splits
from pruneflow.export import export_onnx, onnx_max_abs_diff
from pruneflow.methods import create_method
from pruneflow.methods.magnitude_unstructured import masked_weights
from pruneflow.metrics import count_macs_params, zero_weight_share
from pruneflow.models import build_model
from pruneflow.plan import PrunePlan
from pruneflow.training import evaluate, train

INPUTS = {"small_cnn": (1, 8), "resnet20": (3, 16)}  # model -> (channels, image side)
STRUCTURED = ["l2", "taylor", "fpgm", "lamp", "apoz"]
# An export costs 1-3 s and depends only on the pruned architecture, so export each distinct one once: l2
# stands for the uniform per-layer methods (taylor and fpgm give the same shapes), lamp's global ranking
# gives uneven widths, apoz leaves resnet20's residual groups alone. magnitude_unstructured keeps the
# baseline's architecture, which the baseline stage exports anyway.
EXPORTED = {("l2", "resnet20"), ("lamp", "small_cnn"), ("apoz", "resnet20")}


def setup(model_name: str, seed: int = 0):
    """A fresh model, example inputs (batch 2) and two random calibration batches for data-driven methods."""
    channels, side = INPUTS[model_name]
    torch.manual_seed(seed)
    model = build_model(model_name, channels, 10)
    calib = [(torch.randn(8, channels, side, side), torch.randint(0, 10, (8,))) for _ in range(2)]
    return model, torch.randn(2, channels, side, side), calib


@pytest.mark.parametrize("model_name", list(INPUTS))
@pytest.mark.parametrize("method", STRUCTURED)
def test_structured_methods_halve_the_net_and_keep_its_output(method, model_name, tmp_path):
    model, x, calib = setup(model_name)
    macs_before = count_macs_params(model, x[:1])[0]
    result = create_method(method).prune(model, x, PrunePlan(ratio=0.5), calib)
    assert model(x).shape == (2, 10)
    assert 1 - count_macs_params(model, x[:1])[0] / macs_before >= 0.3
    assert any(layer.channels_after < layer.channels_before for layer in result.layers)
    assert result.history  # what rebuilds the pruned net from the baseline
    if (method, model_name) in EXPORTED:
        path = export_onnx(model, x, tmp_path / "model.onnx")
        assert onnx_max_abs_diff(path, model, [(torch.randn(3, *x.shape[1:]), None)]) < 1e-4


@pytest.mark.parametrize("model_name", list(INPUTS))
def test_magnitude_unstructured_zeros_weights_but_keeps_channels_and_macs(model_name):
    model, x, _ = setup(model_name)
    macs_before = count_macs_params(model, x[:1])[0]
    result = create_method("magnitude_unstructured").prune(model, x, PrunePlan(ratio=0.5))
    assert zero_weight_share(model) >= 0.45
    assert count_macs_params(model, x[:1])[0] == macs_before
    assert all(l.channels_after == l.channels_before and l.macs_after == l.macs_before for l in result.layers)
    assert "no speed-up" in result.notes
    assert not result.history and not any(name.endswith("_orig") for name, _ in model.named_parameters())


def test_magnitude_unstructured_retraining_keeps_the_pruned_weights_at_zero():
    model, x, batches = setup("small_cnn")
    method = create_method("magnitude_unstructured")
    method.prune(model, x, PrunePlan(ratio=0.5))
    pruned = [(module.weight == 0).clone() for module, _ in masked_weights(model)]
    before = [module.weight.detach().clone() for module, _ in masked_weights(model)]
    history = method.retrain(model, batches, batches, TrainConfig(epochs=2, lr=0.05))
    assert len(history) == 2
    for (module, _), zero, old in zip(masked_weights(model), pruned, before):
        assert (module.weight[zero] == 0).all()
        assert not torch.equal(module.weight, old)  # the unpruned weights did train
    assert not any(name.endswith("_orig") for name, _ in model.named_parameters())


def test_apoz_prunes_channels_a_relu_always_zeroes_first():
    model, x, calib = setup("small_cnn")
    bn = model.features[1][1]  # conv 32->64, BN, ReLU
    dead = torch.tensor([3, 8, 17, 22, 30, 41, 50, 63])
    with torch.no_grad():
        bn.bias[dead] = -100.0  # relu(bn(x)) == 0 for every input; the weights' magnitudes are untouched
    plan = PrunePlan(ratio=0.0, layer_ratios={"features.1.0": len(dead) / 64}, round_to=None)
    create_method("apoz").prune(model, x, plan, calib)
    assert bn.num_features == 64 - len(dead)
    assert (bn.bias > -100).all()  # exactly the dead channels went


def test_taylor_without_calibration_batches_raises_a_clear_error():
    model, x, _ = setup("small_cnn")
    with pytest.raises(ValueError, match="taylor is data-driven and needs calibration batches"):
        create_method("taylor").prune(model, x, PrunePlan(ratio=0.5))
    with pytest.raises(ValueError, match="taylor got no calibration batches"):
        create_method("taylor").prune(model, x, PrunePlan(ratio=0.5), [])


def test_random_loses_to_l1_on_real_digits(digits_dir):
    """At 70 % of the channels and a short, gentle fine-tune, which channels survive still shows.

    Measured over 5 baseline seeds x 6 pruning seeds, l1's edge is ~4 points with a per-seed spread of
    ~4, so one seed can go either way; the mean of 6 paired seeds stayed positive for every baseline.
    """
    splits = load_splits(digits_dir)
    torch.manual_seed(0)
    baseline = build_model("small_cnn", splits.in_channels, splits.num_classes)
    train(baseline, splits.loader("train", 64, shuffle=True), TrainConfig(epochs=4))
    test = splits.loader("test", 512)
    assert evaluate(baseline, test) > 95
    x = torch.zeros(2, *splits.input_shape)
    accuracy: dict[str, list[float]] = {"random": [], "l1": []}
    for seed in range(6):
        for method, scores in accuracy.items():
            model = copy.deepcopy(baseline)
            torch.manual_seed(seed)  # random's choice of channels
            create_method(method).prune(model, x, PrunePlan(ratio=0.7, round_to=None))
            torch.manual_seed(seed)
            train(model, splits.loader("train", 64, shuffle=True, seed=seed), TrainConfig(epochs=1, lr=0.003))
            scores.append(evaluate(model, test))
    assert statistics.mean(accuracy["l1"]) > statistics.mean(accuracy["random"]), accuracy


def test_l1_keeps_the_pruned_convs_largest_l1_filters_and_group_l1_judges_the_group():
    """``l1`` is Li et al.'s filter norm: in a plain group and in a residual one (rooted at the stage's shortcut
    conv) the channels kept are those whose filters have the largest Σ|W_j|; ``group_l1`` ranks by the whole
    group, and keeps others. A kept channel is recognised by its BatchNorm's γ (distinct random values)."""
    model, x, _ = setup("resnet20")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.2, 2.0)
    convs = {"layer2.1.conv1": "layer2.1.bn1", "layer2.0.shortcut.0": "layer2.0.shortcut.1"}
    by_norm = {}  # conv -> the γ of its channels, largest filter L1 norm first
    for conv, norm in convs.items():
        order = model.get_submodule(conv).weight.detach().abs().sum((1, 2, 3)).argsort(descending=True)
        by_norm[conv] = model.get_submodule(norm).weight.detach()[order]
    grouped = copy.deepcopy(model)
    create_method("l1").prune(model, x, PrunePlan(ratio=0.5, round_to=None))
    create_method("group_l1").prune(grouped, x, PrunePlan(ratio=0.5, round_to=None))
    for conv, norm in convs.items():
        kept = model.get_submodule(norm).weight.detach()
        assert set(kept.tolist()) == set(by_norm[conv][:len(kept)].tolist()), conv
        assert set(grouped.get_submodule(norm).weight.detach().tolist()) != set(kept.tolist()), conv
