"""The source-paper methods: layer_entropy, info_richness, channel_sparsity, statistical, adversarial, cascade."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pruneflow.checkpoint import ModelSpec, load_model, save_model
from pruneflow.config import TrainConfig
from pruneflow.export import export_onnx, onnx_max_abs_diff
from pruneflow.methods import PruningMethod, create_method
from pruneflow.methods.grafting import graft, weight_entropy
from pruneflow.methods.groups import following_norms
from pruneflow.metrics import count_macs_params
from pruneflow.plan import PrunePlan
from pruneflow.training import train

SMALL = ModelSpec("small_cnn", in_channels=1, num_classes=10, input_shape=(1, 8, 8))
RESNET = ModelSpec("resnet20", in_channels=3, num_classes=10, input_shape=(3, 16, 16))
STRUCTURED = ["layer_entropy", "info_richness", "channel_sparsity", "statistical", "adversarial"]
# Small enough to run in a second: adversarial's masks all die within its few steps, the ratio caps the cut.
PARAMS = {"adversarial": {"epochs": 2, "mask_lr": 0.5, "lambdas": [1.0], "finetune_epochs": 0}}


class TinyBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResidual(nn.Module):
    """Three shape-keeping residual blocks that declare themselves removable."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(*(TinyBlock(8) for _ in range(3)))
        self.head = nn.Linear(8, 10)

    def removable_blocks(self) -> list[str]:
        return [f"blocks.{index}" for index in range(3)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def batches_for(shape: tuple[int, ...], count: int = 3, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(size, *shape), torch.randint(0, 10, (size,))) for _ in range(count)]


def ready(name: str, model: nn.Module, batches) -> PruningMethod:
    """The method, given the training history it records if it needs one (as the baseline stage does)."""
    method = create_method(name, PARAMS.get(name))
    if method.recorder() is not None:
        method.use_records(recorded(method, model, batches, epochs=2))
    return method


def recorded(method: PruningMethod, model: nn.Module, batches, epochs: int) -> dict:
    """Train ``model`` with the method's recorder hooked to the loop's ``on_epoch_end``; what it recorded."""
    recorder = method.recorder()

    def record(result) -> None:
        recorder.on_epoch_end(model, result.epoch)

    train(model, batches, TrainConfig(epochs=epochs, lr=0.01), on_epoch_end=record)
    return recorder.state()


def macs(model: nn.Module, x: torch.Tensor) -> int:
    return count_macs_params(model, x[:1])[0]


def layer_ratios(result, names: list[str]) -> dict[str, float]:
    rows = {layer.name: layer for layer in result.layers}
    return {name: 1 - rows[name].channels_after / rows[name].channels_before for name in names}


@pytest.mark.parametrize("spec", [SMALL, RESNET], ids=["small_cnn", "resnet20"])
@pytest.mark.parametrize("name", STRUCTURED)
def test_structured_methods_cut_macs_keep_the_output_and_export(name, spec, tmp_path):
    torch.manual_seed(0)
    model, x, batches = spec.build(), torch.randn(2, *spec.input_shape), batches_for(spec.input_shape)
    method = ready(name, model, batches)
    before = macs(model, x)
    method.prune(model, x, PrunePlan(ratio=0.5), batches)
    assert model(x).shape == (2, 10)
    assert 1 - macs(model, x) / before >= 0.3
    if spec is SMALL:  # ONNX parity once per method
        path = export_onnx(model, x, tmp_path / "model.onnx")
        assert onnx_max_abs_diff(path, model, batches[:1]) < 1e-4


SMALL_GROUPS = ["features.1.0", "features.3.0", "features.4.0"]


@pytest.mark.parametrize("name", ["layer_entropy", "info_richness"])
def test_entropy_allocations_are_non_uniform_and_hit_the_target(name):
    torch.manual_seed(0)
    model, x = SMALL.build(), SMALL.example_inputs()
    nn.init.normal_(model.features[3][0].weight, std=0.05)  # peaked weights: a lower entropy than the uniform init
    result = create_method(name).prune(model, x, PrunePlan(ratio=0.5, round_to=None))
    ratios = layer_ratios(result, SMALL_GROUPS)
    rows = {layer.name: layer for layer in result.layers}
    removed = sum(rows[n].channels_before - rows[n].channels_after for n in SMALL_GROUPS)
    assert abs(removed / sum(rows[n].channels_before for n in SMALL_GROUPS) - 0.5) <= 0.02
    assert max(ratios.values()) - min(ratios.values()) > 0.05
    assert "λ_min=" in result.notes
    if name == "layer_entropy":
        assert max(ratios, key=ratios.get) == "features.3.0"  # the poorest layer loses most


