"""Exported files (ONNX, TorchScript), their parity check against PyTorch, and latency measured in ONNX Runtime.

Latency is the one helper every stage and benchmark uses: fixed threads, warm-up, interleaved repeats (so the
files compared see the same machine state), median and p90.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from pruneflow.task import Batches, mean_scores

CPU = "CPUExecutionProvider"
DYNAMO_MIN_OPSET = 18  # the dynamo exporter cannot write older opsets (it silently keeps 18)

Predict = Callable[[np.ndarray], np.ndarray]


class ExportError(RuntimeError):
    """The exported file does not reproduce the PyTorch model."""


class ProviderUnavailable(RuntimeError):
    """This onnxruntime cannot run on the requested execution provider (no GPU build, no device, no libraries)."""


@contextlib.contextmanager
def _deprecated_exporters() -> Iterator[None]:
    """Silence the deprecation warnings of TorchScript and the legacy ONNX exporter, which are used on purpose:
    TorchScript is a deployment format of its own, and the legacy exporter is the one that writes opset < 18."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
        yield


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: Path, opset: int = 18) -> Path:
    """Export with a dynamic batch axis: the dynamo exporter (torch.onnx's default) for opset >= 18, the legacy
    TorchScript-based exporter below (older runtimes such as TensorRT 8.5 read opset 17 at most).

    The file's opset is checked, so a request the exporter cannot honour fails instead of shipping another one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    tmp = path.with_name(path.name + ".partial")
    if opset >= DYNAMO_MIN_OPSET:
        batch = torch.export.Dim("batch", min=1)
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
            program = torch.onnx.export(model, (example_inputs,), dynamic_shapes=({0: batch},), opset_version=opset,
                                        dynamo=True, verbose=False)
        program.save(str(tmp))
    else:
        with _deprecated_exporters():
            torch.onnx.export(model, (example_inputs,), str(tmp), opset_version=opset, dynamo=False,
                              input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    written = onnx_opset(tmp)
    if written != opset:
        tmp.unlink()
        raise ExportError(f"{path}: asked for ONNX opset {opset}, the exporter wrote {written} (export.opset)")
    tmp.replace(path)
    return path


def onnx_opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def export_torchscript(model: nn.Module, example_inputs: torch.Tensor, path: Path) -> Path:
    """``torch.jit.trace``: the nets here have no data-dependent control flow, so a trace is the whole model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with _deprecated_exporters(), torch.no_grad():
        torch.jit.trace(model.eval(), example_inputs).save(str(tmp))
    tmp.replace(path)
    return path


def session(path: Path, threads: int = 2, provider: str = CPU) -> ort.InferenceSession:
    """An ONNX Runtime session on ``provider`` (CPU fallback for nodes it lacks); raises if the provider is absent.

    Intra-op threads do not spin between runs: a spinning pool steals cores from the next session measured in
    the interleaved loop, which on a 2-core machine skews the comparison more than the wake-up costs.
    """
    available = ort.get_available_providers()
    if provider not in available:
        raise ProviderUnavailable(f"{provider} is not in this onnxruntime build")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    chain = [provider] + (["CUDAExecutionProvider"] if provider == "TensorrtExecutionProvider" else [])
    runtime = ort.InferenceSession(str(path), options, providers=list(dict.fromkeys([*chain, CPU])))
    if provider not in runtime.get_providers():  # ORT falls back to CPU when a GPU provider fails to load
        raise ProviderUnavailable(f"{provider} is built in but failed to start (no device or libraries?)")
    return runtime


def predictor(path: Path, threads: int = 2) -> Predict:
    """A numpy-in, numpy-out function for an exported file: ``.onnx`` through ONNX Runtime, else TorchScript."""
    if path.suffix == ".onnx":
        runtime = session(path, threads)
        name = runtime.get_inputs()[0].name
        return lambda images: runtime.run(None, {name: images})[0]
    with _deprecated_exporters():
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(images)).numpy()
    return run


@torch.no_grad()
def output_gap(path: Path, model: nn.Module, batches: Batches) -> tuple[float, float]:
    """Largest |file − PyTorch| over real input batches, and the largest |PyTorch output| (its scale)."""
    model.eval()
    predict = predictor(path)
    worst = scale = 0.0
    for images, _ in batches:
        expected = model(images).numpy()
        worst = max(worst, float(np.abs(predict(images.numpy()) - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
    return worst, scale


def onnx_max_abs_diff(path: Path, model: nn.Module, batches: Batches) -> float:
    return output_gap(path, model, batches)[0]


def check_parity(path: Path, model: nn.Module, batches: Batches, atol: float | None = None, *,
                 rtol: float | None = None, key: str = "export.atol") -> float:
    """Return the largest |file − PyTorch| on real inputs; raise past ``atol``, or past ``rtol`` × the largest
    |PyTorch output| (reduced precision errs in proportion to the values, so fp16 is held to a relative bound).
    ``key`` names the params key in the message, so the user knows what to change."""
    if (atol is None) == (rtol is None):
        raise ValueError("give exactly one of atol and rtol")
    diff, scale = output_gap(path, model, batches)
    bound, rule = (atol, f"{key}={atol:g}") if rtol is None else (rtol * scale, f"{key}={rtol:g} x max|output| {scale:.3g}")
    if not diff <= bound:
        raise ExportError(f"{path}: output differs from PyTorch by {diff:.3g} on real inputs, more than {rule}")
    return diff


def file_scores(path: Path, batches: Batches, threads: int = 2) -> dict[str, float]:
    """The task's metrics (accuracy; PSNR and SSIM) of an exported file, run the way it will be deployed."""
    predict = predictor(path, threads)
    return mean_scores(batches, lambda images: torch.from_numpy(predict(images.numpy())))


def accuracy(path: Path, batches: Batches, threads: int = 2) -> float:
    """Top-1 accuracy (percent) of an exported classifier, run the way it will be deployed."""
    return file_scores(path, batches, threads)["accuracy"]


@dataclass
class Latency:
    median_ms: float
    p90_ms: float


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op thread count is process-wide: set it only while PyTorch is timed, then restore it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _runner(target: Path | nn.Module, inputs: np.ndarray, threads: int, provider: str) -> Callable[[], object]:
    if isinstance(target, nn.Module):
        module, tensor = target.eval(), torch.from_numpy(inputs)

        def run() -> object:
            with torch.inference_mode():
                return module(tensor)
        return run
    runtime = session(target, threads, provider)
    feed = {runtime.get_inputs()[0].name: inputs}
    return lambda: runtime.run(None, feed)


def measure_latency(targets: dict[str, Path | nn.Module], inputs: np.ndarray, warmup: int = 10, repeats: int = 50,
                    threads: int = 2, provider: str = CPU) -> dict[str, Latency]:
    """Time each target on the same input, alternating between targets every repeat.

    A path is an ONNX file run by ONNX Runtime on ``provider``; a module runs in PyTorch eager on the CPU with
    the same number of threads (to set the runtime beside the framework).
    """
    eager = any(isinstance(target, nn.Module) for target in targets.values())
    with _torch_threads(threads) if eager else contextlib.nullcontext():
        runners = {name: _runner(target, inputs, threads, provider) for name, target in targets.items()}
        for run in runners.values():
            for _ in range(warmup):
                run()
        samples: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(repeats):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: Latency(statistics.median(times), float(np.percentile(times, 90))) for name, times in samples.items()}
