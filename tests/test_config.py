"""The config schema: defaults, overrides and the errors users see for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pruneflow.config import ConfigError, PipelineConfig, load_config, parse_override
from tests.conftest import write_params

REPO = Path(__file__).resolve().parents[1]


def test_shipped_params_are_valid_and_match_the_schema_defaults_they_override():
    cfg, root = load_config(REPO / "params.yaml")
    assert root == REPO
    assert list(cfg.methods) == ["l1", "slimming", "random"]
    assert cfg.data.dataset == "digits"


def test_overrides_are_typed_by_yaml_and_validated(tmp_path):
    path = write_params(tmp_path, {})
    cfg, _ = load_config(path, ["train.epochs=3", "methods=[l1, random]", "prune.round_to=null"])
    assert cfg.train.epochs == 3
    assert cfg.methods == {"l1": {}, "random": {}}
    assert cfg.prune.round_to is None


@pytest.mark.parametrize("overrides, message", [
    (["bogus=1"], "bogus: unknown key"),
    (["train.epoch=3"], "train.epoch: unknown key"),
    (["methods.nope={}"], "unknown pruning method 'nope'"),
    (["methods.slimming.sparsty=0.1"], "slimming: sparsty: unknown key"),
    (["prune.ratio=1.0"], "prune.ratio: Input should be less than 1"),
    (["prune.ratio=-0.1"], "prune.ratio: Input should be greater than or equal to 0"),
    (["search.ratio_low=0.8", "search.ratio_high=0.2"], "ratio_low (0.8) is greater than ratio_high (0.2)"),
    (["train.epochs=many"], "train.epochs: Input should be a valid integer"),
    (["model.name=resnet9000"], "unknown model 'resnet9000'"),
    (["data.dataset=mnist9"], "unknown dataset 'mnist9'"),
    (["data.dataset=imagefolder", "data.path=missing"], "folder not found"),
    (["data.dataset=imagefolder"], "needs data.path"),
])
def test_bad_input_names_the_key(tmp_path, overrides, message):
    path = write_params(tmp_path, {})
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("text", ["train.epochs", "=3", "train..epochs=3", "a.b=[unclosed"])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="override|malformed"):
        parse_override(text)


def test_bad_yaml_and_missing_file(tmp_path):
    broken = tmp_path / "params.yaml"
    broken.write_text("train: {epochs: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")


def test_imagefolder_checks_the_layout(tmp_path):
    root = tmp_path / "images"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "test" / "cat").mkdir(parents=True)
    path = write_params(tmp_path, {"data": {"dataset": "imagefolder", "path": "images"}})
    with pytest.raises(ConfigError, match="holds no images"):
        load_config(path)


def test_fingerprint_changes_with_the_section():
    a, b = PipelineConfig(), PipelineConfig(train={"epochs": 1})
    assert a.fingerprint("train") != b.fingerprint("train")
    assert a.fingerprint("search") == b.fingerprint("search")


def test_cli_rejects_bad_config_with_exit_2_before_any_run(tmp_path):
    path = write_params(tmp_path, {"prune": {"ratio": 1.5}})
    done = subprocess.run([sys.executable, "-m", "pruneflow.flows.cli", "run", "--params", str(path)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2
    assert "prune.ratio" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started, so nothing is left RUNNING
