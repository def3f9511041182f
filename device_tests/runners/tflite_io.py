"""What the LiteRT and TFLite Micro runners share: a full-integer .tflite takes int8 input and gives int8 output
(the converter's choice, and what a microcontroller wants: no float at the edges), so float32 images are quantized
with the input tensor's scale/zero-point and the logits dequantized with the output's."""

from __future__ import annotations

import numpy as np


def quantize(x: np.ndarray, dtype, scale: float, zero_point: int) -> np.ndarray:
    if dtype == np.float32 or not scale:
        return np.ascontiguousarray(x, dtype=np.float32)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


def dequantize(y: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    if y.dtype == np.float32 or not scale:
        return np.array(y, dtype=np.float32, copy=True)
    return ((y.astype(np.int32) - zero_point) * np.float32(scale)).astype(np.float32)


def per_image(run_one, x: np.ndarray, batch: int | None) -> np.ndarray:
    """Models converted with a fixed batch of 1 get a larger batch one image at a time."""
    if batch is None or x.shape[0] == batch:
        return run_one(x)
    return np.concatenate([run_one(x[i:i + 1]) for i in range(x.shape[0])])
