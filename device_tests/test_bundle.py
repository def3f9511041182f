"""The bundle itself: every file present and unaltered, the evaluation set and preprocessing usable."""

from __future__ import annotations

import numpy as np
import pytest

from device_tests.runners import get_runner


def test_bundle_integrity(bundle):
    bundle.verify()  # raises BundleError naming every missing or altered file


def test_eval_set_matches_spec(bundle):
    eval_set = bundle.eval_set()
    x = bundle.preprocess(eval_set.images_u8[:8])
    spec = bundle.preprocess
    assert x.shape == (min(8, len(eval_set)), spec.channels, spec.size, spec.size)
    assert x.dtype == np.float32 and np.isfinite(x).all()
    if bundle.class_names:
        assert eval_set.labels.min() >= 0 and eval_set.labels.max() < len(bundle.class_names)


@pytest.mark.parametrize("runtime_name", ["onnxruntime", "openvino", "tensorrt"])
def test_runtime_available(device, runtime_name):
    if runtime_name not in device.runtimes:
        pytest.skip(f"{runtime_name} not requested (--runtime)")
    runner = get_runner(runtime_name)
    runner.available()  # RuntimeUnavailableError says how to install it
    assert runner.version()
