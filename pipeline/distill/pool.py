"""More from the unlabelled images of each batch than the teacher's soft answers (their label is UNLABELLED):

- consistency (FixMatch, Sohn et al. 2020): the student's own prediction on a weak view of the image, where its
  top probability reaches `threshold`, is the hard target of its prediction on a strong view;
- pseudo-labels (Noisy Student, Xie et al. 2020): the teacher's top class, where its probability reaches
  `threshold`, is the hard target of the student's prediction on a strong view.

Both losses are means over the batch's unlabelled images (an unconfident image counts as 0, as in FixMatch), so
their scale does not depend on how many images are confident; both use the same strong view. They run as their
own student passes after the method's (outside its feature taps), like outlier exposure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.budget import UNLABELLED
from .augment import strong_view, weak_view


def confident_targets(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(top class, whether its softmax probability reaches threshold) per row."""
    confidence, target = F.softmax(logits.float(), 1).max(1)
    return target, confidence >= threshold


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over all rows of the cross-entropy of the masked ones (0 where the mask is off)."""
    return (F.cross_entropy(logits.float(), target, reduction="none") * mask).mean()


class PoolLosses:
    """Called once per training step with the method's losses; returns them with the enabled pool losses added
    to "total" (and the fraction of unlabelled images each found confident, for the log)."""

    def __init__(self, consistency, pseudo_labels, seed: int):
        self.consistency, self.pseudo_labels = consistency, pseudo_labels
        self.generator = torch.Generator().manual_seed(seed)   # its own stream: the batch order is unchanged

    def __call__(self, losses: dict, student: torch.nn.Module, view, raw: torch.Tensor, labels: torch.Tensor,
                 teacher_logits: torch.Tensor) -> dict:
        pool = labels == UNLABELLED
        if not bool(pool.any()):
            return losses
        images = raw[pool]
        strong = student(view(strong_view(images, self.generator))).float()
        total, extra = losses["total"], {}
        if self.consistency is not None:
            with torch.no_grad():
                weak = student(view(weak_view(images, self.generator)))
            target, mask = confident_targets(weak, self.consistency.threshold)
            loss = masked_cross_entropy(strong, target, mask)
            total = total + self.consistency.weight * loss
            extra.update(consistency=loss.detach(), consistency_confident=mask.float().mean())
        if self.pseudo_labels is not None:
            target, mask = confident_targets(teacher_logits[pool], self.pseudo_labels.threshold)
            loss = masked_cross_entropy(strong, target, mask)
            total = total + self.pseudo_labels.weight * loss
            extra.update(pseudo=loss.detach(), pseudo_confident=mask.float().mean())
        return {**losses, **extra, "total": total}


def pool_losses(cfg, seed: int) -> PoolLosses | None:
    """From the distill section (None unless distill.consistency or distill.pseudo_labels is set)."""
    if cfg.consistency is None and cfg.pseudo_labels is None:
        return None
    return PoolLosses(cfg.consistency, cfg.pseudo_labels, seed)
