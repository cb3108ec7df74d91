"""Starting from a trained model: a state_dict or model file for the configured model, torchvision's pretrained
weights, a user's own model class, and ``pruneflow prune --checkpoint`` on all of them."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pruneflow.checkpoint import ModelSpec, load_model, load_trained, save_model
from pruneflow.config import ConfigError, validate
from pruneflow.flows.cli import app
from pruneflow.models import build_model

# The trained ResNet-56 of the project's shared folder (../shared beside the checkout, or above a worktree's)
SHARED_RESNET56 = next((folder / "shared" / "models" / "resnet56-cifar10jpg.pt" for folder in Path(__file__).parents
                        if (folder / "shared" / "models" / "resnet56-cifar10jpg.pt").is_file()), Path("absent"))
SMALL = ModelSpec("small_cnn", 1, 10, (1, 8, 8))


def saved_state(tmp_path: Path, spec: ModelSpec = SMALL, prefix: str = "") -> tuple[dict, Path]:
    torch.manual_seed(1)
    state = spec.build().state_dict()
    path = tmp_path / "weights.pt"
    torch.save({prefix + key: value for key, value in state.items()}, path)
    return state, path


@pytest.mark.parametrize("prefix", ["", "module."])  # nn.DataParallel saves every key under module.
def test_a_state_dict_loads_into_the_configured_model(tmp_path, prefix) -> None:
    state, path = saved_state(tmp_path, prefix=prefix)
    model, spec = load_trained(path, SMALL)
    assert spec == SMALL and not model.training
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_a_state_dict_that_does_not_fit_names_the_first_keys(tmp_path) -> None:
    _, path = saved_state(tmp_path)
    with pytest.raises(ValueError, match=r"does not fit model resnet20 \(missing keys: conv1.weight, bn1.weight, "
                                         r"bn1.bias \(\+\d+ more\); unexpected keys: features.0.0.weight"):
        load_trained(path, ModelSpec("resnet20", 1, 10, (1, 8, 8)))
    with pytest.raises(ValueError, match=r"shape mismatches: classifier.weight \(10, 128\) vs the model's \(3, 128\), "
                                         r"classifier.bias.*other classes"):
        load_trained(path, ModelSpec("small_cnn", 1, 3, (1, 8, 8)))


def test_a_model_file_must_hold_the_configured_model_and_a_pickled_module_is_refused(tmp_path) -> None:
    save_model(tmp_path / "model.pt", SMALL.build(), SMALL)
    model, spec = load_trained(tmp_path / "model.pt", SMALL)
    assert spec == SMALL
    with pytest.raises(ValueError, match="holds model small_cnn for 1 input channels and 10 classes, not resnet20"):
        load_trained(tmp_path / "model.pt", ModelSpec("resnet20", 1, 10, (1, 8, 8)))
    torch.save(SMALL.build(), tmp_path / "module.pt")
    with pytest.raises(ValueError, match="it holds pickled objects: save model.state_dict"):
        load_trained(tmp_path / "module.pt", SMALL)


@pytest.mark.skipif(not SHARED_RESNET56.is_file(), reason="the shared trained ResNet-56 is not on this machine")
def test_the_shared_resnet56_state_dict_loads_and_a_wrong_model_name_says_why() -> None:
    model, _ = load_trained(SHARED_RESNET56, ModelSpec("resnet56", 3, 10, (3, 32, 32)))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="does not fit model resnet20 .unexpected keys: layer1.3.conv1.weight"):
        load_trained(SHARED_RESNET56, ModelSpec("resnet20", 3, 10, (3, 32, 32)))


def test_torchvision_pretrained_weights_load_and_get_a_head_for_the_data(monkeypatch) -> None:
    """``model.kwargs: {weights: DEFAULT}`` builds torchvision's net with its weights (here served from memory, as
    torch's hub cache would) and a fresh classifier for the data's class count; a failed download says what to do."""
    import torchvision.models._api as api

    torch.manual_seed(0)
    imagenet = build_model("torchvision:resnet18", 3, 1000).state_dict()
    monkeypatch.setattr(api, "load_state_dict_from_url", lambda url, *args, **kwargs: imagenet)
    cfg = validate({"model": {"name": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}},
                    "train": {"epochs": 0}})
    model = build_model(cfg.model.name, 3, 10, cfg.model.kwargs)
    assert torch.equal(model.conv1.weight, imagenet["conv1.weight"])
    assert model.fc.out_features == 10 and model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)

    def offline(url, *args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(ValueError, match=r"model.kwargs.weights='DEFAULT': cannot get torchvision's resnet18 weights "
                                         r"\(Name or service not known\); without internet, copy .*hub"):
        build_model("torchvision:resnet18", 3, 10, {"weights": "DEFAULT"})
    with pytest.raises(ValueError, match="no such weights for resnet18; known: DEFAULT, IMAGENET1K_V1"):
        build_model("torchvision:resnet18", 3, 10, {"weights": "IMAGENET"})


def test_baseline_config_defaults_and_errors() -> None:
    assert validate({"baseline": {"checkpoint": "model.pt"}}).train.epochs == 0  # evaluated as it is
    assert validate({"baseline": {"checkpoint": "model.pt"}, "train": {"epochs": 2}}).train.epochs == 2  # fine-tuned
    for params, message in [({"train": {"epochs": 0}}, "train.epochs: 0 leaves the baseline untrained"),
                            ({"baseline": {"checkpoint": "m.pt", "mean": [0.5]}}, "give both or neither"),
                            ({"baseline": {"mean": [0.5], "std": [0.2]}}, "without baseline.checkpoint")]:
        with pytest.raises(ConfigError, match=message):
            validate(params)


USER_MODEL = '''
    """A user's own model class and the factory pruneflow calls (model.name: user_nets:tiny_net)."""
    from torch import nn


    class TinyNet(nn.Module):
        def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU())
            self.head = nn.Linear(2 * width, num_classes)

        def forward(self, x):
            return self.head(self.body(self.stem(x)).mean(dim=(2, 3)))


    def tiny_net(in_channels: int = 3, num_classes: int = 10, width: int = 16) -> nn.Module:
        return TinyNet(in_channels, num_classes, width)
