"""Runners on real runtimes: one interface, context-manager lifecycle, outputs that match the exporting torch
model, and clear errors for unknown runtimes, wrong formats, broken files and absent backends."""

import importlib.util

import numpy as np
import pytest

from device_tests.bundle import Bundle
from device_tests.errors import IncompatibleArtifactError, RuntimeUnavailableError, UnknownRuntimeError
from device_tests.runners import RUNNERS, default_runtime, get_runner
from tests.helpers import shared_bundle


@pytest.fixture(scope="module")
def bundle():
    return Bundle.load(shared_bundle())


@pytest.fixture(scope="module")
def inputs(bundle):
    return bundle.preprocess(bundle.eval_set().images_u8[:16])


@pytest.mark.parametrize("runtime,artifact", [("onnxruntime", "model.onnx"), ("openvino", "openvino/model.xml"),
                                              ("openvino", "model.onnx")])
def test_fp32_runner_reproduces_the_exported_predictions(bundle, inputs, runtime, artifact):
    art = next(a for a in bundle.artifacts if a.file == artifact)
    with get_runner(runtime)(art.path, art.format, threads=1) as runner:
        assert runner.is_active and runner.input_shape[1:] == inputs.shape[1:]
        assert runner.input_shape[0] is None  # exported with a dynamic batch
        single = np.concatenate([runner.infer(inputs[i:i + 1]) for i in range(len(inputs))])
        batched = runner.infer(inputs)
    assert not runner.is_active
    np.testing.assert_allclose(single, batched, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(batched.argmax(1), bundle.eval_set().fp32_pred[:16])


def test_openvino_precision_hint_is_explicit(bundle):
    art = next(a for a in bundle.artifacts if a.file == "openvino/model.xml")
    with get_runner("openvino")(art.path, art.format, threads=1, precision_hint="f32") as runner:
        info = runner.describe()
    assert info["inference_precision"] == "f32" and info["inference_threads"] == 1


def test_onnxruntime_reports_its_providers(bundle):
    art = bundle.artifacts[0]
    with get_runner("onnxruntime")(art.path, art.format, threads=2) as runner:
        info = runner.describe()
    assert "CPUExecutionProvider" in info["providers"] and info["threads"] == 2


def test_runner_lifecycle_is_checked(bundle, inputs):
    art = bundle.artifacts[0]
    runner = get_runner("onnxruntime")(art.path, art.format)
    with pytest.raises(RuntimeError, match="not active"):
        runner.infer(inputs)
    with runner:
        with pytest.raises(RuntimeError, match="already active"):
            runner.activate()
        with pytest.raises(IncompatibleArtifactError, match="float32"):
            runner.infer(inputs.astype(np.float64))


def test_unknown_runtime_suggests_the_right_name():
    valid = "Valid runtimes: executorch, litert, onnxruntime, openvino, tensorrt, tflm"
    with pytest.raises(UnknownRuntimeError, match=f"Did you mean 'openvino'.*{valid}"):
        get_runner("openvin")


def test_wrong_format_for_runtime(bundle):
    art = next(a for a in bundle.artifacts if a.format == "openvino")
    with pytest.raises(IncompatibleArtifactError, match="onnxruntime runs onnx"):
        get_runner("onnxruntime")(art.path, art.format)


def test_default_runtime_by_format():
    assert default_runtime("onnx") == "onnxruntime" and default_runtime("openvino") == "openvino"
    assert default_runtime("tensorrt") == "tensorrt"
    assert default_runtime("litert") == "litert" and default_runtime("executorch") == "executorch"


def test_truncated_model_is_a_clear_error(bundle, tmp_path):
    broken = tmp_path / "model.onnx"
    broken.write_bytes((shared_bundle() / "model.onnx").read_bytes()[:500])
    with pytest.raises(IncompatibleArtifactError, match="could not load model.onnx.*re-export"):
        with get_runner("onnxruntime")(broken, "onnx"):
            pass


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_absent_is_unavailable_not_a_crash(bundle):
    art = bundle.artifacts[0]
    with pytest.raises(RuntimeUnavailableError, match="tensorrt.*not usable.*Install it"):
        with get_runner("tensorrt")(art.path, art.format):
            pass


def test_every_registered_runner_names_its_formats():
    assert set(RUNNERS) == {"onnxruntime", "openvino", "tensorrt", "litert", "tflm", "executorch"}
    for cls in RUNNERS.values():
        assert set(cls.bundle_formats) <= set(cls.formats)
