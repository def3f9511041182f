"""Heatmaps of the logit gap z_y - max_{j != y} z_j (over the subtask's classes), by LRP with zennit where its rules
fit the architecture, else by gradient x input; the choice and its reason are recorded with every result.

How LRP is started: zennit's rules divide the incoming vector by the layer's output, so starting the backward pass
at the logits with g_y = z_y, g_m = -z_m (m the strongest other class) makes the last linear layer's epsilon rule
distribute exactly x_j (w_yj - w_mj): the LRP of a virtual output neuron that computes the gap. The input relevance
then sums to the gap minus what the biases absorb (`conservation` in the metrics).

Architectures with LRP support:
- edgesmith CNNs (Conv-BN-ReLU in Sequentials): zennit's SequentialMergeBatchNorm merges each BatchNorm into its
  convolution.
- timm EfficientNet / EfficientNet-Lite without squeeze-excite (the default teacher): BatchNormAct2d is not a leaf
  module, so SequentialMergeBatchNorm misses it; the BatchNorms are folded into the convolutions with the same code
  QAT uses (quantize.fold), ReLU6 is an activation (relevance passes through), and the residual additions of the
  blocks go through a zennit Sum module (SkipSumCanonizer below), so that relevance is split between the branch and
  the shortcut in proportion to their contributions instead of being copied into both.
Anything else gets gradient x input (no canonizer for its residuals/attention, so LRP rules would not be valid).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..data import View


@dataclass
class Explainer:
    model: nn.Module                # a prepared copy (eval, no in-place ops, BatchNorm merged where needed)
    method: str                     # "lrp" or "gradient_x_input"
    rules: str                      # composite + canonizers, or why LRP was not used
    make_composite: Optional[Callable[[torch.Tensor, torch.Tensor], object]] = None

    def describe(self) -> dict:
        return {"method": self.method, "rules": self.rules}


def make_explainer(model: nn.Module, method: str = "lrp", composite: str = "epsilon_gamma_box") -> Explainer:
    prepared = _without_inplace(copy.deepcopy(model).eval())
    if method == "gradient_x_input":
        return Explainer(prepared, "gradient_x_input", "gradient x input (requested)")
    try:
        import zennit  # noqa: F401
    except ImportError:
        return Explainer(prepared, "gradient_x_input",
                         "gradient x input: zennit is not installed (pip install 'edgesmith[xai]') so no LRP rules")
    family = _lrp_family(prepared)
    if family is None:
        return Explainer(prepared, "gradient_x_input",
                         f"gradient x input: no LRP canonizer for {type(model).__name__} in edgesmith "
                         "(residual or attention blocks would break relevance conservation)")
    prepared, canonizers, notes = family(prepared)
    return Explainer(prepared, "lrp", f"LRP {composite} ({notes})", _composite_factory(composite, canonizers))


# -- architectures ------------------------------------------------------------------------------------------------

def _lrp_family(model: nn.Module):
    from ..models.cnn import SmallCNN

    if isinstance(model, SmallCNN):
        return _prepare_small_cnn
    if _is_plain_efficientnet(model):
        return _prepare_efficientnet
    return None


def _prepare_small_cnn(model: nn.Module):
    from zennit.canonizers import SequentialMergeBatchNorm

    return model, [SequentialMergeBatchNorm()], "canonizer SequentialMergeBatchNorm"


def _is_plain_efficientnet(model: nn.Module) -> bool:
    try:
        from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
        from timm.models.efficientnet import EfficientNet
    except ImportError:
        return False
    if not isinstance(model, EfficientNet):
        return False
    blocks = [b for stage in model.blocks for b in stage]
    return all(isinstance(b, (DepthwiseSeparableConv, InvertedResidual)) and isinstance(b.se, nn.Identity)
               and getattr(b, "conv_s2d", None) is None for b in blocks)


def _prepare_efficientnet(model: nn.Module):
    folded = fold_consecutive_batchnorms(model)
    left = [n for n, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    note = "BatchNormAct2d folded into the convolutions, canonizer SkipSumCanonizer for the residual additions"
    if left:
        note += f"; BatchNorms left unfolded (relevance passes through): {', '.join(left)}"
    return folded, [skip_sum_canonizer()], note


@torch.no_grad()
def fold_consecutive_batchnorms(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm registered right after a convolution in the same parent into that convolution, in
    place. timm's EfficientNet registers its modules in forward order (conv_stem, bn1, ...; conv_dw, bn1, ...), and
    fx cannot trace it (its 'same' padding branches on shapes), so quantize.fold's tracer finds no pairs there."""
    from quantize.fold import fold_into_conv, foldable_batchnorm

    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and foldable_batchnorm(bn):
                fold_into_conv(conv, bn)
                # What a BatchNormAct2d does after normalising stays: its dropout and activation.
                rest = nn.Sequential(bn.drop, bn.act) if type(bn) is not nn.BatchNorm2d else nn.Identity()
                setattr(parent, bn_name, rest)
    return model


