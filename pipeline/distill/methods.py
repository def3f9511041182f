"""Distillation methods: each turns teacher and student outputs into named losses (always with 'total')."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from ..errors import ConfigError
from ..registry import Registry
from .features import PairSpec, as_map, pool_to, prefix_tokens
from .matching import PairTarget, Rotations, SubspaceMatch, pair_target, subspace_match_reference

METHODS: Registry[type["DistillMethod"]] = Registry("distillation method")
METHODS.retire("subdistill_unit", "rescaling SubDistill's targets to unit energy scored below plain subdistill with "
               "both teachers it was measured with. Use distill.method: subdistill.")


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


def label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the batch's labelled images (pool images carry a negative label); 0 without any."""
    labelled = labels >= 0
    if bool(labelled.all()):
        return F.cross_entropy(logits, labels)
    if not bool(labelled.any()):
        return logits.sum() * 0.0      # keeps the graph (and DDP's gradient hooks) intact
    return F.cross_entropy(logits[labelled], labels[labelled])


class DistillMethod(nn.Module):
    """Base: KD (+ optional label cross-entropy). Subclasses add a layer term and own its trainable parts
    (projections, orthogonal matrices), which the optimizer trains together with the student."""

    uses_layers = False       # whether the method reads intermediate features
    uses_kd = True
    needs_subspaces = False
    default_lambda = 0.0      # lambda_layer when the config leaves it unset (chosen on validation data)

    def __init__(self, cfg, pairs=(), **_context):
        super().__init__()
        self.cfg = cfg
        self.pairs = list(pairs) if self.uses_layers else []
        self.steps, self.layers_now = 0, bool(self.pairs)

    def teacher_target(self, index: int, feature: torch.Tensor) -> torch.Tensor:
        """What is kept of a teacher feature map (cacheable, since the teacher is frozen)."""
        return feature

    def layer_losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        return {}

    def begin_step(self) -> bool:
        """Called before every optimizer step; whether this step evaluates the layer loss (`layers_now`): every
        layer_every-th step, counted from the first, so that every process of a distributed run agrees."""
        self.layers_now = bool(self.pairs) and self.steps % self.layer_every == 0
        self.steps += 1
        return self.layers_now

    def after_step(self) -> None:
        """Called after every optimizer step (constraints kept by projection go here)."""

    def forward(self, out: Outputs) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        if self.uses_kd:
            losses["kd"] = kd_loss(out.student_logits, out.teacher_logits, self.cfg.temperature)
        if self.cfg.label_weight or not self.uses_kd:
            losses["ce"] = label_loss(out.student_logits, out.labels)
        layers = self.layer_losses(out) if self.layers_now or not self.training else {}
        losses.update(layers)
        total = losses.get("kd", 0.0) + (self.cfg.label_weight or (0.0 if self.uses_kd else 1.0)) * losses.get("ce", 0.0)
        if layers:
            # A lazy layer term counts n times on the steps that have it: the same expected gradient.
            total = total + self.lambda_layer * (self.layer_every if self.training else 1) * sum(layers.values())
        losses["total"] = total
        return losses

    @property
    def lambda_layer(self) -> float:
        configured = getattr(self.cfg, "lambda_layer", None)
        return self.default_lambda if configured is None else configured

    @property
    def layer_every(self) -> int:
        """The layer loss on every n-th step (distill.layer_every; unset: every step)."""
        return getattr(self.cfg, "layer_every", None) or 1


@METHODS.register("kd")
class KD(DistillMethod):
    """Hinton et al.: match the teacher's softened subtask probabilities."""


@METHODS.register("student_only")
class StudentOnly(DistillMethod):
    """No teacher: cross-entropy on the labels (the baseline every method must beat)."""

    uses_kd = False


