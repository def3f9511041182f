"""Outliers found in the unlabelled pool without any label: the pool images that lie farthest from the labelled
subtask images in the original teacher's embedding (the input of its last Linear layer, L2-normalised, before any
adaptation: fitted to the subtask's few labels, the adapted teacher maps outside images close to its classes),
measured by the distance to the k-th nearest labelled training image (Sun et al. 2022: deep nearest neighbours).

Where to cut is set by the budget's held-out labelled images, as the unknown answer's threshold is: an image is
an outlier when it lies farther than the `quantile` of the held-out images' own distances, so about 1 - quantile
of the pool's in-subtask images are taken by mistake. Outlier exposure then trains on the mined images."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.views import as_tensor, batches
from .features import last_linear


@torch.inference_mode()
def embed(model: torch.nn.Module, view, images: np.ndarray, device, batch: int = 256) -> torch.Tensor:
    """L2-normalised inputs of the model's last Linear layer, N x D (float32, on `device`)."""
    model.eval()
    feats: list[torch.Tensor] = []
    hook = last_linear(model).register_forward_pre_hook(lambda _m, args: feats.append(args[0].detach().float()))
    try:
        source = as_tensor(images)
        for idx in batches(len(source), batch):
            model(view(source[idx].to(device)))
    finally:
        hook.remove()
    return F.normalize(torch.cat(feats).flatten(1), dim=1)


def knn_distance(reference: torch.Tensor, queries: torch.Tensor, k: int, exclude_self: bool = False,
                 batch: int = 4096) -> torch.Tensor:
    """Cosine distance (1 - cos) of each (normalised) query to its k-th nearest reference row; `exclude_self`:
    the queries are the reference rows themselves, so each skips its own zero distance."""
    k = min(k + exclude_self, len(reference))
    out = []
    for start in range(0, len(queries), batch):
        similarity = queries[start:start + batch] @ reference.T
        out.append(1 - similarity.topk(k, dim=1).values[:, -1])
    return torch.cat(out)


def mine(labelled: torch.Tensor, held_out: torch.Tensor, pool: torch.Tensor, k: int, quantile: float
         ) -> tuple[np.ndarray, float, np.ndarray]:
    """(indices of the pool's outliers, sorted; the distance threshold; every pool image's distance) from the
    embeddings of the labelled training images, the held-out labelled images and the pool."""
    cut = float(torch.quantile(knn_distance(labelled, held_out, k), quantile))
    distance = knn_distance(labelled, pool, k).cpu().numpy()
    return np.flatnonzero(distance > cut), cut, distance


def mined_outliers(cfg, teacher: torch.nn.Module, view, data, device, log=lambda _m: None) -> np.ndarray:
    """The rows of the pool outlier exposure trains on (sorted), mined on `teacher`'s embedding (seeing images
    through `view`); `cfg` is the ood.mined_outliers section."""
    if data.pool is None or not len(data.pool):
        raise ValueError("mined outliers need an unlabelled pool")       # the config check says so first
    teacher = teacher.to(device)
    labelled, held_out, pool = (embed(teacher, view, images, device)
                                for images in (data.train.images, data.val.images, data.pool.images))
    picked, cut, distance = mine(labelled, held_out, pool, cfg.neighbours, cfg.quantile)
    log(f"  mined outliers: {len(picked)} of {len(distance)} pool images lie farther than {cut:.4f} (the "
        f"{cfg.quantile:g} quantile of the held-out labelled images' {cfg.neighbours}-NN distance)")
    return picked