def skip_sum_canonizer():
    """A zennit AttributeCanonizer: timm blocks with `has_skip` compute `branch + shortcut` with a plain `+`, which
    no rule can see; this routes the addition through a zennit Sum module (rule: Norm) while attributions run."""
    from zennit.canonizers import AttributeCanonizer
    from zennit.layer import Sum

    def attributes(name, module):
        if getattr(module, "has_skip", False) and hasattr(module, "drop_path"):
            return {"forward": _skip_sum_forward.__get__(module), "canonizer_sum": Sum()}
        return None

    return AttributeCanonizer(attributes)


def _skip_sum_forward(self, x):
    # The block's own forward without its skip (timm's code stays the source of truth), then the Sum module.
    self.has_skip = False
    try:
        branch = type(self).forward(self, x)
    finally:
        self.has_skip = True
    return self.canonizer_sum(torch.stack([x, self.drop_path(branch)], dim=-1))


def _composite_factory(name: str, canonizers: list):
    from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat

    def make(low: torch.Tensor, high: torch.Tensor):
        if name == "epsilon_plus_flat":
            return EpsilonPlusFlat(canonizers=canonizers)
        return EpsilonGammaBox(low=low, high=high, canonizers=canonizers)

    return make


def _without_inplace(model: nn.Module) -> nn.Module:
    # zennit's hooks wrap module outputs; an in-place activation would overwrite a tensor autograd still needs.
    for module in model.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return model


# -- the logit gap ---------------------------------------------------------------------------------------------------

def gap_targets(logits: torch.Tensor, targets: torch.Tensor, columns: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Head columns of the target class and of the strongest other subtask class, per image."""
    cols = torch.as_tensor(columns, device=logits.device)
    sub = logits[:, cols].detach().clone()
    sub[torch.arange(len(sub)), targets] = float("-inf")
    return cols[targets], cols[sub.argmax(1)]


def logit_gap(logits: torch.Tensor, targets: torch.Tensor, columns: list[int]) -> torch.Tensor:
    y, m = gap_targets(logits, targets, columns)
    rows = torch.arange(len(logits), device=logits.device)
    return logits[rows, y] - logits[rows, m]


def relevance(explainer: Explainer, view: View, images_u8: torch.Tensor, targets: torch.Tensor,
              columns: list[int], batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Input relevance (N x C x H x W, in the model's view) and the logit gap per image."""
    maps, gaps = [], []
    for start in range(0, len(images_u8), batch_size):
        x = view(images_u8[start:start + batch_size])
        t = targets[start:start + batch_size]
        r, g = (_lrp if explainer.method == "lrp" else _gradient_x_input)(explainer, view, x, t, columns)
        maps.append(r.detach())
        gaps.append(g.detach())
    return torch.cat(maps), torch.cat(gaps)


def _start_vector(logits: torch.Tensor, targets: torch.Tensor, columns: list[int], scaled: bool) -> torch.Tensor:
    y, m = gap_targets(logits, targets, columns)
    rows = torch.arange(len(logits), device=logits.device)
    start = torch.zeros_like(logits)
    start[rows, y] = logits[rows, y].detach() if scaled else 1.0
    start[rows, m] = -logits[rows, m].detach() if scaled else -1.0
    return start


def _lrp(explainer: Explainer, view: View, x: torch.Tensor, targets, columns):
    from zennit.attribution import Gradient

    low, high = _bounds(view, x)
    composite = explainer.make_composite(low, high)
    seen = {}

    def start(output):
        seen["logits"] = output.detach()
        return _start_vector(output, targets, columns, scaled=True)

    with Gradient(model=explainer.model, composite=composite) as attributor:
        _, attribution = attributor(x.clone(), start)
    return attribution, logit_gap(seen["logits"], targets, columns)


def _gradient_x_input(explainer: Explainer, view: View, x: torch.Tensor, targets, columns):
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        logits = explainer.model(x)
        (grad,) = torch.autograd.grad(logits, x, _start_vector(logits, targets, columns, scaled=False))
    return grad * x.detach(), logit_gap(logits.detach(), targets, columns)


def _bounds(view: View, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest and highest value each input can take after normalisation (pixels 0 and 255), for ZBox."""
    mean = torch.tensor(view.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(view.std, dtype=x.dtype).view(1, -1, 1, 1)
    return ((0 - mean) / std).expand_as(x).contiguous(), ((1 - mean) / std).expand_as(x).contiguous()
