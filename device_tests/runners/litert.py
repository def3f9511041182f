"""LiteRT (the former TensorFlow Lite) through ai-edge-litert's interpreter: numpy + flatbuffers, no torch, the
runtime Android phones and Coral-class boards use. FP32 .tflite files take float input; the INT8 ones are
full-integer (int8 input and output with a scale/zero-point, see tflite_io)."""

from __future__ import annotations

import numpy as np

from .base import Runner, _lazy, register_runner
from .tflite_io import dequantize, per_image, quantize

MODULE = "ai_edge_litert.interpreter"
_litert = _lazy(MODULE, "LiteRT",
                "pip install ai-edge-litert, or the project's `mobile` extra: pip install -e '.[mobile]'")


@register_runner
class LiteRtRunner(Runner):
    name = "litert"
    module = MODULE
    formats = ("litert", "tflm")   # a TFLite Micro model is a .tflite too
    bundle_formats = ("litert",)
    distribution = "ai-edge-litert"

    @classmethod
    def available(cls) -> None:
        _litert()

    def _activate_impl(self) -> None:
        self._interpreter = _litert().Interpreter(model_path=str(self.path), num_threads=self.threads or None)
        self._interpreter.allocate_tensors()
        self._in = self._interpreter.get_input_details()[0]
        self._out = self._interpreter.get_output_details()[0]
        self.input_shape = tuple(int(d) for d in self._in["shape"])

    def _deactivate_impl(self) -> None:
        del self._interpreter

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        return per_image(self._run, x, self.input_shape[0])

    def _run(self, x: np.ndarray) -> np.ndarray:
        scale, zero = self._in["quantization"]
        self._interpreter.set_tensor(self._in["index"], quantize(x, self._in["dtype"], scale, zero))
        self._interpreter.invoke()
        return dequantize(self._interpreter.get_tensor(self._out["index"]), *self._out["quantization"])

    def _describe_impl(self) -> dict:
        if not self.is_active:
            return {}
        return {"input_dtype": np.dtype(self._in["dtype"]).name, "input_quantization": list(self._in["quantization"]),
                "output_quantization": list(self._out["quantization"])}
