"""A candidate on the device: its INT8 ONNX artifact (BatchNorm folded, NNCF post-training quantization, the same
export path as the onnx_int8 format) and the suite's own ONNX Runtime runner timing it at batch 1."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.views import View


def export_int8(model: nn.Module, view: View, calibration: np.ndarray, path: Path) -> Path:
    """BatchNorm folded, FP32 ONNX export (the onnx format's exporter), then ONNX Runtime's static post-training
    quantization calibrated on `calibration` (uint8 images): Q/DQ with per-channel INT8 weights, the layout the
    onnx_int8 format ships. Scoring needs the artifact's size and speed, which do not depend on how the scales
    were found; ONNX Runtime's PTQ takes a second where NNCF's (used for the shipped model) takes several."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from exporters.onnx_export import INPUT_NAME, export_onnx
    from quantize.fold import fold_batchnorm

    inputs = view(torch.as_tensor(calibration)).numpy()

    class Images(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{INPUT_NAME: inputs[i:i + 1]} for i in range(len(inputs))])

        def get_next(self):
            return next(self._batches, None)

    folded, _ = fold_batchnorm(model.cpu().eval())
    fp32 = Path(path).with_suffix(".fp32.onnx")
    try:
        export_onnx(folded, fp32, torch.zeros(1, view.channels, view.size, view.size), opset=17, dynamic_batch=False)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)    # its advice to run ORT's pre-processing: BatchNorm is folded already
        try:
            quantize_static(str(fp32), str(path), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
    finally:
        fp32.unlink(missing_ok=True)
    return path


def p99_ms(path: Path, view: View, images: np.ndarray, threads: int, settings) -> float:
    """p99 of the bound model call (the suite's single-stream protocol, `settings`: SearchLatency), in ms."""
    from device_tests.latency import LatencySettings, single_stream
    from device_tests.preprocess import Preprocess
    from device_tests.runners import get_runner

    protocol = LatencySettings(min_queries=settings.min_queries, min_duration_s=settings.min_duration_s,
                               warmup=settings.warmup, throughput_batch=1)
    prep = Preprocess(view.size, view.channels, tuple(view.mean), tuple(view.std))
    with get_runner("onnxruntime")(path, "onnx", threads=threads) as runner:
        result = single_stream(runner.bind((1, view.channels, view.size, view.size)), prep, images, protocol)
    return float(result["model"]["p99_ms"])
