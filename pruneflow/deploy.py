"""Deployment targets: which files a device gets, writing and checking them, and which pruned model to ship.

A target profile (``export.target``) lists the formats its runtime loads and the ONNX Runtime execution
providers of its hardware (its opset is ``export.opset``'s default). Every file is checked before it counts:
fp32 ONNX and TorchScript against PyTorch within ``export.atol``, fp16 within ``export.fp16_rtol`` of the output
scale, int8 by its test-set metric (accuracy, or PSNR). Latency is measured where this machine can: int8 beside fp32 on the CPU,
and on the target's GPU providers if this onnxruntime has them; otherwise the result says it was skipped.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
from tabulate import tabulate
from torch import nn

from pruneflow.checkpoint import ModelSpec
from pruneflow.config import PipelineConfig
from pruneflow.data import DataSplits
from pruneflow.export import (CPU, ProviderUnavailable, check_parity, export_onnx, export_torchscript, file_scores,
                              measure_latency)
from pruneflow.quantize import convert_fp16, quantize_int8
from pruneflow.task import TASKS

FILES = {"onnx": "model.onnx", "onnx_fp16": "model.fp16.onnx", "onnx_int8": "model.int8.onnx",
         "torchscript": "model.torchscript.pt"}
DESCRIPTIONS = {"onnx": "ONNX fp32", "onnx_fp16": "ONNX fp16 (float32 inputs/outputs)",
                "onnx_int8": "ONNX int8 (QDQ)", "torchscript": "TorchScript (torch.jit.trace)"}
GPU_METRIC_PREFIX = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}


@dataclass(frozen=True)
class TargetProfile:
    formats: tuple[str, ...]
    device_providers: tuple[str, ...] = ()  # the hardware's providers, tried in order; the CPU is always measured


PROFILES = {
    "cpu": TargetProfile(("onnx", "onnx_int8")),
    "jetson": TargetProfile(("onnx", "onnx_fp16", "torchscript"), ("TensorrtExecutionProvider", "CUDAExecutionProvider")),
    "generic-gpu": TargetProfile(("onnx", "onnx_fp16"), ("CUDAExecutionProvider", "TensorrtExecutionProvider")),
}


@dataclass
class Deployment:
    """What an export wrote for one target: files by format, their checks and timings, and where it measured."""

    target: str
    files: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    device_latency: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "files": self.files, "device_latency": self.device_latency, **self.metrics}


def export_target(model: nn.Module, spec: ModelSpec, splits: DataSplits, cfg: PipelineConfig, folder: Path,
                  latency_inputs: dict[str, np.ndarray], log: Callable[[str], None]) -> Deployment:
    """Write and check every format of ``export.target`` into ``folder``; on any failure remove the folder
    (no file that looks like a good export is left) and raise.

    ``latency_inputs`` are real test batches keyed by metric-name suffix ('' and '_b<N>').
    """
    shutil.rmtree(folder, ignore_errors=True)
    try:
        return _write_and_check(model, spec, splits, cfg, folder, latency_inputs, log)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _write_and_check(model: nn.Module, spec: ModelSpec, splits: DataSplits, cfg: PipelineConfig, folder: Path,
                     latency_inputs: dict[str, np.ndarray], log: Callable[[str], None]) -> Deployment:
    export, evaluate = cfg.export, cfg.evaluate
    profile = PROFILES[export.target]
    deployment = Deployment(export.target)
    files: dict[str, Path] = {}

    def parity():
        return splits.loader("test", 64, max_batches=export.parity_batches)

    files["onnx"] = export_onnx(model, spec.example_inputs(), folder / FILES["onnx"], export.opset)
    deployment.metrics["onnx_max_abs_diff"] = check_parity(files["onnx"], model, parity(), export.atol)
    if "onnx_fp16" in profile.formats:
        files["onnx_fp16"] = convert_fp16(files["onnx"], folder / FILES["onnx_fp16"])
        deployment.metrics["fp16_max_abs_diff"] = check_parity(files["onnx_fp16"], model, parity(),
                                                               rtol=export.fp16_rtol, key="export.fp16_rtol")
    if "torchscript" in profile.formats:
        files["torchscript"] = export_torchscript(model, spec.example_inputs(), folder / FILES["torchscript"])
        deployment.metrics["torchscript_max_abs_diff"] = check_parity(files["torchscript"], model, parity(), export.atol)
    if "onnx_int8" in profile.formats:
        calibration = splits.loader("train", cfg.data.batch_size, max_batches=export.calib_batches)
        files["onnx_int8"] = quantize_int8(files["onnx"], folder / FILES["onnx_int8"], export.int8_mode, calibration)
        test = splits.loader("test", 256)
        metric = TASKS[cfg.task].metric  # int8_accuracy[_drop] / int8_psnr[_drop], the drop vs fp32 ONNX
        int8 = file_scores(files["onnx_int8"], test, evaluate.threads)[metric]
        deployment.metrics.update({f"int8_{metric}": int8, f"int8_{metric}_drop":
                                   file_scores(files["onnx"], test, evaluate.threads)[metric] - int8})
        for suffix, inputs in latency_inputs.items():
            timing = measure_latency({"fp32": files["onnx"], "int8": files["onnx_int8"]}, inputs,
                                     evaluate.latency_warmup, evaluate.latency_repeats, evaluate.threads)
            deployment.metrics[f"int8_latency_ms{suffix}"] = timing["int8"].median_ms
            deployment.metrics[f"int8_speedup{suffix}"] = timing["fp32"].median_ms / timing["int8"].median_ms
    deployment.device_latency = _measure_on_device(profile, files, latency_inputs, cfg, deployment.metrics)
    deployment.files = {fmt: str(path) for fmt, path in files.items()}
    log(f"export ({export.target}): {', '.join(path.name for path in files.values())} checked; "
        f"device latency: {deployment.device_latency}")
    return deployment


def _measure_on_device(profile: TargetProfile, files: dict[str, Path], latency_inputs: dict[str, np.ndarray],
                       cfg: PipelineConfig, metrics: dict[str, float]) -> str:
    """Time the fp32/fp16 ONNX files on each of the target's providers this machine has; say what happened."""
    if not profile.device_providers:
        return f"not applicable: the {cfg.export.target} target is timed on {CPU}"
    evaluate = cfg.evaluate
    onnx_files = {fmt: files[fmt] for fmt in ("onnx", "onnx_fp16") if fmt in files}
    measured, missing = [], []
    for provider in profile.device_providers:
        prefix = GPU_METRIC_PREFIX[provider]
        try:
            for suffix, inputs in latency_inputs.items():
                timing = measure_latency(onnx_files, inputs, evaluate.latency_warmup, evaluate.latency_repeats,
                                         evaluate.threads, provider)
                for fmt, latency in timing.items():
                    precision = "fp16_" if fmt == "onnx_fp16" else ""
                    metrics[f"{prefix}_{precision}latency_ms{suffix}"] = latency.median_ms
        except ProviderUnavailable as err:
            missing.append(str(err))
            continue
        measured.append(provider)
    if measured:
        return f"measured on {', '.join(measured)}"
    return f"skipped: {'; '.join(missing)} (available: {', '.join(ort.get_available_providers())})"