@pytest.mark.parametrize("name", ["layer_entropy", "info_richness"])
def test_entropy_allocations_can_aim_at_a_macs_reduction(name):
    torch.manual_seed(0)
    model, x = RESNET.build(), RESNET.example_inputs()
    before = macs(model, x)
    create_method(name).prune(model, x, PrunePlan(ratio=0.5, macs_reduction=0.4, round_to=None))
    assert abs(1 - macs(model, x) / before - 0.4) <= 0.03


def test_weight_entropy_is_that_of_a_ten_bin_histogram():
    assert weight_entropy(torch.arange(100.0)) == pytest.approx(math.log(10))
    assert weight_entropy(torch.ones(50)) == 0.0


def test_grafting_two_copies_meet_between_them():
    torch.manual_seed(0)
    nets = [SMALL.build(), SMALL.build()]
    before = [net.features[1][0].weight.detach().clone() for net in nets]
    graft(nets, following_norms(nets[0], SMALL.example_inputs(1)), a=0.4, c=500, bins=10)
    after = [net.features[1][0].weight.detach() for net in nets]
    torch.testing.assert_close(after[0], after[1])  # with K=2 the ring's α and 1 − α give both the same mix
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[0], before[1])
    torch.testing.assert_close(nets[0].features[1][1].running_var, nets[1].features[1][1].running_var)


@pytest.mark.parametrize("name,params", [("layer_entropy", {"grafting": True}), ("info_richness", {"grafting": True}),
                                         ("channel_sparsity", {"weight_penalty": 1e-3})])
def test_retrain_recipes_run_an_epoch(name, params):
    torch.manual_seed(0)
    model, x, batches = SMALL.build(), SMALL.example_inputs(), batches_for(SMALL.input_shape)
    method = create_method(name, params)
    method.prune(model, x, PrunePlan(ratio=0.5), batches)
    weights = model.classifier.weight.detach().clone()
    seen = []
    history = method.retrain(model, batches, batches[:1], TrainConfig(epochs=1, lr=0.01), seen.append)
    assert len(history) == 1 and seen == history and history[0].val_metric is not None
    assert not torch.equal(model.classifier.weight, weights)


def test_layer_entropy_without_grafting_uses_the_standard_loop():
    assert create_method("layer_entropy").retrain(SMALL.build(), [], None, TrainConfig(epochs=1)) is None


def test_statistical_records_the_last_epochs_through_training(tmp_path):
    torch.manual_seed(0)
    model, batches = SMALL.build(), batches_for(SMALL.input_shape)
    method = create_method("statistical", {"epochs": 2})
    torch.save(recorded(method, model, batches, epochs=3), tmp_path / "records.pt")  # as the baseline stage does
    records = torch.load(tmp_path / "records.pt", weights_only=True)
    assert records["epochs"] == [2, 3]
    assert records["filters"]["features.1.0"].shape == (2, 64)
    method.use_records(records)
    result = method.prune(model, SMALL.example_inputs(), PrunePlan(ratio=0.5, round_to=None))
    assert layer_ratios(result, SMALL_GROUPS) == pytest.approx(dict.fromkeys(SMALL_GROUPS, 0.5))


def test_statistical_threshold_rule_and_stability_filter():
    torch.manual_seed(0)
    model, batches = SMALL.build(), batches_for(SMALL.input_shape)
    method = create_method("statistical", {"rule": "threshold", "stability": 0.05})
    method.use_records(recorded(method, model, batches, epochs=2))
    result = method.prune(model, SMALL.example_inputs(), PrunePlan(ratio=0.9, round_to=None))
    ratios = layer_ratios(result, SMALL_GROUPS)
    assert all(0 < ratio < 0.5 for ratio in ratios.values())  # μ − σ removes the low tail, whatever the ratio says


def test_statistical_needs_records():
    with pytest.raises(ValueError, match="use_records"):
        create_method("statistical").prune(SMALL.build(), SMALL.example_inputs(), PrunePlan())


def test_adversarial_keeps_the_most_pruned_candidate_within_delta():
    torch.manual_seed(0)
    model, x, batches = SMALL.build(), SMALL.example_inputs(), batches_for(SMALL.input_shape)
    params = {**PARAMS["adversarial"], "lambdas": [1e-4, 1.0], "delta": 100.0}
    result = create_method("adversarial", params).prune(model, x, PrunePlan(ratio=0.5), batches)
    assert "λ=0.0001 removes 0 channels" in result.notes and result.notes.endswith("chose λ=1")
    assert max(layer_ratios(result, SMALL_GROUPS).values()) <= 0.5  # the ratio caps the cut