class LayerMethod(DistillMethod):
    """KD + lambda_layer x a loss per layer pair. Both sides become maps (ViT tokens lose their prefix and form a
    grid) and the larger map is average-pooled to the smaller; subclasses define the teacher target (cached
    when the inputs are fixed) and the student-side comparison, and register their trainable parts."""

    uses_layers = True

    def __init__(self, cfg, pairs: Sequence[PairSpec] = (), teacher: nn.Module | None = None,
                 student: nn.Module | None = None, **_context):
        super().__init__(cfg, pairs)
        if not self.pairs:
            raise ConfigError(f"Distillation method '{cfg.method}' compares layers, but no layer pairs were given.",
                              "Set distill.layers: auto, or list pairs like [{teacher: blocks.4, student: features.3}].")
        self.teacher_prefix = prefix_tokens(teacher) if teacher is not None else 0
        self.student_prefix = prefix_tokens(student) if student is not None else 0

    def teacher_target(self, index: int, feature: torch.Tensor) -> torch.Tensor:
        return self.teacher_side(index, pool_to(as_map(feature, self.teacher_prefix), self.pairs[index].size))

    def layer_losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        return {f"layer{i}": self.pair_loss(i, self.student_map(out, i), out.teacher_feats[i])
                for i in range(len(self.pairs))}

    def student_map(self, out: Outputs, index: int) -> torch.Tensor:
        """Pair `index`'s student feature as a map at the size the pair is compared at."""
        return pool_to(as_map(out.student_feats[index], self.student_prefix), self.pairs[index].size)

    def teacher_side(self, index: int, teacher_map: torch.Tensor) -> torch.Tensor:
        return teacher_map

    def pair_loss(self, index: int, student_map: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MeanCentre(nn.Module):
    """BatchNorm2d without variance scaling or affine parameters: subtracts the per-channel batch mean in
    training (updating a running mean like BatchNorm, momentum 0.1) and the running mean in eval."""

    def __init__(self, channels: int, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x - self.running_mean.view(1, -1, 1, 1)
        mean = x.mean(dim=(0, 2, 3))
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
        return x - mean.view(1, -1, 1, 1)


def orthogonal_linear(inputs: int, outputs: int) -> nn.Linear:
    """A bias-free Linear whose weight stays (semi-)orthogonal through training (a parametrization, not a penalty).
    Cayley map: several times cheaper per step than the default matrix exponential (and than Householder for
    non-square weights). (SubDistill's square V keep orthogonal more cheaply still, by retraction: .matching.)"""
    return orthogonal(nn.Linear(inputs, outputs, bias=False), orthogonal_map="cayley")


@METHODS.register("subdistill")
class SubDistill(LayerMethod):
    """Match the student, centred and rotated by a learned orthogonal V, to the teacher's activations projected
    on its relevant subspace U_k (from the `subspaces` stage): t~ = U_k^T (t - mu), s^ = V (s - m), loss per
    position ||s^ - t~||^2 / alpha (alpha: teacher energy inside U_k, so predicting zero costs about 1)."""

    needs_subspaces = True
    default_lambda = 1.0

    def __init__(self, cfg, pairs: Sequence[PairSpec] = (), subspaces_dir: Path | None = None, **context):
        super().__init__(cfg, pairs, **context)
        if subspaces_dir is None:
            raise ConfigError("Method 'subdistill' needs the output of the `subspaces` stage.",
                              "Build with the `subspaces` stage enabled (it is whenever distill.method is subdistill).")
        from .subspace import load_subspaces

        estimated_pairs, tensors = load_subspaces(subspaces_dir)
        _check_same_pairs(self.pairs, estimated_pairs)
        for i, layer in enumerate(tensors):
            self.register_buffer(f"basis{i}", layer["basis"])
            self.register_buffer(f"mean{i}", layer["mean"])
            self.register_buffer(f"alpha{i}", layer["alpha"])
        self.centre = nn.ModuleList(MeanCentre(p.student_channels) for p in self.pairs)
        self.rotations = Rotations(p.student_channels for p in self.pairs)   # V, orthogonal after every step
        # per pair 1 / alpha: the loss per position is normalised by the teacher energy in U_k
        weights = [1.0 / getattr(self, f"alpha{i}") for i in range(len(self.pairs))]
        self.register_buffer("loss_weights", torch.stack(weights).reshape(-1).float(), persistent=False)

    def teacher_side(self, index: int, teacher_map: torch.Tensor) -> torch.Tensor:
        # Pooling commutes with the affine projection, so pool first: fewer positions to project.
        from .targets import project

        projected = project(teacher_map, getattr(self, f"basis{index}"), getattr(self, f"mean{index}"))
        return self.from_projection(index, projected)

    def from_projection(self, index: int, projected: torch.Tensor) -> torch.Tensor:
        """The target from U_k^T (t - mu) (what pipeline.distill.targets caches, maybe float16)."""
        return projected.float()

    def layer_losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        if not self.training:
            return super().layer_losses(out)
        indices = list(range(len(self.pairs)))
        students, targets = [self.student_map(out, i) for i in indices], [out.teacher_feats[i] for i in indices]
        losses = self.match(indices, students, targets)
        return {f"layer{i}": loss for i, loss in zip(indices, losses.unbind())}

    def pair_loss(self, index: int, student_map: torch.Tensor, target) -> torch.Tensor:
        if self.training:
            return self.match([index], [student_map], [target])[0]
        if isinstance(target, PairTarget):
            student_map, target = student_map.flatten(2).unsqueeze(3), target.plain.unsqueeze(3)
        n, _, h, w = target.shape
        squared = subspace_match_reference(self.centre[index](student_map), target, self.rotations[index])
        return squared.clamp_min(0) / (n * h * w) * self.loss_weights[index]   # per position, mean over images

    def match(self, indices: list[int], student_maps: list[torch.Tensor], targets: list) -> torch.Tensor:
        """The training loss of the given pairs, (L,), in one fused op (matching.SubspaceMatch); updates their
        running means as MeanCentre would. Targets are maps (n, k, h, w) or PairTarget (as the cache gives them)."""
        flat = []
        for student_map, target in zip(student_maps, targets):
            flat += [student_map.flatten(2), *pair_target(target)]
        losses, *means = SubspaceMatch.apply(self.rotations.weight, self.rotations.groups_of(indices), *flat)
        with torch.no_grad():
            torch._foreach_lerp_([self.centre[i].running_mean for i in indices], list(means), self.centre[0].momentum)
        return losses.clamp_min(0) * self.loss_weights[indices]

    def after_step(self) -> None:
        if self.layers_now:          # V moved only on a step with the layer loss
            self.rotations.retract_()


def _check_same_pairs(pairs: Sequence[PairSpec], estimated: Sequence[PairSpec]) -> None:
    # Both stages resolve the pairs from the same config; a mismatch means a stale or foreign subspaces folder.
    if [(p.teacher, p.student, p.teacher_channels, p.student_channels) for p in pairs] != \
            [(p.teacher, p.student, p.teacher_channels, p.student_channels) for p in estimated]:
        raise ConfigError("The subspaces were estimated for other layer pairs than distill.layers gives.",
                          "Rebuild the `subspaces` stage (edgesmith build --force subspaces).")


@METHODS.register("fitnet")
class FitNet(LayerMethod):
    """Romero et al.: regress the teacher map from the student's through a 1x1 convolution k -> d; squared
    error summed over channels, averaged over positions and images."""

    default_lambda = 1e-4

    def __init__(self, cfg, pairs: Sequence[PairSpec] = (), **context):
        super().__init__(cfg, pairs, **context)
        self.regressors = nn.ModuleList(nn.Conv2d(p.student_channels, p.teacher_channels, 1) for p in self.pairs)

    def pair_loss(self, index: int, student_map: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (self.regressors[index](student_map) - target).pow(2).sum(1).mean()


def attention_map(feature_map: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis: L2-normalised flatten(mean over channels of x^2)."""
    return F.normalize(feature_map.pow(2).mean(1).flatten(1), dim=1)


@METHODS.register("attention")
class AttentionTransfer(LayerMethod):
    """Match where each network's activation energy sits (channel counts need not agree)."""

    default_lambda = 10.0

    def teacher_side(self, index: int, teacher_map: torch.Tensor) -> torch.Tensor:
        return attention_map(teacher_map)

    def pair_loss(self, index: int, student_map: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (attention_map(student_map) - target).pow(2).mean()


@METHODS.register("vkd")
class VkD(LayerMethod):
    """Miles et al.: the position-averaged teacher feature, LayerNorm'd (no affine), predicted from the
    student's position-averaged feature through a semi-orthogonal k -> d map; smooth L1."""

    default_lambda = 1.0

    def __init__(self, cfg, pairs: Sequence[PairSpec] = (), **context):
        super().__init__(cfg, pairs, **context)
        self.lift = nn.ModuleList(orthogonal_linear(p.student_channels, p.teacher_channels) for p in self.pairs)

    def teacher_side(self, index: int, teacher_map: torch.Tensor) -> torch.Tensor:
        pooled = teacher_map.mean(dim=(2, 3))
        return F.layer_norm(pooled, pooled.shape[1:])

    def pair_loss(self, index: int, student_map: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.smooth_l1_loss(self.lift[index](student_map.mean(dim=(2, 3))), target)
