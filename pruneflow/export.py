"""ONNX export, its parity check against PyTorch, and latency measured in ONNX Runtime.

Latency is the one helper every stage uses: fixed threads, warm-up, interleaved repeats (so baseline
and pruned see the same machine state), median and p90.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnxruntime as ort
import torch
from torch import nn


class ExportError(RuntimeError):
    """The exported file does not reproduce the PyTorch model."""


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: Path, opset: int = 18) -> Path:
    """Export with a dynamic batch axis through the dynamo exporter (torch.onnx's default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
        program = torch.onnx.export(model, (example_inputs,), dynamic_shapes=({0: batch},), opset_version=opset,
                                    dynamo=True, verbose=False)
    tmp = path.with_name(path.name + ".partial")
    program.save(str(tmp))
    tmp.replace(path)
    return path


def session(path: Path, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def onnx_max_abs_diff(path: Path, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Largest |ONNX Runtime − PyTorch| over real input batches."""
    model.eval()
    runtime = session(path)
    input_name = runtime.get_inputs()[0].name
    worst = 0.0
    for images, _ in batches:
        expected = model(images).numpy()
        (actual,) = runtime.run(None, {input_name: images.numpy()})
        worst = max(worst, float(np.abs(actual - expected).max()))
    return worst


def check_parity(path: Path, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 atol: float) -> float:
    diff = onnx_max_abs_diff(path, model, batches)
    if not diff <= atol:
        raise ExportError(f"{path}: ONNX output differs from PyTorch by {diff:.3g} > export.atol={atol:g}")
    return diff


@dataclass
class Latency:
    median_ms: float
    p90_ms: float


def measure_latency(paths: dict[str, Path], inputs: np.ndarray, warmup: int = 10, repeats: int = 50,
                    threads: int = 2) -> dict[str, Latency]:
    """Time each ONNX file on the same input, alternating between files every repeat."""
    runtimes = {name: session(path, threads) for name, path in paths.items()}
    feeds = {name: {rt.get_inputs()[0].name: inputs} for name, rt in runtimes.items()}
    for name, runtime in runtimes.items():
        for _ in range(warmup):
            runtime.run(None, feeds[name])
    samples: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(repeats):
        for name, runtime in runtimes.items():
            start = time.perf_counter()
            runtime.run(None, feeds[name])
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: Latency(statistics.median(times), float(np.percentile(times, 90))) for name, times in samples.items()}
