"""Deployment platform profiles (``export.platform``): the files a device's runtime loads, the ONNX opset it reads and
the ONNX Runtime execution providers of its hardware. ``pruneflow.deploy`` writes and checks the files; the config
takes a profile's opset when ``export.opset`` is null.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlatformProfile:
    formats: tuple[str, ...]  # entries of ``deploy.FORMATS``, "onnx" first: the others are made from it
    opset: int
    device_providers: tuple[str, ...] = ()  # the hardware's providers, tried in order; the CPU is always measured


PROFILES = {
    "cpu": PlatformProfile(("onnx", "onnx_int8"), opset=18),
    # TensorRT 8.5 (JetPack 5) reads opset 17 at most
    "jetson": PlatformProfile(("onnx", "onnx_fp16", "torchscript"), opset=17,
                            device_providers=("TensorrtExecutionProvider", "CUDAExecutionProvider")),
    "generic-gpu": PlatformProfile(("onnx", "onnx_fp16"), opset=18,
                                 device_providers=("CUDAExecutionProvider", "TensorrtExecutionProvider")),
}
