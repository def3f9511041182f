"""Distillation methods: each turns teacher and student outputs into named losses (always with 'total')."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry

METHODS: Registry[type["DistillMethod"]] = Registry("distillation method")


@dataclass
class Outputs:
    """What one training step produced. Feature dicts are keyed by the layer pair's index."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor          # subtask columns only
    labels: torch.Tensor
    student_feats: dict[int, torch.Tensor] = field(default_factory=dict)
    teacher_feats: dict[int, torch.Tensor] = field(default_factory=dict)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_T / T) || softmax(z_S / T)): the T^2 keeps gradients comparable across temperatures."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * temperature ** 2


class DistillMethod(nn.Module):
    """Base: KD (+ optional label cross-entropy). Subclasses add a layer term and own its trainable parts
    (projections, orthogonal matrices), which the optimizer trains together with the student."""

    uses_layers = False       # whether the method reads intermediate features
    uses_kd = True
    needs_subspaces = False

    def __init__(self, cfg, pairs=(), **_context):
        super().__init__()
        self.cfg = cfg
        self.pairs = list(pairs) if self.uses_layers else []

    def teacher_target(self, index: int, feature: torch.Tensor) -> torch.Tensor:
        """What is kept of a teacher feature map (cacheable, since the teacher is frozen)."""
        return feature

    def layer_losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, out: Outputs) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        if self.uses_kd:
            losses["kd"] = kd_loss(out.student_logits, out.teacher_logits, self.cfg.temperature)
        if self.cfg.label_weight or not self.uses_kd:
            losses["ce"] = F.cross_entropy(out.student_logits, out.labels)
        layers = self.layer_losses(out)
        losses.update(layers)
        total = losses.get("kd", 0.0) + (self.cfg.label_weight or (0.0 if self.uses_kd else 1.0)) * losses.get("ce", 0.0)
        if layers:
            total = total + self.cfg.lambda_layer * sum(layers.values())
        losses["total"] = total
        return losses


@METHODS.register("kd")
class KD(DistillMethod):
    """Hinton et al.: match the teacher's softened subtask probabilities."""


@METHODS.register("student_only")
class StudentOnly(DistillMethod):
    """No teacher: cross-entropy on the labels (the baseline every method must beat)."""

    uses_kd = False
