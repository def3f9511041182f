"""Fold BatchNorm into the convolution before it.

Why before NNCF: a BatchNorm left in the graph sits between the INT8 convolution and its output quantizer
(DQ -> Conv -> BN -> Q), ONNX Runtime then cannot fuse the pattern into QLinearConv and INT8 runs slower
than FP32. Folded, the quantizers also see the statistics of the weights actually deployed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module names where the BatchNorm's only input is that convolution's output."""
    try:
        return _pairs_from_trace(model)
    except Exception:  # noqa: BLE001  (models fx cannot trace: fall back to the module layout)
        return _pairs_from_sequentials(model)


class _BatchNormLeafTracer(torch.fx.Tracer):
    """Keeps BatchNorm subclasses (timm's BatchNormAct2d) and convolution subclasses as single nodes instead of
    tracing into them: timm's Conv2dSame pads by the input's size, control flow that fx cannot trace (the whole
    trace then failed and no BatchNorm of a tf_efficientnet was folded)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (foldable_batchnorm(module) or isinstance(module, nn.Conv2d)
                or super().is_leaf_module(module, qualified_name))


def foldable_batchnorm(module: nn.Module) -> bool:
    """A plain BatchNorm2d, or timm's BatchNormAct2d (BatchNorm, then its `drop` and `act` modules)."""
    return type(module) is nn.BatchNorm2d or (
        isinstance(module, nn.BatchNorm2d) and isinstance(getattr(module, "act", None), nn.Module)
        and isinstance(getattr(module, "drop", None), nn.Module))


def _pairs_from_trace(model: nn.Module) -> list[tuple[str, str]]:
    graph = _BatchNormLeafTracer().trace(model)
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not foldable_batchnorm(modules.get(node.target)):
            continue
        source = node.args[0]
        if (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and isinstance(modules.get(source.target), nn.Conv2d) and len(source.users) == 1):
            pairs.append((source.target, node.target))
    return pairs


def _pairs_from_sequentials(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and foldable_batchnorm(bn):
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + conv_name, prefix + bn_name))
    return pairs


@torch.no_grad()
def fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv(x) * g + b with g = gamma / sqrt(var + eps), b = beta - mean * g, written into conv in place."""
    gain = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * gain
    conv.weight.mul_(gain.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
    new_bias = bias * gain + shift
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of `model` (eval) with every foldable BatchNorm2d folded and replaced by Identity.
    Returns the copy and the names of the BatchNorms that stayed (not directly after a convolution)."""
    folded = copy.deepcopy(model).eval()
    pairs = find_conv_bn_pairs(folded)
    modules = dict(folded.named_modules())
    for conv_name, bn_name in pairs:
        bn = modules[bn_name]
        fold_into_conv(modules[conv_name], bn)
        # What a BatchNormAct2d does after normalising stays: its dropout and activation.
        _replace(folded, bn_name, nn.Sequential(bn.drop, bn.act) if type(bn) is not nn.BatchNorm2d else nn.Identity())
    left = [n for n, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return folded, left


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def max_output_difference(a: nn.Module, b: nn.Module, example: torch.Tensor) -> float:
    return float((a.eval()(example) - b.eval()(example)).abs().max())
