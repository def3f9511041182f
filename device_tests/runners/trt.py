"""TensorRT through Polygraphy (which wraps the TensorRT API across versions). Loads an engine file, or builds
one from ONNX on the target (engines are specific to the GPU, TensorRT version and driver). INT8 comes from
explicit Q/DQ nodes in the ONNX file, never from calibration. Not testable without a GPU: skipped with a
reason when TensorRT is absent."""

from __future__ import annotations

import numpy as np

from .base import Runner, _lazy, register_runner

_trt = _lazy("tensorrt", "tensorrt", "NVIDIA TensorRT with a CUDA GPU: pip install tensorrt")


@register_runner
class TensorRtRunner(Runner):
    name = "tensorrt"
    formats = ("tensorrt", "onnx")
    bundle_formats = ("tensorrt", "onnx")

    @classmethod
    def available(cls) -> None:
        _trt()
        _lazy("polygraphy.backend.trt", "polygraphy", "pip install polygraphy")()

    @classmethod
    def version(cls) -> str:
        return _trt().__version__

    def _activate_impl(self) -> None:
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import (CreateConfig, EngineFromBytes, EngineFromNetwork, NetworkFromOnnxPath,
                                            Profile, TrtRunner)

        if self.format == "tensorrt":
            loader = EngineFromBytes(BytesFromPath(str(self.path)))
        else:
            import onnx  # only to read the input name and shape for the optimisation profile

            graph = onnx.load(str(self.path), load_external_data=False).graph
            dims = [d.dim_value or None for d in graph.input[0].type.tensor_type.shape.dim]
            fixed = [d or 1 for d in dims[1:]]
            profile = Profile().add(graph.input[0].name, min=[1, *fixed], opt=[1, *fixed], max=[self.max_batch, *fixed])
            # Explicit quantization: Q/DQ nodes carry the scales, the INT8 flag lets TensorRT use them (no calibration).
            qdq = any(node.op_type == "QuantizeLinear" for node in graph.node)
            config = CreateConfig(fp16=self.precision_hint == "f16", int8=qdq, profiles=[profile])
            loader = EngineFromNetwork(NetworkFromOnnxPath(str(self.path)), config=config)
        self._runner = TrtRunner(loader)
        self._runner.activate()
        meta = self._runner.get_input_metadata()
        self._input = next(iter(meta))
        self.input_shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in meta[self._input].shape)

    def _deactivate_impl(self) -> None:
        self._runner.deactivate()
        del self._runner

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        outputs = self._runner.infer({self._input: x})
        return np.array(next(iter(outputs.values())), copy=True)