'''


def test_a_users_own_model_class_from_state_dict_to_pruned_model_file(tmp_path, monkeypatch) -> None:
    """The README's "your own model" recipe: a factory module on PYTHONPATH, its trained state_dict, then
    ``pruneflow prune`` with no dataset writes a pruned model file that loads back with the trained weights."""
    (tmp_path / "user_nets.py").write_text(textwrap.dedent(USER_MODEL))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = ModelSpec("user_nets:tiny_net", 3, 10, (3, 16, 16))
    torch.manual_seed(3)
    trained = spec.build()
    torch.save(trained.state_dict(), tmp_path / "trained.pt")
    out = tmp_path / "pruned.pt"
    result = CliRunner().invoke(app, ["prune", "--model", "user_nets:tiny_net", "--method", "l1", "--ratio", "0.5",
                                      "--checkpoint", str(tmp_path / "trained.pt"), "--channels", "3",
                                      "--classes", "10", "--input-size", "16", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["out"] == str(out) and not (tmp_path / "data").exists()  # no dataset prepared
    pruned, saved, surgery = load_model(out)
    assert saved.name == "user_nets:tiny_net" and surgery.history
    assert pruned.body[0].out_channels == 16 and pruned(torch.zeros(1, 3, 16, 16)).shape == (1, 10)
    assert torch.equal(pruned.stem[0].weight, trained.stem[0].weight)  # the stem keeps its channels: same weights


def test_prune_cli_checkpoint_errors(tmp_path) -> None:
    _, path = saved_state(tmp_path)
    save_model(tmp_path / "model.pt", SMALL.build(), SMALL)
    for args, message in [(["--checkpoint", str(path), "--channels", "1", "--classes", "10", "--input-size", "8"],
                           "is a state_dict: give --model"),
                          (["--checkpoint", str(tmp_path / "model.pt"), "--classes", "3"],
                           "is a model file, which names its own input channels and classes")]:
        result = CliRunner().invoke(app, ["prune", "--method", "l1", *args])
        assert result.exit_code == 1 and message in result.stderr, result.output
