"""Outlier exposure while distilling (Hendrycks et al., 2019): besides the subtask batch, each step the student
sees a batch of the teacher's NON-subtask training images and is taught to be unsure on them, either by matching
a uniform distribution over the subtask classes or by matching the teacher's renormalised subtask probabilities.
The outlier images come from the training split only (never validation or test)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data.views import as_tensor
from ..seeds import seed_for
from .config import OODConfig
from .data import outside_data


class OutlierExposure:
    """Called once per training step with the method's losses; returns them with "outlier" added to "total"."""

    def __init__(self, images: torch.Tensor, view, cfg: OODConfig, batch_size: int, seed: int, device,
                 teacher_logits: torch.Tensor | None = None, temperature: float = 4.0,
                 pool_rows: np.ndarray | None = None):
        self.images, self.view, self.cfg, self.device = images, view, cfg, device
        self.pool_rows = pool_rows      # mined outliers: their rows in the unlabelled pool (else None)
        self.per_step = max(1, math.ceil(batch_size * cfg.oe_ratio))
        self.generator = torch.Generator().manual_seed(seed)  # its own stream: the subtask order is unchanged
        self.teacher_logits, self.temperature = teacher_logits, temperature

    def __len__(self) -> int:
        return len(self.images)

    def loss(self, student: torch.nn.Module) -> torch.Tensor:
        idx = torch.randint(len(self.images), (self.per_step,), generator=self.generator)
        logits = student(self.view(self.images[idx].to(self.device))).float()
        if self.cfg.oe_target == "uniform":
            # cross-entropy to the uniform distribution minus its entropy = KL(uniform || p): 0 when unsure
            return -F.log_softmax(logits, 1).mean(1).mean() - math.log(logits.shape[1])
        t = self.temperature
        target = F.softmax(self.teacher_logits[idx].to(self.device) / t, 1)
        return F.kl_div(F.log_softmax(logits / t, 1), target, reduction="batchmean") * t * t

    def __call__(self, losses: dict, student: torch.nn.Module) -> dict:
        outlier = self.loss(student)
        return {**losses, "outlier": outlier.detach(), "total": losses["total"] + self.cfg.oe_weight * outlier}


def outlier_images(config, models, device, log, original_teacher=None) -> tuple[np.ndarray, np.ndarray | None]:
    """The other classes' training images, or (ood.mined_outliers) the pool's outliers found without labels on the
    embedding of `original_teacher` (the teacher stage's folder: the model before adaptation), with their rows in
    the pool."""
    if config.ood.mined_outliers is None:
        return outside_data(config).train.images, None
    from ..data.for_config import subtask_data
    from ..models import load_teacher
    from .mining import mined_outliers

    data = subtask_data(config)
    teacher, spec = load_teacher(original_teacher)
    rows = mined_outliers(config.ood.mined_outliers, teacher, spec.input, data, device, log)
    return data.pool.images[rows], rows


def outlier_exposure(config, models, device, log=lambda _m: None, known=None, original_teacher=None
                     ) -> OutlierExposure | None:
    """From the full config (None when the `ood` section is absent or exposure is off). `known`: the adapt
    stage's table of teacher logits (pipeline.models.known_logits), which spares the teacher passes;
    `original_teacher`: the teacher stage's folder (ood.mined_outliers embeds with it)."""
    cfg: OODConfig | None = getattr(config, "ood", None)
    if cfg is None or not cfg.outlier_exposure:
        return None
    images, pool_rows = outlier_images(config, models, device, log, original_teacher)
    if cfg.oe_max_images is not None and cfg.oe_max_images < len(images):
        order = np.random.default_rng(seed_for(config, "ood.exposure.images")).permutation(len(images))
        pick = np.sort(order[:cfg.oe_max_images])
        images = images[pick]
        pool_rows = pool_rows[pick] if pool_rows is not None else None
    teacher_logits = None
    if cfg.oe_target == "teacher":
        from ..models.known_logits import teacher_logits as logits_of

        teacher_logits = logits_of(models.teacher, models.teacher_view, images, device, models.teacher_ids, known)
    source = "non-subtask training images" if pool_rows is None else "mined pool images"
    log(f"  outlier exposure: {len(images)} {source}, target {cfg.oe_target}, "
        f"weight {cfg.oe_weight}")
    return OutlierExposure(as_tensor(images), models.student_view, cfg, config.distill.batch_size,
                           seed_for(config, "ood.exposure.batches"), device, teacher_logits, config.distill.temperature,
                           pool_rows)
