"""Running a model over an image set: logits in dataset order, and accuracy against labels."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data import View
from ..data.views import as_tensor, batches


@torch.inference_mode()
def predict_logits(model: nn.Module, view: View, images: np.ndarray, device: torch.device,
                   batch_size: int = 256, columns: list[int] | None = None, layout=None) -> torch.Tensor:
    """Logits (optionally only some columns) for uint8 images, on the CPU, in dataset order. `layout` re-lays
    each input batch out (pipeline.models.layout.channels_last for a model converted to channels_last)."""
    model.eval()
    out = []
    source = as_tensor(images)
    for idx in batches(len(source), batch_size):
        inputs = view(source[idx].to(device))
        logits = model(layout(inputs) if layout else inputs).float()
        out.append((logits[:, columns] if columns is not None else logits).cpu())
    return torch.cat(out) if out else torch.empty(0)


def accuracy(logits: torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    labels = torch.as_tensor(labels)
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")
