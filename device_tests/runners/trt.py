"""TensorRT through Polygraphy (which wraps the TensorRT API across versions). Loads an engine file, or builds
one from ONNX on the target (engines are specific to the GPU, TensorRT version and driver). INT8 comes from
explicit Q/DQ nodes in the ONNX file, never from calibration. Not testable without a GPU: skipped with a
reason when TensorRT is absent."""

from __future__ import annotations

import numpy as np

from .base import Binding, Runner, _lazy, register_runner

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
        from polygraphy.backend.trt import (
            CreateConfig,
            EngineFromBytes,
            EngineFromNetwork,
            NetworkFromOnnxPath,
            Profile,
            TrtRunner,
        )

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
            # Detailed profiling verbosity: the engine inspector can then name each layer's tactic and precision.
            config = CreateConfig(fp16=self.precision_hint == "f16", int8=qdq, profiles=[profile],
                                  profiling_verbosity=_trt().ProfilingVerbosity.DETAILED)
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

    def _bind_impl(self, shape: tuple[int, ...]) -> Binding:
        """Device buffers allocated once and their addresses set on the execution context; a call is the
        host->device copy of the input, enqueue, the device->host copy of the logits and a stream sync (the
        same work as trtexec without --noDataTransfers), with nothing allocated."""
        from polygraphy import cuda

        engine, context = self._runner.engine, self._runner.context
        context.set_input_shape(self._input, shape)
        output_name = next(n for n in _tensor_names(engine) if n != self._input and _is_output(engine, n))
        out_shape = tuple(context.get_tensor_shape(output_name))
        x, output = np.zeros(shape, np.float32), np.zeros(out_shape, np.float32)
        stream = cuda.Stream()
        d_in = cuda.DeviceArray(shape=shape, dtype=np.float32)
        d_out = cuda.DeviceArray(shape=out_shape, dtype=np.float32)
        set_address, name_in, ptr_in, ptr_out = context.set_tensor_address, self._input, d_in.ptr, d_out.ptr

        def run():
            # Addresses set per call (two host-side stores): another binding or runner.infer may have moved them.
            set_address(name_in, ptr_in)
            set_address(output_name, ptr_out)
            d_in.copy_from(x, stream)
            context.execute_async_v3(stream.ptr)
            d_out.copy_to(output, stream)
            stream.synchronize()
        return Binding(x, output, run, keep=(stream, d_in, d_out))

    def _layer_profile_impl(self, x: np.ndarray, runs: int) -> dict:
        """TensorRT's IProfiler on the execution context (per-layer times of each enqueue) and the engine
        inspector (each layer's tactic and output precision, where the engine was built with detailed
        profiling verbosity)."""
        from ..layers import summarize_layers

        trt = _trt()
        samples: list = []
        info = _layer_info(self._runner.engine)

        class LayerTimes(trt.IProfiler):
            def report_layer_time(self, layer_name, ms):
                kernel, precision = info.get(layer_name, ("?", "?"))
                samples.append((layer_name, kernel.split(" ")[0], kernel, precision, ms))

        binding = self._bind_impl(tuple(x.shape))
        np.copyto(binding.input, x)
        context = self._runner.context
        for _ in range(min(20, runs)):
            binding.run()
        context.profiler = LayerTimes()
        try:
            for _ in range(runs):
                binding.run()
        finally:
            context.profiler = None
        return summarize_layers(self.name, samples, runs)


def _tensor_names(engine) -> list[str]:
    return [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]


def _is_output(engine, name: str) -> bool:
    return engine.get_tensor_mode(name) == _trt().TensorIOMode.OUTPUT


def _layer_info(engine) -> dict[str, tuple[str, str]]:
    """layer name -> (tactic / layer type, output precision) from the engine inspector's JSON."""
    import json

    trt = _trt()
    try:
        inspector = engine.create_engine_inspector()
        data = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception:  # noqa: BLE001 (engines built without detailed verbosity: names only)
        return {}
    info = {}
    for layer in data.get("Layers", []):
        if not isinstance(layer, dict):
            continue
        outputs = layer.get("Outputs") or [{}]
        fmt = str(outputs[0].get("Format/Datatype", ""))
        precision = "int8" if "Int8" in fmt else "fp16" if "Half" in fmt else "fp32" if "Float" in fmt else "?"
        info[layer.get("Name", "")] = (f"{layer.get('LayerType', '?')} {layer.get('TacticName', '')}".strip(), precision)
    return info
