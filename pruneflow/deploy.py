"""Deployment platforms: which files a device gets, writing and checking them, and which pruned model to ship.

A platform profile (``export.platform``, ``pruneflow.profiles``) lists the formats its runtime loads, the ONNX opset
it reads and the ONNX Runtime execution providers of its hardware. Each format is an entry of ``FORMATS``: its
file, how it is written and how it is checked before it counts: fp32 ONNX and TorchScript against PyTorch within
``export.atol`` and ``export.rtol`` (NaN or Inf fails), fp16 within ``export.fp16_rtol`` of the output scale, int8
by its test-set metric (accuracy, or PSNR). Latency is measured where this machine can: int8 beside fp32 on the
CPU, and on the platform's GPU providers if this onnxruntime has them; otherwise the result says it was skipped.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tabulate import tabulate
from torch import nn

from pruneflow.checkpoint import ModelSpec
from pruneflow.config import PipelineConfig
from pruneflow.data import DataSplits
from pruneflow.export import (
    CPU,
    ProviderUnavailable,
    check_parity,
    export_onnx,
    export_torchscript,
    file_scores,
    measure_latency,
)
from pruneflow.profiles import PROFILES, PlatformProfile
from pruneflow.quantize import convert_fp16, quantize_int8
from pruneflow.registry import Registry
from pruneflow.task import TASKS, Batches


@dataclass
class Export:
    """What writing and checking a platform's files reads: the model, its data and settings, the files written so
    far."""

    model: nn.Module
    spec: ModelSpec
    splits: DataSplits
    cfg: PipelineConfig
    latency_inputs: dict[str, np.ndarray]  # real test batches keyed by metric-name suffix ('' and '_b<N>')
    files: dict[str, Path] = field(default_factory=dict)

    def parity_batches(self) -> Batches:
        return self.splits.loader("test", 64, max_batches=self.cfg.export.parity_batches)


@dataclass(frozen=True)
class ExportFormat:
    """One kind of file a platform can get: its name, how it is written and how it is checked before it counts."""

    file: str  # the file's name in export/<platform>/
    description: str  # the report's format column
    write: Callable[[Export, Path], Path]
    check: Callable[[Export, Path], dict[str, float]]  # the check's figures; it raises when the file fails it
    summary: Callable[[dict[str, float], PipelineConfig], str]  # the report's check column, from those figures
    device_infix: str | None = None  # an ONNX file timed on the platform's GPU providers: its latency metrics' infix


FORMATS: Registry[ExportFormat] = Registry("export format")


def _exact_check(metric: str) -> Callable[[Export, Path], dict[str, float]]:
    """The check of an fp32 file: its outputs within ``export.atol``/``export.rtol`` of PyTorch's on real test
    images, none NaN or Inf."""
    return lambda job, path: {metric: check_parity(path, job.model, job.parity_batches(), job.cfg.export.atol,
                                                   job.cfg.export.rtol)}


def _exact_summary(metric: str) -> Callable[[dict[str, float], PipelineConfig], str]:
    return lambda m, cfg: (f"max abs diff vs PyTorch {m.get(metric, float('nan')):.3g} "
                           f"(export.atol {cfg.export.atol:g}, export.rtol {cfg.export.rtol:g})")


def _check_fp16(job: Export, path: Path) -> dict[str, float]:
    return {"fp16_max_abs_diff": check_parity(path, job.model, job.parity_batches(), rtol=job.cfg.export.fp16_rtol,
                                              keys=("", "export.fp16_rtol"))}


def _write_int8(job: Export, path: Path) -> Path:
    calibration = job.splits.loader("train", job.cfg.data.batch_size, max_batches=job.cfg.export.calib_batches)
    return quantize_int8(job.files["onnx"], path, job.cfg.export.int8_mode, calibration)


def _check_int8(job: Export, path: Path) -> dict[str, float]:
    """The task's main metric on the test set (int8_accuracy / int8_psnr) and its drop against the fp32 ONNX file,
    then int8's latency and speed-up over fp32 at each latency batch."""
    evaluate, metric = job.cfg.evaluate, TASKS[job.cfg.task].metric
    test = job.splits.loader("test", 256)
    int8 = file_scores(path, test, evaluate.threads)[metric]
    fp32 = file_scores(job.files["onnx"], test, evaluate.threads)[metric]
    figures = {f"int8_{metric}": int8, f"int8_{metric}_drop": fp32 - int8}
    for suffix, inputs in job.latency_inputs.items():
        timing = measure_latency({"fp32": job.files["onnx"], "int8": path}, inputs, evaluate.latency_warmup,
                                 evaluate.latency_repeats, evaluate.threads)
        figures[f"int8_latency_ms{suffix}"] = timing["int8"].median_ms
        figures[f"int8_speedup{suffix}"] = timing["fp32"].median_ms / timing["int8"].median_ms
    return figures


