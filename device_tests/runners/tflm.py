"""TensorFlow Lite for Microcontrollers through tflite-micro's Python interpreter: the same kernels and the same
allocator a firmware links, so the tensor arena it reports is the RAM the model needs on the MCU, and the
.tflite size is the flash its weights and graph take (kernel code not counted)."""

from __future__ import annotations

import os
import re
import sys
import tempfile

import numpy as np

from .base import Runner, _lazy, register_runner
from .tflite_io import dequantize, per_image, quantize

MODULE = "tflite_micro.python.tflite_micro.runtime"
_tflm = _lazy(MODULE, "TFLite Micro",
              "pip install tflite-micro, or the project's `mobile` extra: pip install -e '.[mobile]'")
# Generous: the allocator takes what it needs from it and reports that; the firmware then reserves the reported size.
ARENA_BYTES = 8 << 20
ARENA_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")


@register_runner
class TflmRunner(Runner):
    name = "tflm"
    module = MODULE
    formats = ("tflm", "litert")
    bundle_formats = ("tflm",)
    distribution = "tflite-micro"

    @classmethod
    def available(cls) -> None:
        _tflm()

    def _activate_impl(self) -> None:
        self._interpreter = _tflm().Interpreter.from_file(str(self.path), arena_size=ARENA_BYTES)
        self._in, self._out = self._interpreter.get_input_details(0), self._interpreter.get_output_details(0)
        self.input_shape = tuple(int(d) for d in self._in["shape"])
        self._infer_impl(np.zeros(self.input_shape, np.float32))  # every kernel prepared and run once
        self.arena_used_bytes = arena_used_bytes(self._interpreter)

    def _deactivate_impl(self) -> None:
        del self._interpreter

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        return per_image(self._run, x, self.input_shape[0])

    def _run(self, x: np.ndarray) -> np.ndarray:
        q_in, q_out = self._in["quantization_parameters"], self._out["quantization_parameters"]
        self._interpreter.set_input(quantize(x, self._in["dtype"], *_scale_zero(q_in)), 0)
        self._interpreter.invoke()
        return dequantize(self._interpreter.get_output(0), *_scale_zero(q_out))

    def _describe_impl(self) -> dict:
        if not self.is_active:
            return {}
        return {"arena_used_bytes": self.arena_used_bytes, "flash_bytes": self.path.stat().st_size,
                "input_dtype": np.dtype(self._in["dtype"]).name}


def _scale_zero(params: dict) -> tuple[float, int]:
    scales, zeros = params.get("scales", []), params.get("zero_points", [])
    return (float(scales[0]), int(zeros[0])) if len(scales) else (0.0, 0)


def arena_used_bytes(interpreter) -> int:
    """The recording allocator's total (head + tail) of the arena. TFLM prints it from C++ to stderr only, so
    file descriptor 2 is pointed at a temporary file for the call."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            interpreter.print_allocations()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode(errors="replace")
    match = ARENA_TOTAL.search(text)
    if match is None:
        raise RuntimeError(f"TFLite Micro printed no arena total: {text[-300:]!r}")
    return int(match.group(1))
