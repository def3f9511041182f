"""ONNX Runtime: CPU, plus the CUDA and TensorRT execution providers where the installed build has them."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from .base import Binding, Runner, _lazy, register_runner

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

    def _options(self, profile_prefix: str | None = None):
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if self.threads:
            # One query at a time: parallelism inside operators only, as on a single-stream device.
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        return options

    def _session(self, options):
        ort = _ort()
        providers = [p for p in PREFERRED_PROVIDERS if p in ort.get_available_providers()]
        return ort.InferenceSession(str(self.path), options, providers=providers)

    def _activate_impl(self) -> None:
        self._session_ = self._session(self._options())
        first = self._session_.get_inputs()[0]
        self._input = first.name
        self._outputs = [self._session_.get_outputs()[0].name]
        self.input_shape = tuple(d if isinstance(d, int) else None for d in first.shape)

    def _deactivate_impl(self) -> None:
        del self._session_

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        return self._session_.run(self._outputs, {self._input: x})[0]

    def _bind_impl(self, shape: tuple[int, ...]) -> Binding:
        """IOBinding over OrtValues that wrap numpy buffers: no allocation, no name lookup and no output
        conversion per call (session.run does all three: ~8 us per call on the small students)."""
        ort = _ort()
        session = self._session_
        x = np.zeros(shape, np.float32)
        output = np.array(session.run(self._outputs, {self._input: x})[0], copy=True)
        binding = session.io_binding()
        on_cpu = session.get_providers()[0] == "CPUExecutionProvider"
        if on_cpu:
            x_value, y_value = ort.OrtValue.ortvalue_from_numpy(x), ort.OrtValue.ortvalue_from_numpy(output)
            binding.bind_ortvalue_input(self._input, x_value)
            binding.bind_ortvalue_output(self._outputs[0], y_value)
            run = _bound_run(session, binding)
        else:
            # GPU providers: device buffers bound once; the host->device copy of the input and the copy of the
            # logits back are part of the call, as in the application.
            x_value = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", 0)
            y_value = ort.OrtValue.ortvalue_from_shape_and_type(output.shape, np.float32, "cuda", 0)
            binding.bind_ortvalue_input(self._input, x_value)
            binding.bind_ortvalue_output(self._outputs[0], y_value)
            bound = _bound_run(session, binding)

            def run():
                x_value.update_inplace(x)
                bound()
                output[...] = y_value.numpy()
        return Binding(x, output, run, keep=(binding, x_value, y_value))

    def _layer_profile_impl(self, x: np.ndarray, runs: int) -> dict:
        """Session profiling (SessionOptions.enable_profiling): one Chrome-trace event per executed node and run,
        with the node's op type and execution provider. The first runs (warm-up) are left out."""
        from ..layers import ort_precision, summarize_layers

        warmup = min(20, runs)
        with tempfile.TemporaryDirectory(prefix="edgesmith-ort-profile-") as tmp:
            session = self._session(self._options(str(Path(tmp) / "ort")))
            for _ in range(warmup + runs):
                session.run(self._outputs, {self._input: x})
            trace = Path(session.end_profiling())
            events = json.loads(trace.read_text())
        run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
        first_timed = run_starts[warmup] if len(run_starts) > warmup else 0
        samples = []
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < first_timed:
                continue
            args = e.get("args", {})
            op, provider = args.get("op_name", "?"), args.get("provider", "?")
            samples.append((e["name"].removesuffix("_kernel_time"), op, f"{op} ({provider})", ort_precision(op),
                            e["dur"] / 1000.0))
        return summarize_layers(self.name, samples, runs)

    def _describe_impl(self) -> dict:
        return {"providers": self._session_.get_providers() if self.is_active else []}


def _bound_run(session, binding):
    """The call the timer wraps: run_with_iobinding on pre-bound buffers (synchronising inputs and outputs is
    a no-op on the CPU)."""
    sess, io = session._sess, binding._iobinding  # the C++ objects: skips one Python frame per call
    run_options = _ort().RunOptions()

    def run():
        sess.run_with_iobinding(io, run_options)
    return run if hasattr(sess, "run_with_iobinding") else (lambda: session.run_with_iobinding(binding))


