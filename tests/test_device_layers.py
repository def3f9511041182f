"""Where the time goes, with the real runtimes on a tiny bundle (no mocks): bound calls give the same logits as
infer(); the per-layer profiles of ONNX Runtime and OpenVINO are non-empty and name nodes that exist in the graph
the runtime executed, with INT8 kernels in the INT8 artifacts; benchmark_app runs on the same IR and its
median is recorded beside the suite's p50."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from device_tests import tools
from device_tests.bundle import Bundle
from device_tests.latency import LatencySettings, single_stream
from device_tests.measure import measure
from device_tests.runners import get_runner
from tests.helpers import TINY_LATENCY, shared_bundle

SETTINGS = LatencySettings(**TINY_LATENCY)


@pytest.fixture(scope="module")
def bundle():
    return Bundle.load(shared_bundle())


def _artifact(bundle, file):
    return next(a for a in bundle.artifacts if a.file == file)


def _input(bundle, n=1):
    return bundle.preprocess(bundle.eval_set().images_u8[:n])


@pytest.mark.parametrize("file,runtime", [("model.onnx", "onnxruntime"), ("model.int8.onnx", "onnxruntime"),
                                          ("openvino/model.xml", "openvino"), ("openvino/model.int8.xml", "openvino")])
def test_bound_call_gives_the_logits_of_infer(bundle, file, runtime):
    art = _artifact(bundle, file)
    x = _input(bundle, 4)
    with get_runner(runtime)(art.path, art.format) as runner:
        for batch in (1, 4):
            binding = runner.bind((batch, *x.shape[1:]))
            np.copyto(binding.input, x[:batch])
            binding.run()
            np.testing.assert_allclose(binding.output, runner.infer(x[:batch]), rtol=1e-5, atol=1e-5)
            # the buffers are reused: a second input gives its own logits in the same array
            out = binding.output
            np.copyto(binding.input, x[-batch:])
            binding.run()
            assert binding.output is out
            np.testing.assert_allclose(out, runner.infer(x[-batch:]), rtol=1e-5, atol=1e-5)


def test_bind_refuses_a_shape_the_model_does_not_take(bundle):
    from device_tests.errors import IncompatibleArtifactError

    art = _artifact(bundle, "model.onnx")
    with get_runner("onnxruntime")(art.path, art.format) as runner:
        with pytest.raises(IncompatibleArtifactError, match="cannot bind"):
            runner.bind((1, 3, 5, 5))


def _ort_executed_nodes(path: Path) -> set[str]:
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 1
        options.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return {n.name for n in onnx.load(options.optimized_model_filepath).graph.node}


@pytest.mark.parametrize("file", ["model.onnx", "model.int8.onnx"])
def test_onnxruntime_profile_names_executed_nodes(bundle, file):
    art = _artifact(bundle, file)
    with get_runner("onnxruntime")(art.path, art.format, threads=1) as runner:
        prof = runner.layer_profile(_input(bundle), runs=30)
    names = [r["name"] for r in prof["layers"]]
    assert names and prof["runs"] == 30 and prof["total_ms"] > 0
    assert set(names) <= _ort_executed_nodes(art.path), set(names) - _ort_executed_nodes(art.path)
    assert sum(r["share"] for r in prof["layers"]) == pytest.approx(1.0)
    assert [r["mean_ms"] for r in prof["layers"]] == sorted((r["mean_ms"] for r in prof["layers"]), reverse=True)
    precisions = {r["precision"] for r in prof["layers"]}
    if art.precision == "int8":
        assert "int8" in precisions and any(r["op"] == "QLinearConv" for r in prof["layers"])
    else:
        assert "int8" not in precisions


@pytest.mark.parametrize("file", ["openvino/model.xml", "openvino/model.int8.xml"])
def test_openvino_profile_names_executed_nodes(bundle, file):


    art = _artifact(bundle, file)
    x = _input(bundle)
    with get_runner("openvino")(art.path, art.format, threads=1) as runner:
        prof = runner.layer_profile(x, runs=30)
        compiled = runner._compile(tuple(x.shape))
    executed = {op.get_friendly_name() for op in compiled.get_runtime_model().get_ops()}
    names = {r["name"] for r in prof["layers"]}
    assert names and names <= executed, names - executed
    assert all(r["kernel"] for r in prof["layers"]) and prof["total_ms"] > 0
    convs = [r for r in prof["layers"] if r["op"] == "Convolution"]
    assert convs
    assert {r["precision"] for r in convs} == ({"int8"} if art.precision == "int8" else {"fp32"})



def test_openvino_binding_reports_the_runtime_timing(bundle):
    art = _artifact(bundle, "openvino/model.xml")
    ev = bundle.eval_set()
    with get_runner("openvino")(art.path, art.format, threads=1) as runner:
        result = single_stream(runner.bind((1, *_input(bundle).shape[1:])), bundle.preprocess, ev.images_u8, SETTINGS)
    own, ours = result["runtime_reported"], result["model"]
    assert own["n"] == ours["n"] == result["queries"]
    assert 0 < own["p50_ms"] <= ours["p50_ms"] * 1.5   # the runtime's timing is inside our timer


def test_benchmark_app_is_run_on_the_same_ir_and_compared(bundle):
    art = _artifact(bundle, "openvino/model.int8.xml")
    if tools.find_tool("benchmark_app") is None:
        pytest.skip("benchmark_app is not installed with this openvino")
    result = measure(art, "openvino", SETTINGS, 1, "f32", bundle.eval_set(), bundle.preprocess, layer_runs=20)
    tool = result["tool"]
    assert tool["status"] == "measured", tool
    assert tool["median_ms"] > 0 and tool["iterations"] > 0 and str(art.path) in tool["command"]
    assert "-nthreads" in tool["command"] and tool["command"][tool["command"].index("-nthreads") + 1] == "1"
    cmp_ = result["tool_comparison"]
    assert cmp_["ratio"] == pytest.approx(result["latency"]["model"]["p50_ms"] / tool["median_ms"])
    assert result["layers"]["layers"]


def test_a_missing_tool_is_recorded_not_guessed(bundle, monkeypatch):
    art = _artifact(bundle, "model.onnx")
    monkeypatch.setenv("PATH", "/nonexistent")
    if tools.find_tool("onnxruntime_perf_test") is not None:
        pytest.skip("onnxruntime_perf_test is installed next to this Python")
    result = measure(art, "onnxruntime", SETTINGS, 1, "f32", bundle.eval_set(), bundle.preprocess, layer_runs=0)
    assert result["tool"] == {"tool": "onnxruntime_perf_test", "status": "not installed"}
    assert result["tool_comparison"] is None and "layers" not in result
