"""A candidate's artifacts: its INT8 ONNX (BatchNorm folded, ONNX Runtime's static post-training quantization: the
layout of the onnx_int8 format) timed by the suite's own ONNX Runtime runner at batch 1, and, for the MCU budgets,
its INT8 .tflite made the way the tflm format makes it, with the arena and flash TFLite Micro reports."""

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


def preprocess_spec(view: View) -> dict:
    """The view as the device suite's preprocessing spec (device_tests.preprocess.Preprocess.from_spec)."""
    return {"size": view.size, "channels": view.channels, "mean": list(view.mean), "std": list(view.std)}


def p99_ms(path: Path, view: View, images: np.ndarray, threads: int, settings) -> float:
    """p99 of the bound model call (the suite's single-stream protocol, `settings`: SearchLatency), in ms, in this
    process (the search itself times in a process of its own, see timing.py)."""
    from device_tests.latency import LatencySettings
    from device_tests.preprocess import Preprocess
    from device_tests.timing import time_model

    protocol = LatencySettings(min_queries=settings.min_queries, min_duration_s=settings.min_duration_s,
                               warmup=settings.warmup, throughput_batch=1)
    prep = Preprocess.from_spec(preprocess_spec(view))
    return float(time_model(path, prep, images, "onnxruntime", threads, protocol)["p99_ms"])


def export_tflite(model: nn.Module, view: View, calibration: np.ndarray, path: Path) -> Path:
    """The INT8 .tflite the tflm format ships: litert-torch's PT2E post-training quantization of the FP32 student
    (exporters/mobile.py, the tflm exporter's own call), calibrated on `calibration` (uint8 images). The converter's
    progress lines on stderr are silenced; its errors still raise (ExportError naming the op)."""
    from exporters.mobile import litert_convert
    from exporters.tflm import _silenced_stderr

    inputs = view(torch.as_tensor(calibration))
    example = torch.zeros(1, view.channels, view.size, view.size)
    with _silenced_stderr():
        litert_convert(model.cpu().eval(), example, Path(path), [inputs[i:i + 1] for i in range(len(inputs))])
    return Path(path)


def tflm_figures(path: Path) -> dict:
    """Arena and flash as the validate budgets max_arena_kb / max_flash_kb read them: the tensor arena TFLite
    Micro's recording allocator uses for the model, and the flatbuffer's size (device_tests' tflm runner)."""
    from device_tests.runners.tflm import TflmRunner
    from exporters.tflm import _silenced_stderr

    with _silenced_stderr(), TflmRunner(Path(path), "tflm") as runner:
        described = runner.describe()
    return {"arena_kb": described["arena_used_bytes"] / 1024, "flash_kb": described["flash_bytes"] / 1024}
