"""``pruneflow prune``: one pruning, reported as a table or one JSON object; bad names exit 2 with one line."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pruneflow.checkpoint import ModelSpec, save_model
from pruneflow.config import DataConfig
from pruneflow.flows.cli import app
from pruneflow.inspection import fit_inputs, format_report, prune_once
from pruneflow.latency.rounding import cache_folder
from pruneflow.latency.table import LatencyTable
from pruneflow.methods.magnitude import L1
from pruneflow.plan import PrunePlan

REPORT_KEYS = {"macs_before", "macs_after", "params_before", "params_after", "layers"}


@pytest.fixture
def data_dir(digits_dir):
    """The folder holding conftest's prepared digits: ``prepare_dataset`` finds them current, writes nothing."""
    return digits_dir.parent


def invoke(*args: str):
    return CliRunner().invoke(app, ["prune", *args])


def test_json_report(data_dir) -> None:
    result = invoke("--model", "resnet20", "--method", "l1", "--ratio", "0.5", "--data-dir", str(data_dir), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout holds the JSON object alone; progress goes to stderr
    assert REPORT_KEYS <= report.keys()
    assert report["input_shape"] == [1, 8, 8]  # a fresh model takes the dataset's shape: digits
    assert report["macs_after"] < 0.7 * report["macs_before"]
    assert report["params_after"] < report["params_before"]
    assert {"name", "channels_before", "channels_after"} <= report["layers"][0].keys()
    table = format_report(report)
    assert "MACs" in table and "layer3.2.conv1" in table
    # the default rounds as the pipeline does: counts at step edges of this machine's latency table, with why
    assert report["round_to"] == "auto" and report["rounding"]
    kept = {row["name"]: row["kept"] for row in report["rounding"]}
    block = LatencyTable(cache_folder()).channel_block() or 1  # the runtime's own: 16 with AVX-512, 8 with AVX2
    assert all(row["kept"] % block == 0 or row["kept"] == row["channels"] for row in report["rounding"])
    after = {layer["name"]: layer["channels_after"] for layer in report["layers"]}
    assert all(after[name] == count for name, count in kept.items() if name in after)
    assert "latency step edges" in table


def test_a_fixed_round_to_keeps_its_multiple(data_dir) -> None:
    result = invoke("--model", "resnet20", "--method", "l1", "--ratio", "0.5", "--round-to", "8",
                    "--data-dir", str(data_dir), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["round_to"] == 8 and report["rounding"] == []
    assert all(layer["channels_after"] % 8 == 0 for layer in report["layers"] if "conv" in layer["name"])


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet57", "--method", "l1"], "unknown model 'resnet57'"),
    (["--model", "resnet20", "--method", "l0"], "unknown pruning method 'l0'"),
    (["--model", "resnet20", "--method", "l1", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--model", "resnet20", "--method", "l1", "--ratio", "1"], "--ratio must be in [0, 1)"),
    (["--method", "l1"], "give --model or --checkpoint"),
    (["--model", "resnet20", "--method", "l1", "--round-to", "eight"], "--round-to must be auto or a whole number"),
])
def test_bad_names_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not result.stdout


class CalibratedL1(L1):
    """L1 posing as a data-driven method, recording the batches it is given (unregistered: tests only)."""

    needs_calibration = True

    def calibrate(self, model, batches) -> None:
        self.shapes = [tuple(images.shape) for images, _ in batches]


def test_three_channel_checkpoint_calibrates_on_fitted_digits(data_dir, tmp_path) -> None:
    spec = ModelSpec("resnet20", 3, 10, (3, 16, 16))
    save_model(tmp_path / "model.pt", spec.build(), spec)
    pruner = CalibratedL1()
    report = prune_once(pruner, PrunePlan(ratio=0.5), checkpoint=tmp_path / "model.pt", data=DataConfig(),
                        data_dir=data_dir, calib_batches=2, log=lambda _: None)
    assert pruner.shapes == [(64, 3, 16, 16)] * 2  # 1x8x8 digits, grey repeated to RGB and resized
    assert report["model"] == "resnet20" and report["input_shape"] == [3, 16, 16]


def test_fit_inputs_converts_channels_and_size() -> None:
    assert fit_inputs(torch.ones(2, 3, 8, 8), (1, 4, 4)).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="2 channels and the model takes 3"):
        fit_inputs(torch.ones(2, 2, 8, 8), (3, 8, 8))