def _int8_summary(m: dict[str, float], cfg: PipelineConfig) -> str:
    task = TASKS[cfg.task]
    change = -m.get(f"int8_{task.metric}_drop", float("nan"))  # int8 − fp32: negative when int8 is worse
    return (f"{cfg.export.int8_mode}; test {task.metric} {m.get(f'int8_{task.metric}', float('nan')):.2f} {task.unit} "
            f"({change:+.2f} vs fp32 ONNX)")


FORMATS.register("onnx")(ExportFormat(
    "model.onnx", "ONNX fp32",
    lambda job, path: export_onnx(job.model, job.spec.example_inputs(), path, job.cfg.export.opset),
    _exact_check("onnx_max_abs_diff"), _exact_summary("onnx_max_abs_diff"), device_infix=""))
FORMATS.register("onnx_fp16")(ExportFormat(
    "model.fp16.onnx", "ONNX fp16 (float32 inputs/outputs)",
    lambda job, path: convert_fp16(job.files["onnx"], path), _check_fp16,
    lambda m, cfg: (f"max abs diff vs PyTorch {m.get('fp16_max_abs_diff', float('nan')):.3g} "
                    f"(export.fp16_rtol {cfg.export.fp16_rtol:g} of the output scale)"),
    device_infix="fp16_"))
FORMATS.register("torchscript")(ExportFormat(
    "model.torchscript.pt", "TorchScript (torch.jit.trace)",
    lambda job, path: export_torchscript(job.model, job.spec.example_inputs(), path),
    _exact_check("torchscript_max_abs_diff"), _exact_summary("torchscript_max_abs_diff")))
FORMATS.register("onnx_int8")(ExportFormat(
    "model.int8.onnx", "ONNX int8 (QDQ)", _write_int8, _check_int8, _int8_summary))


@dataclass
class Deployment:
    """What an export wrote for one platform: files by format, their checks and timings, and where it measured."""

    platform: str
    files: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    device_latency: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"platform": self.platform, "files": self.files, "device_latency": self.device_latency, **self.metrics}


def export_for_platform(model: nn.Module, spec: ModelSpec, splits: DataSplits, cfg: PipelineConfig, folder: Path,
                  latency_inputs: dict[str, np.ndarray], log: Callable[[str], None]) -> Deployment:
    """Write and check every format of ``export.platform`` into ``folder``; on any failure remove the folder
    (no file that looks like a good export is left) and raise.

    ``latency_inputs`` are real test batches keyed by metric-name suffix ('' and '_b<N>').
    """
    shutil.rmtree(folder, ignore_errors=True)
    try:
        return _write_and_check(Export(model, spec, splits, cfg, latency_inputs), folder, log)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _write_and_check(job: Export, folder: Path, log: Callable[[str], None]) -> Deployment:
    """Each format of the profile in its order ("onnx" first: the others are made from it), written then checked."""
    platform = job.cfg.export.platform
    profile = PROFILES[platform]
    deployment = Deployment(platform)
    for name in profile.formats:
        export_format = FORMATS.get(name)
        job.files[name] = export_format.write(job, folder / export_format.file)
        deployment.metrics.update(export_format.check(job, job.files[name]))
    deployment.device_latency = _measure_on_device(profile, job, deployment.metrics)
    deployment.files = {name: str(path) for name, path in job.files.items()}
    log(f"export ({platform}): {', '.join(path.name for path in job.files.values())} checked; "
        f"device latency: {deployment.device_latency}")
    return deployment


