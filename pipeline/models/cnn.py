"""Small CNNs for 28x28 inputs, registered next to timm's architectures."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """`features` is a plain Sequential so layers are addressable as features.0, features.1, ... for layer pairs.
    A stride of "M" is a 2x2 max pool of its own (no convolution, no width): features.i counts it."""

    def __init__(self, widths: list[int], strides: list[int | str], num_classes: int, in_chans: int = 1,
                 hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        layers, cin = [], in_chans
        for width, stride in zip(widths, strides):
            if stride == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers.append(conv_bn_relu(cin, width, stride))
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

