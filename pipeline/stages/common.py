"""What several stages share: the subtask data of a config, and running a model over an image set."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn

from ..data import SubtaskData, View, load_dataset, make_subtask
from ..data.views import as_tensor, batches


def subtask_data(cfg) -> SubtaskData:
    return _subtask_data(cfg.data, tuple(cfg.subtask.classes), cfg.build.seed)


@lru_cache(maxsize=4)
def _subtask_data(data_cfg, classes: tuple, seed: int) -> SubtaskData:
    data = make_subtask(load_dataset(data_cfg), list(classes), data_cfg.val_fraction, seed, data_cfg.labels_per_class,
                        data_cfg.unlabelled, data_cfg.unlabelled_max_images, data_cfg.train_per_class is not None)
    if data_cfg.spurious is not None:
        # Only the subtask splits get markers: the teacher trains/adapts on data.dataset, which stays clean.
        from ..data.spurious import add_markers

        data, _ = add_markers(data, data_cfg.spurious, seed)
    return data


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
