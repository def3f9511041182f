"""Comparing heatmaps of two models that see the image differently (e.g. 64x64 RGB teacher, 28x28 gray student),
and checking a heatmap's faithfulness by pixel flipping."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def pixel_map(relevance: torch.Tensor) -> torch.Tensor:
    """N x C x H x W relevance -> N x H x W: a pixel's relevance is the sum over its channels."""
    return relevance.sum(1)


def to_size(maps: torch.Tensor, size: int) -> torch.Tensor:
    """N x H x W -> N x size x size by area averaging (each output pixel: the mean relevance it covers)."""
    if maps.shape[-1] == size and maps.shape[-2] == size:
        return maps
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="area")[:, 0]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks per row, ties averaged (as Spearman's correlation wants)."""
    from scipy.stats import rankdata

    return rankdata(x, axis=1)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra = torch.from_numpy(ranks(a.flatten(1).double().numpy()))
    rb = torch.from_numpy(ranks(b.flatten(1).double().numpy()))
    return _pearson(ra, rb)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def agreement(maps_a: torch.Tensor, maps_b: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """Per-image cosine and Spearman correlation of two sets of N x H x W maps at a common size."""
    a, b = to_size(maps_a, size), to_size(maps_b, size)
    return {"cosine": cosine(a, b), "spearman": spearman(a, b)}


@torch.no_grad()
def pixel_flipping(model, x: torch.Tensor, maps: torch.Tensor, gap_fn, steps: int, seed: int,
                   batch_size: int = 64) -> dict:
    """Most-relevant-first pixel flipping: set the top f of the pixels (all channels; by the heatmap) to 0 in the
    normalised input (the normalisation mean), for f = 0, 1/steps, ..., 1, and record the mean logit gap; the same
    with a random pixel order as the reference. A faithful heatmap makes the gap fall faster than random: a smaller
    area under its curve (auc_gain = random AUC - relevance AUC > 0). `maps` are N x H x W at the input's
    resolution; `gap_fn(logits) -> gaps`."""
    n, _, h, w = x.shape
    fractions = np.linspace(0.0, 1.0, steps + 1)
    generator = torch.Generator().manual_seed(seed)
    orders = {"relevance": maps.flatten(1).argsort(dim=1, descending=True),
              "random": torch.stack([torch.randperm(h * w, generator=generator) for _ in range(n)])}
    curves = {}
    for name, order in orders.items():
        curve = []
        for f in fractions:
            k = int(round(f * h * w))
            keep = torch.ones(n, h * w)
            keep.scatter_(1, order[:, :k], 0.0)
            flipped = x * keep.view(n, 1, h, w)
            gaps = torch.cat([gap_fn(model(flipped[i:i + batch_size]), slice(i, i + batch_size))
                              for i in range(0, n, batch_size)])
            curve.append(float(gaps.mean()))
        curves[name] = curve
    auc = {name: float(np.trapezoid(c, fractions)) for name, c in curves.items()}
    return {"fractions": fractions.tolist(), "mean_gap": curves, "auc": auc,
            "auc_gain": auc["random"] - auc["relevance"]}
