"""Small CNNs for 28x28 inputs, registered next to timm's architectures."""

from __future__ import annotations

import re

import torch
from torch import nn


def conv_bn_relu(cin: int, cout: int, stride: int = 1, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def separable_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Depthwise-separable convolution (MobileNet's block): 3x3 depthwise, then 1x1 pointwise, each with BN and ReLU.
    About 8x fewer MACs than a plain 3x3 convolution of the same widths."""
    return nn.Sequential(conv_bn_relu(cin, cin, stride, groups=cin), conv_bn_relu(cin, cout, kernel=1))


class SmallCNN(nn.Module):
    """`features` is a plain Sequential so layers are addressable as features.0, features.1, ... for layer pairs.
    A stride of "M" is a 2x2 max pool of its own (no convolution, no width): features.i counts it."""

    def __init__(self, widths: list[int], strides: list[int | str], num_classes: int, in_chans: int = 1,
                 hidden: int = 0, dropout: float = 0.0, separable: bool = False):
        super().__init__()
        layers, cin = [], in_chans
        for i, (width, stride) in enumerate(zip(widths, strides)):
            if stride == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            # The first block stays a plain convolution: a depthwise one over 1-3 input channels learns little.
            block = separable_block if separable and i > 0 else conv_bn_relu
            layers.append(block(cin, width, stride))
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = [nn.Flatten()]
        if hidden:
            head += [nn.Linear(cin, hidden), nn.ReLU(inplace=True)]
            cin = hidden
        head += [nn.Dropout(dropout), nn.Linear(cin, num_classes)] if dropout else [nn.Linear(cin, num_classes)]
        self.head = nn.Sequential(*head)
        self.num_features = cin

    def reset_classifier(self, num_classes: int) -> None:
        """Same call as timm models: a new last Linear with `num_classes` outputs."""
        self.head[-1] = nn.Linear(self.head[-1].in_features, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))



# A CNN described by its name, so that a searched student is an `arch` string like any other:
# "cnn-12-24s2-48s2-96s2-96" = five 3x3 conv blocks of those widths, "s2" marking a stride-2 block;
# "sepcnn-..." the same with depthwise-separable blocks after the first.
CNN_NAME = re.compile(r"^(cnn|sepcnn)((?:-\d+(?:s2)?)+)$")


def cnn_name(widths: list[int], strides: list[int], separable: bool) -> str:
    blocks = "".join(f"-{w}{'s2' if s == 2 else ''}" for w, s in zip(widths, strides))
    return f"{'sepcnn' if separable else 'cnn'}{blocks}"


def parse_cnn_name(name: str) -> tuple[list[int], list[int], bool] | None:
    """(widths, strides, separable) of a CNN name, or None when `name` is not one."""
    match = CNN_NAME.match(name)
    if match is None:
        return None
    blocks = match.group(2).strip("-").split("-")
    widths = [int(b.removesuffix("s2")) for b in blocks]
    if not all(1 <= w <= 4096 for w in widths):
        return None
    return widths, [2 if b.endswith("s2") else 1 for b in blocks], match.group(1) == "sepcnn"
