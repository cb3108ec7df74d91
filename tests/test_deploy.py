"""Export targets on a quickly trained digits CNN: int8 keeps its accuracy, fp16 and TorchScript match PyTorch,
a failed check leaves nothing behind; the champion choice; the latency helper beside PyTorch eager."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from pruneflow import stages
from pruneflow.checkpoint import ModelSpec, save_model
from pruneflow.config import PipelineConfig, TrainConfig
from pruneflow.deploy import choose_champion, registered_model_name
from pruneflow.export import ExportError, accuracy, export_onnx, measure_latency
from pruneflow.layout import ProjectLayout, ProjectRun
from pruneflow.methods import create_method
from pruneflow.plan import PrunePlan
from pruneflow.quantize import quantize_int8
from pruneflow.training import train
from pruneflow.versioning import DataVersion

INT8_MAX_DROP = 2.0  # points of test accuracy static int8 may lose against fp32 ONNX (measured: 0 on digits)


def config(**export) -> PipelineConfig:
    return PipelineConfig(evaluate={"latency_repeats": 3, "latency_warmup": 1}, export=export)


def export(cfg: PipelineConfig, retrained: Path, digits_dir: Path, **log) -> dict:
    """The export stage, run on the method folder that holds ``retrained``."""
    folder = retrained.parent
    run = ProjectRun(ProjectLayout(folder, cfg), DataVersion(digits_dir, "digits"), folder, folder.parent)
    return stages.export_model(run.method_run(folder.name), **log).as_dict()


@pytest.fixture(scope="module")
def retrained(digits_dir, tmp_path_factory) -> Path:
    """A small CNN trained on digits, pruned by l1 (uneven widths, as a pipeline's) and fine-tuned."""
    splits = stages.load_data(config(), digits_dir)
    spec = ModelSpec("small_cnn", splits.in_channels, splits.num_classes, splits.input_shape, {}, splits.mean,
                     splits.std)
    torch.manual_seed(0)
    model = spec.build()
    train(model, splits.loader("train", 64, shuffle=True), TrainConfig(epochs=3))
    result = create_method("l1").prune(model, spec.example_inputs(), PrunePlan(ratio=0.3, round_to=None))
    train(model, splits.loader("train", 64, shuffle=True), TrainConfig(epochs=1, lr=0.01))
    return save_model(tmp_path_factory.mktemp("method") / "retrained.pt", model, spec, result.history)


@pytest.fixture(scope="module")
def cpu_export(retrained, digits_dir) -> dict:
    return export(config(platform="cpu"), retrained, digits_dir, log=print)


def test_cpu_target_writes_a_static_int8_model_that_keeps_its_accuracy(cpu_export, retrained):
    folder = retrained.parent / "export" / "cpu"
    assert set(cpu_export["files"]) == {"onnx", "onnx_int8"}
    assert cpu_export["onnx_max_abs_diff"] < 1e-4
    assert cpu_export["int8_accuracy"] > 90
    assert cpu_export["int8_accuracy_drop"] <= INT8_MAX_DROP
    assert {"int8_latency_ms", "int8_latency_ms_b32", "int8_speedup", "int8_speedup_b32"} <= set(cpu_export)
    assert "QuantizeLinear" in {node.op_type for node in onnx.load(cpu_export["files"]["onnx_int8"]).graph.node}
    assert (folder / "report.md").is_file() and (folder / "export.json").is_file()
    assert "not applicable" in cpu_export["device_latency"]


def test_dynamic_int8_needs_no_calibration_and_keeps_its_accuracy(cpu_export, digits_dir, tmp_path):
    test = stages.load_data(config(), digits_dir).loader("test", 256)
    path = quantize_int8(Path(cpu_export["files"]["onnx"]), tmp_path / "dynamic.onnx", "dynamic")
    assert "DynamicQuantizeLinear" in {node.op_type for node in onnx.load(path).graph.node}
    assert accuracy(Path(cpu_export["files"]["onnx"]), test) - accuracy(path, test) <= INT8_MAX_DROP


def test_jetson_target_writes_fp16_and_torchscript_that_match_pytorch(retrained, digits_dir):
    result = export(config(platform="jetson"), retrained, digits_dir, log=print)
    assert set(result["files"]) == {"onnx", "onnx_fp16", "torchscript"}
    assert onnx.load(result["files"]["onnx"]).opset_import[0].version == 17  # TensorRT 8.5's ceiling
    assert result["torchscript_max_abs_diff"] < 1e-4
    assert 0 < result["fp16_max_abs_diff"] < 0.05
    fp16_types = {init.data_type for init in onnx.load(result["files"]["onnx_fp16"]).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in fp16_types
    report = (Path(result["files"]["onnx"]).parent / "report.md").read_text()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert result["device_latency"].startswith("skipped: ")
        assert "Device latency: skipped" in report


def test_a_zero_fp16_tolerance_fails_the_export_and_leaves_no_files(retrained, digits_dir):
    folder = retrained.parent / "export" / "generic-gpu"
    with pytest.raises(ExportError, match=r"model.fp16.onnx: output differs from PyTorch by .* export.fp16_rtol=0"):
        export(config(platform="generic-gpu", fp16_rtol=0), retrained, digits_dir)
    assert not folder.exists()


def test_measure_latency_times_onnx_and_pytorch_eager_on_one_input(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU()).eval()
    path = export_onnx(model, torch.zeros(2, 1, 8, 8), tmp_path / "m.onnx")
    threads = torch.get_num_threads()
    timing = measure_latency({"onnx": path, "eager": model}, torch.randn(4, 1, 8, 8).numpy(), warmup=1, repeats=3)
    assert set(timing) == {"onnx", "eager"}
    assert all(0 < t.median_ms <= t.p90_ms for t in timing.values())
    assert torch.get_num_threads() == threads  # the helper restores PyTorch's thread count


def test_champion_is_the_fastest_within_the_drop_else_none():
    results = {"l1": {"accuracy": 98.0, "accuracy_drop": 0.5, "speedup": 1.6},
               "random": {"accuracy": 97.0, "accuracy_drop": 1.5, "speedup": 2.4},
               "slimming": {"accuracy": 98.4, "accuracy_drop": 0.1, "speedup": 1.9}}
    assert choose_champion(results, max_drop=1.0)[0] == "slimming"
    assert choose_champion(results, max_drop=2.0)[0] == "random"
    lost = {"l1": {"accuracy": 18.0, "accuracy_drop": 79.0, "speedup": 3.0},
            "slimming": {"accuracy": float("nan"), "accuracy_drop": float("nan"), "speedup": 2.0}}
    method, reason = choose_champion(lost, max_drop=1.0)  # a model that lost 79 points is no champion
    assert method is None
    assert reason.startswith("no model is within export.registry_max_drop=1 of the baseline's accuracy "
                             "(drops: l1 79.00, slimming nan), so none is registered")
    with pytest.raises(ValueError, match="no method results"):
        choose_champion({}, max_drop=1.0)


def test_registered_model_name_defaults_to_the_model_and_is_uri_safe():
    assert registered_model_name(PipelineConfig()) == "pruneflow-small_cnn"
    torchvision = PipelineConfig(model={"name": "torchvision:resnet18"})
    assert registered_model_name(torchvision) == "pruneflow-torchvision-resnet18"
    assert registered_model_name(PipelineConfig(export={"registered_model": "digits-prod"})) == "digits-prod"
