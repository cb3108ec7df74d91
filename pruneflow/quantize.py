"""Reduced-precision copies of an fp32 ONNX file: int8 through ONNX Runtime's quantisation, fp16 for GPUs.

int8 (static) calibrates activation ranges on real training batches, so the ranges are the ones the deployed
model will see; ``dynamic`` quantises weights only and computes activation ranges at run time (no calibration
data, but on CPU its integer convolutions are often slower than fp32: measure before choosing it).
fp16 uses ``onnxruntime.transformers.float16`` (onnxconverter-common's converter, shipped inside onnxruntime;
onnx itself has none), keeping float32 inputs and outputs so callers feed the same arrays as for fp32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from pruneflow.files import replacing

Int8Mode = Literal["static", "dynamic"]


class BatchReader(CalibrationDataReader):
    """Feeds real input batches to ONNX Runtime's calibrator, one ``{input name: array}`` at a time."""

    def __init__(self, input_name: str, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._feeds = ({input_name: images.numpy().astype(np.float32)} for images, _ in batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_int8(fp32_path: Path, path: Path, mode: Int8Mode = "static",
                  calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Path:
    """Write an int8 copy of ``fp32_path``: static QDQ (per-channel int8 weights, uint8 activations calibrated
    on ``calibration``) or dynamic. The file is pre-processed first (shape inference, graph fusions), as
    ONNX Runtime recommends."""
    if mode == "static" and calibration is None:
        raise ValueError("static int8 quantisation needs calibration batches")
    with replacing(path) as tmp, tempfile.TemporaryDirectory(prefix="pruneflow-int8-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        if mode == "static":
            input_name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
            quantize_static(str(prepared), str(tmp), BatchReader(input_name, calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        else:
            quantize_dynamic(str(prepared), str(tmp), weight_type=QuantType.QInt8)
    return path


def convert_fp16(fp32_path: Path, path: Path) -> Path:
    """Write an fp16 copy of ``fp32_path`` with float32 inputs and outputs."""
    with replacing(path) as tmp:
        onnx.save(convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True), str(tmp))
    return path
