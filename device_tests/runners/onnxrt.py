"""ONNX Runtime: CPU, plus the CUDA and TensorRT execution providers where the installed build has them."""

from __future__ import annotations

import numpy as np

from .base import Runner, _lazy, register_runner

_ort = _lazy("onnxruntime", "onnxruntime", "pip install onnxruntime, or onnxruntime-gpu on CUDA machines")
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@register_runner
class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"
    formats = ("onnx",)
    bundle_formats = ("onnx",)

    @classmethod
    def available(cls) -> None:
        _ort()

    @classmethod
    def version(cls) -> str:
        return _ort().__version__

    def _activate_impl(self) -> None:
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if self.threads:
            # One query at a time: parallelism inside operators only, as on a single-stream device.
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        providers = [p for p in PREFERRED_PROVIDERS if p in ort.get_available_providers()]
        self._session = ort.InferenceSession(str(self.path), options, providers=providers)
        first = self._session.get_inputs()[0]
        self._input = first.name
        self._outputs = [self._session.get_outputs()[0].name]
        self.input_shape = tuple(d if isinstance(d, int) else None for d in first.shape)

    def _deactivate_impl(self) -> None:
        del self._session

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        return self._session.run(self._outputs, {self._input: x})[0]

    def _describe_impl(self) -> dict:
        return {"providers": self._session.get_providers() if self.is_active else []}
