"""A feature-space score for comparison (bench/ood.py): class-conditional Mahalanobis distance on the
penultimate features (the input of the last Linear layer), one shared covariance (Lee et al., 2018).
Not shipped to the device: the artifacts output logits only, and the benchmark says whether it would pay."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data.views import as_tensor, batches


def last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no Linear layer to read penultimate features from")
    return linears[-1]


@torch.inference_mode()
def penultimate(model: nn.Module, view, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(features N x D, logits N x K) in dataset order."""
    model.eval()
    feats, logits = [], []
    hook = last_linear(model).register_forward_pre_hook(lambda _m, args: feats.append(args[0].detach().float().cpu()))
    try:
        source = as_tensor(images)
        for idx in batches(len(source), batch):
            logits.append(model(view(source[idx])).float().cpu())
    finally:
        hook.remove()
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


class Mahalanobis:
    """Fit class means and a shared covariance on in-subtask training features; score = -min_c distance^2."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, shrinkage: float = 1e-3):
        x = features.astype(np.float64)
        classes = np.unique(labels)
        self.means = np.stack([x[labels == c].mean(0) for c in classes])
        centred = x - self.means[np.searchsorted(classes, labels)]
        cov = centred.T @ centred / len(x)
        cov += shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
        self.precision = np.linalg.inv(cov)

    def score(self, features: np.ndarray) -> np.ndarray:
        d = features.astype(np.float64)[:, None, :] - self.means[None]
        dist = np.einsum("nkd,de,nke->nk", d, self.precision, d)
        return -dist.min(1)
