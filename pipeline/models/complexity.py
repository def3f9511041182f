"""Parameter and multiply-accumulate counts, measured by running the model once."""

from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of conv and linear layers for one image (the layers that dominate any CNN or ViT)."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inp, out):
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1] * (module.in_channels // module.groups)
        total += out.numel() // out.shape[0] * k

    def linear_hook(module: nn.Linear, _inp, out):
        nonlocal total
        total += out.numel() // out.shape[0] * module.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return int(total)