def _measure_on_device(profile: PlatformProfile, job: Export, metrics: dict[str, float]) -> str:
    """Time the platform's ONNX files on each of its providers this machine has; say what happened.

    The metrics are named by the provider (``cuda_``, ``tensorrt_``) and the format's infix (``fp16_``)."""
    if not profile.device_providers:
        return f"not applicable: the {job.cfg.export.platform} platform is timed on {CPU}"
    evaluate = job.cfg.evaluate
    onnx_files = {name: path for name, path in job.files.items() if FORMATS.get(name).device_infix is not None}
    measured, missing = [], []
    for provider in profile.device_providers:
        prefix = provider.removesuffix("ExecutionProvider").lower()
        try:
            for suffix, inputs in job.latency_inputs.items():
                timing = measure_latency(onnx_files, inputs, evaluate.latency_warmup, evaluate.latency_repeats,
                                         evaluate.threads, provider)
                for name, latency in timing.items():
                    metrics[f"{prefix}_{FORMATS.get(name).device_infix}latency_ms{suffix}"] = latency.median_ms
        except ProviderUnavailable as err:
            missing.append(str(err))
            continue
        measured.append(provider)
    if measured:
        return f"measured on {', '.join(measured)}"
    return f"skipped: {'; '.join(missing)} (available: {', '.join(ort.get_available_providers())})"


def report(deployment: Deployment, cfg: PipelineConfig) -> str:
    """export/<platform>/report.md: each file, how it was checked, and where its latency was (or was not) measured."""
    m = deployment.metrics
    lines = [f"# Export for platform `{deployment.platform}` (opset {cfg.export.opset})", "",
             tabulate([[Path(path).name, FORMATS.get(name).description, FORMATS.get(name).summary(m, cfg)]
                       for name, path in deployment.files.items()],
                      ["file", "format", "check"], tablefmt="github", disable_numparse=True)]
    timings = {key: value for key, value in m.items() if "latency_ms" in key or "speedup" in key}
    if timings:
        lines += ["", f"Latency: ONNX Runtime, {cfg.evaluate.threads} threads, "
                      f"median of {cfg.evaluate.latency_repeats} interleaved runs on real test images "
                      "(int8_speedup: fp32 ONNX ÷ int8, same pruned model).", "",
                  tabulate([[key, f"{value:.4g}"] for key, value in timings.items()], ["metric", "value"],
                           tablefmt="github", disable_numparse=True)]
    lines += ["", f"Device latency: {deployment.device_latency}."]
    return "\n".join(lines) + "\n"


def choose_champion(results: dict[str, dict[str, Any]], max_drop: float,
                    metric: str = "accuracy") -> tuple[str | None, str]:
    """The method whose model is registered, and why, in one line: the fastest (``speedup``) of those within
    ``max_drop`` of the baseline's ``metric`` (accuracy points, PSNR dB); ties go to the method listed first.

    None when no model is within ``max_drop`` (a NaN drop is not): a model that lost more is no champion, however
    the others did, so nothing is registered and the registry's ``champion`` stays where it was. ``results`` hold
    only methods whose every stage, and so every sanity gate, passed.
    """
    if not results:
        raise ValueError("no method results to choose a model from")
    within = [method for method, metrics in results.items() if metrics[f"{metric}_drop"] <= max_drop]
    if within:
        method = max(within, key=lambda method: results[method]["speedup"])
        return method, f"the fastest of {len(within)} model(s) within export.registry_max_drop={max_drop:g}"
    drops = ", ".join(f"{method} {metrics[f'{metric}_drop']:.2f}" for method, metrics in results.items())
    return None, (f"no model is within export.registry_max_drop={max_drop:g} of the baseline's {metric} (drops: "
                  f"{drops}), so none is registered: prune less, retrain longer or raise export.registry_max_drop")


def registered_model_name(cfg: PipelineConfig) -> str:
    """``export.registered_model``, else ``pruneflow-<model>`` with the characters a ``models:/`` URI cannot hold
    replaced."""
    return cfg.export.registered_model or "pruneflow-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.model.name)
