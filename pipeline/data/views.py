"""Each model sees the same image its own way (size, channels, normalisation); batching and augmentation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class View:
    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x C x H x W -> normalised float N x channels x size x size."""
        x = images.float().div_(255.0)
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim=True) if self.channels == 1 else x.expand(-1, self.channels, -1, -1)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "View":
        """Inverse of to_dict, after a JSON round trip (which turns the tuples into lists)."""
        return cls(int(raw["size"]), int(raw["channels"]), tuple(raw["mean"]), tuple(raw["std"]))

    @classmethod
    def resolve(cls, spec, default_size: int, default_channels: int, default_mean=None, default_std=None) -> "View":
        channels = spec.channels or default_channels
        mean = spec.mean or default_mean or [0.5] * channels
        std = spec.std or default_std or [0.5] * channels
        mean = list(mean) * channels if len(mean) == 1 else list(mean)
        std = list(std) * channels if len(std) == 1 else list(std)
        return cls(spec.size or default_size, channels, tuple(mean[:channels]), tuple(std[:channels]))


def augment_batch(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip, on the raw uint8 batch so every view sees the same image."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(-1, images.shape[1], -1, w + 2 * pad)
    cropped = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(-1, images.shape[1], h, -1)
    cropped = torch.gather(cropped, 3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    cropped[flip] = cropped[flip].flip(-1)
    return cropped


def batches(n: int, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
            ) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))
