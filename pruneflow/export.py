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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from pruneflow.files import replacing
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
    model = model.eval()
    with replacing(path) as tmp:
        if opset >= DYNAMO_MIN_OPSET:
            batch = torch.export.Dim("batch", min=1)
            with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
                program = torch.onnx.export(model, (example_inputs,), dynamic_shapes=({0: batch},),
                                            opset_version=opset, dynamo=True, verbose=False)
            assert program is not None  # dynamo=True returns the exported program
            program.save(str(tmp))
        else:
            with _deprecated_exporters():
                torch.onnx.export(model, (example_inputs,), str(tmp), opset_version=opset, dynamo=False,
                                  input_names=["x"], output_names=["logits"],
                                  dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
        written = onnx_opset(tmp)
        if written != opset:
            raise ExportError(f"{path}: asked for ONNX opset {opset}, the exporter wrote {written} (export.opset)")
    return path


def onnx_opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def export_torchscript(model: nn.Module, example_inputs: torch.Tensor, path: Path) -> Path:
    """``torch.jit.trace``: the nets here have no data-dependent control flow, so a trace is the whole model."""
    with replacing(path) as tmp, _deprecated_exporters(), torch.no_grad():
        torch.jit.trace(model.eval(), example_inputs).save(str(tmp))
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


class Gap(NamedTuple):
    """How an exported file's outputs compare with PyTorch's on real inputs."""

    diff: float  # the largest |file − PyTorch|; NaN when any output is NaN or infinite
    scale: float  # the largest |PyTorch output|
    torch_nonfinite: int  # NaN/Inf values PyTorch gave
    file_nonfinite: int  # NaN/Inf values the file gave


@torch.no_grad()
def output_gap(path: Path, model: nn.Module, batches: Batches) -> Gap:
    """Compare the file with PyTorch over real input batches. NaN compared with NaN is no agreement: the
    largest difference is then NaN, not the 0 that ``max`` would make of it."""
    model.eval()
    predict = predictor(path)
    worst = scale = 0.0
    torch_bad = file_bad = 0
    for images, _ in batches:
        expected = model(images).numpy()
        got = predict(images.numpy())
        torch_bad += int((~np.isfinite(expected)).sum())
        file_bad += int((~np.isfinite(got)).sum())
        if not torch_bad and not file_bad:
            worst = max(worst, float(np.abs(got - expected).max()))
            scale = max(scale, float(np.abs(expected).max()))
    return Gap(float("nan") if torch_bad or file_bad else worst, scale, torch_bad, file_bad)


def onnx_max_abs_diff(path: Path, model: nn.Module, batches: Batches) -> float:
    return output_gap(path, model, batches).diff


def check_parity(path: Path, model: nn.Module, batches: Batches, atol: float = 0.0, rtol: float = 0.0, *,
                 keys: tuple[str, str] = ("export.atol", "export.rtol")) -> float:
    """Return the largest |file − PyTorch| on real inputs; raise ExportError past ``atol·min(1, S) + rtol·S``,
    S the largest |PyTorch output|, or when either side gives NaN or Inf.

    Reduced precision and reordered sums err in proportion to the values, hence ``rtol``: logits of 7.7e3 may
    differ by 5e-3. The absolute part is for outputs of order one and shrinks with smaller ones: with a plain
    ``atol`` an untrained net's outputs of 1e-11 would pass whatever the file computed. ``keys`` name the
    params keys of ``atol`` and ``rtol`` in the message, so the user knows what to change.
    """
    gap = output_gap(path, model, batches)
    if gap.torch_nonfinite or gap.file_nonfinite:
        raise ExportError(f"{path}: outputs are not finite on real inputs (PyTorch gives {gap.torch_nonfinite} "
                          f"NaN/Inf values, the file {gap.file_nonfinite}): the model itself is broken (diverged "
                          "training?) or the file overflows")
    bound = atol * min(1.0, gap.scale) + rtol * gap.scale
    if not gap.diff <= bound:
        terms = [f"{key}={value:g}{factor}" for key, value, factor in
                 ((keys[0], atol, " x min(1, S)"), (keys[1], rtol, " x S")) if key]
        raise ExportError(f"{path}: output differs from PyTorch by {gap.diff:.3g} on real inputs, more than "
                          f"{' + '.join(terms)} = {bound:.3g} (S = max|output| {gap.scale:.3g})")
    return gap.diff


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
    p10_ms: float  # the least disturbed runs: on a shared machine, others' load only ever adds time
    cpu_ms: float  # median CPU time of this process per run (all its threads): what others' load cannot inflate


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op thread count is process-wide: set it only while PyTorch is timed, then restore it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


Inputs = np.ndarray | tuple[np.ndarray, ...]


def _runner(target: Path | nn.Module, inputs: Inputs, threads: int, provider: str) -> Callable[[], object]:
    arrays = inputs if isinstance(inputs, tuple) else (inputs,)
    if isinstance(target, nn.Module):
        module, tensors = target.eval(), [torch.from_numpy(array) for array in arrays]

        def run() -> object:
            with torch.inference_mode():
                return module(*tensors)
        return run
    runtime = session(target, threads, provider)
    feed = {graph_input.name: array for graph_input, array in zip(runtime.get_inputs(), arrays, strict=True)}
    return lambda: runtime.run(None, feed)


def measure_latency(targets: Mapping[str, Path | nn.Module], inputs: Inputs | Mapping[str, Inputs], warmup: int = 10,
                    repeats: int = 50, threads: int = 2, provider: str = CPU) -> dict[str, Latency]:
    """Time each target on the same input, alternating between targets every repeat.

    A path is an ONNX file run by ONNX Runtime on ``provider``; a module runs in PyTorch eager on the CPU with
    the same number of threads (to set the runtime beside the framework). ``inputs`` is one array, or a tuple
    for a graph with several inputs; a dict gives each target (by name) its own, for targets whose input
    shapes differ (the layers of a latency table) but that must still be timed interleaved.
    """
    eager = any(isinstance(target, nn.Module) for target in targets.values())
    with _torch_threads(threads) if eager else contextlib.nullcontext():
        runners = {name: _runner(target, inputs[name] if isinstance(inputs, Mapping) else inputs, threads, provider)
                   for name, target in targets.items()}
        for run in runners.values():
            for _ in range(warmup):
                run()
        samples: dict[str, list[float]] = {name: [] for name in runners}
        cpu: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(repeats):
            for name, run in runners.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                run()
                samples[name].append((time.perf_counter() - start) * 1e3)
                cpu[name].append((time.process_time() - start_cpu) * 1e3)
    return {name: Latency(statistics.median(times), float(np.percentile(times, 90)), float(np.percentile(times, 10)),
                          statistics.median(cpu[name]))
            for name, times in samples.items()}