def test_adversarial_masks_stay_bounded_at_a_huge_step():
    torch.manual_seed(0)
    model, x, batches = SMALL.build(), SMALL.example_inputs(), batches_for(SMALL.input_shape)
    from pruneflow.methods.adversarial import AdversarialParams, learn_masks
    from pruneflow.methods.groups import channel_groups

    groups = [group for group in channel_groups(model, x) if group.norms]
    with torch.no_grad():
        teacher = [(images, model.eval()(images)) for images, _ in batches]
    masks = learn_masks(model, groups, teacher, 0.5, AdversarialParams(epochs=3, mask_lr=50.0))
    assert all(torch.isfinite(mask).all() and mask.min() >= 0 and mask.max() <= 1 for mask in masks)


def test_adversarial_survivors_keep_the_teachers_weights():
    """Nothing dies at a tiny λ: the pruned net must compute exactly what the teacher computed."""
    torch.manual_seed(0)
    model, x, batches = SMALL.build().eval(), SMALL.example_inputs(), batches_for(SMALL.input_shape)
    with torch.no_grad():
        before = model(batches[0][0])
    params = {**PARAMS["adversarial"], "mask_lr": 0.01, "lambdas": [1e-6]}
    create_method("adversarial", params).prune(model, x, PrunePlan(ratio=0.5), batches)
    with torch.no_grad():
        assert torch.allclose(model.eval()(batches[0][0]), before, atol=1e-5)


def test_cascade_removes_the_blocks_whose_removal_costs_least():
    torch.manual_seed(0)
    model, x = TinyResidual().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for index in (0, 2):  # these blocks add nothing: removing them cannot change the loss
            model.blocks[index].bn2.weight.zero_()
            model.blocks[index].bn2.bias.zero_()
        model.blocks[1].bn2.weight.mul_(3)
        images = torch.randn(16, 3, 8, 8)
        batches = [(images, model(images).argmax(1))]
    result = create_method("cascade").prune(model, x, PrunePlan(ratio=0.5), batches)
    assert sorted(result.removed_blocks) == ["blocks.0", "blocks.2"] and not result.history
    assert isinstance(model.blocks[0], nn.Identity) and isinstance(model.blocks[2], nn.Identity)
    assert isinstance(model.blocks[1], TinyBlock)
    assert model(x).shape == (2, 10)


def test_cascade_removes_exactly_the_named_blocks_and_exports(tmp_path):
    model, x = TinyResidual().eval(), torch.randn(2, 3, 8, 8)
    result = create_method("cascade", {"blocks": ["blocks.1"]}).prune(model, x, PrunePlan(ratio=0.5))
    assert result.removed_blocks == ["blocks.1"]
    assert [type(block) for block in model.blocks] == [TinyBlock, nn.Identity, TinyBlock]
    path = export_onnx(model, x, tmp_path / "model.onnx")
    assert onnx_max_abs_diff(path, model, [(torch.randn(3, 3, 8, 8), None)]) < 1e-4


def test_cascade_rejects_undeclared_blocks_and_models_without_a_declaration():
    with pytest.raises(ValueError, match="blocks.7"):
        create_method("cascade", {"blocks": ["blocks.7"]}).prune(TinyResidual(), torch.randn(2, 3, 8, 8), PrunePlan())
    with pytest.raises(ValueError, match="SmallCNN"):
        create_method("cascade").prune(SMALL.build(), SMALL.example_inputs(), PrunePlan(), batches_for((1, 8, 8)))


def test_cascade_meets_a_macs_target_and_its_checkpoint_replays_the_removal(tmp_path):
    torch.manual_seed(0)
    model, x = RESNET.build().eval(), RESNET.example_inputs()
    before = macs(model, x)
    batches = batches_for(RESNET.input_shape, count=1)
    result = create_method("cascade").prune(model, x, PrunePlan(macs_reduction=0.3), batches)
    assert 1 - macs(model, x) / before >= 0.3
    assert set(result.removed_blocks) <= set(RESNET.build().removable_blocks())
    path = save_model(tmp_path / "pruned.pt", model, RESNET, result.history, result.removed_blocks)
    loaded, _, surgery = load_model(path)
    assert surgery.removed_blocks == result.removed_blocks
    assert all(isinstance(loaded.get_submodule(block), nn.Identity) for block in result.removed_blocks)
    torch.testing.assert_close(loaded(x), model(x))
