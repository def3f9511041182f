"""The device-side numpy preprocessing reproduces the build's torch View exactly (resize, channels, norm)."""

import numpy as np
import pytest
import torch

from device_tests.errors import BundleError
from device_tests.preprocess import Preprocess
from pipeline.data.views import View


@pytest.mark.parametrize("shape,size,channels", [
    ((3, 1, 28, 28), 28, 1),    # no resize
    ((3, 3, 64, 64), 28, 1),    # shrink (antialiased) and RGB -> grey
    ((3, 1, 28, 28), 64, 3),    # enlarge and grey -> RGB
    ((2, 3, 37, 50), 20, 3),    # non-square source
])
def test_numpy_preprocessing_matches_torch_view(shape, size, channels):
    images = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    mean, std = [0.2, 0.4, 0.6][:channels], [0.3, 0.2, 0.25][:channels]
    expected = View(size, channels, tuple(mean), tuple(std))(torch.from_numpy(images)).numpy()
    got = Preprocess.from_spec({"size": size, "channels": channels, "mean": mean, "std": std})(images)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_one_mean_and_std_apply_to_every_channel():
    spec = Preprocess.from_spec({"size": 8, "channels": 3, "mean": [0.5], "std": [0.5]})
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("spec,word", [
    ({"size": 8, "channels": 3, "mean": [0.1, 0.2], "std": [0.5]}, "mean"),
    ({"size": 8, "channels": 1, "mean": [0.1], "std": [0.0]}, "positive std"),
    ({"channels": 1, "mean": [0.1], "std": [0.2]}, "size"),
])
def test_malformed_spec_is_a_clear_error(spec, word):
    with pytest.raises(BundleError, match=word):
        Preprocess.from_spec(spec)
