"""The bundle's preprocessing spec applied with numpy: the same image the build's View produced, without torch.

uint8 N x C x H x W -> channel conversion -> x/255 -> resize (bilinear, antialiased when shrinking) ->
(x - mean) / std, float32. This runs on the device and is timed as pre-processing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BundleError


@dataclass(frozen=True)
class Preprocess:
    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_spec(cls, spec: dict) -> "Preprocess":
        try:
            channels = int(spec["channels"])
            mean = [float(v) for v in spec["mean"]]
            std = [float(v) for v in spec["std"]]
            size = int(spec["size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"The preprocessing spec {spec!r} is incomplete or malformed ({exc}).",
                              "It needs size, channels, mean and std (one value per channel, or one for all).") from None
        mean = mean * channels if len(mean) == 1 else mean
        std = std * channels if len(std) == 1 else std
        if len(mean) != channels or len(std) != channels or not all(s > 0 for s in std):
            raise BundleError(f"The preprocessing spec has {channels} channels but mean {mean} and std {std}.",
                              "Give one mean and one positive std per channel.")
        return cls(size, channels, tuple(mean), tuple(std))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32) * np.float32(1 / 255)
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdims=True) if self.channels == 1 else np.repeat(x, self.channels, axis=1)
        if x.shape[-2:] != (self.size, self.size):
            x = resize(x, self.size, self.size)
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def _weights(n_in: int, n_out: int) -> np.ndarray:
    """n_out x n_in interpolation matrix: a triangle filter widened by the scale when shrinking (antialias),
    plain bilinear with half-pixel centres when enlarging; rows sum to one."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = scale * (np.arange(n_out) + 0.5)
    src = np.arange(n_in) + 0.5
    w = np.clip(1.0 - np.abs(src[None, :] - centres[:, None]) / support, 0.0, None)
    if scale < 1.0:
        # Enlarging: the filter is bilinear on clamped neighbours (edge pixels repeat).
        pos = np.clip(centres - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = pos - lo
        w = np.zeros((n_out, n_in))
        np.add.at(w, (np.arange(n_out), lo), 1 - frac)
        np.add.at(w, (np.arange(n_out), hi), frac)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero entries of the interpolation matrix: indices and weights, n_out x taps."""
    w = _weights(n_in, n_out)
    taps = int((w > 0).sum(1).max())
    index = np.argsort(w <= 0, axis=1, kind="stable")[:, :taps]  # non-zero columns first, in order
    return index, np.take_along_axis(w, index, axis=1)


def _resize_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    # Elementwise sums over a few taps instead of a matrix product: no BLAS, whose thread pool can stall
    # next to a runtime's own threads on a small board.
    index, weight = _taps(x.shape[axis], n_out)
    x = np.moveaxis(x, axis, -1)
    out = sum(x[..., index[:, k]] * weight[:, k] for k in range(index.shape[1]))
    return np.moveaxis(out, -1, axis)


def resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    return _resize_axis(_resize_axis(x, height, 2), width, 3).astype(np.float32)