def report(deployment: Deployment, cfg: PipelineConfig) -> str:
    """export/<target>/report.md: each file, how it was checked, and where its latency was (or was not) measured."""
    m, task = deployment.metrics, TASKS[cfg.task]
    checks = {
        "onnx": f"max abs diff vs PyTorch {m.get('onnx_max_abs_diff', float('nan')):.3g} (export.atol {cfg.export.atol:g})",
        "onnx_fp16": f"max abs diff vs PyTorch {m.get('fp16_max_abs_diff', float('nan')):.3g} "
                     f"(export.fp16_rtol {cfg.export.fp16_rtol:g} of the output scale)",
        "torchscript": f"max abs diff vs PyTorch {m.get('torchscript_max_abs_diff', float('nan')):.3g} "
                       f"(export.atol {cfg.export.atol:g})",
        "onnx_int8": f"{cfg.export.int8_mode}; test {task.metric} {m.get(f'int8_{task.metric}', float('nan')):.2f} "
                     f"{task.unit} ({m.get(f'int8_{task.metric}_drop', float('nan')):+.2f} vs fp32 ONNX)",
    }
    lines = [f"# Export for target `{deployment.target}` (opset {cfg.export.opset})", "",
             tabulate([[Path(path).name, DESCRIPTIONS[fmt], checks[fmt]] for fmt, path in deployment.files.items()],
                      ["file", "format", "check"], tablefmt="github", disable_numparse=True)]
    timings = {key: value for key, value in m.items() if "latency_ms" in key or "speedup" in key}
    if timings:
        lines += ["", f"Latency: ONNX Runtime, {cfg.evaluate.threads} threads, median of {cfg.evaluate.latency_repeats} "
                      "interleaved runs on real test images (int8_speedup: fp32 ONNX ÷ int8, same pruned model).", "",
                  tabulate([[key, f"{value:.4g}"] for key, value in timings.items()], ["metric", "value"],
                           tablefmt="github", disable_numparse=True)]
    lines += ["", f"Device latency: {deployment.device_latency}."]
    return "\n".join(lines) + "\n"


def choose_champion(results: dict[str, dict[str, Any]], max_drop: float, metric: str = "accuracy") -> str:
    """The method whose model is registered: the fastest (``speedup``) of those within ``max_drop`` of the
    baseline's ``metric`` (accuracy points, PSNR dB), else (none is) the best by ``metric``. Ties go to the
    method listed first."""
    if not results:
        raise ValueError("no method results to choose a model from")
    within = [method for method, metrics in results.items() if metrics[f"{metric}_drop"] <= max_drop]
    if within:
        return max(within, key=lambda method: results[method]["speedup"])
    return max(results, key=lambda method: results[method][metric])


def registered_model_name(cfg: PipelineConfig) -> str:
    """``export.registered_model``, else ``pruneflow-<model>`` with characters a ``models:/`` URI cannot hold replaced."""
    return cfg.export.registered_model or "pruneflow-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.model.name)
