"""Memory layout for CPU (and CUDA) speed: convolution networks run ~2x faster in channels_last.

Measured on the 2-core build machine (EfficientNet-Lite0 at 64x64, PyTorch 2.14 CPU): inference of the frozen
prefix 250 -> 590 img/s, training of its last stages 300 -> 850 img/s. Results agree with the default layout to
float rounding (max |diff| 4e-5 on features of magnitude 37)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """Image batches and feature maps (4-d) in channels_last; anything else unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@contextmanager
def channels_last_model(model: nn.Module) -> Iterator[nn.Module]:
    """The model's 4-d weights in channels_last for the duration, back to the default layout afterwards (so a
    saved state_dict does not depend on where the model was used)."""
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)
