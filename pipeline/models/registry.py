"""Architectures by name: the small CNNs registered here, and any timm model."""

from __future__ import annotations

from torch import nn

from ..errors import ModelError
from ..registry import Registry, did_you_mean
from .cnn import SmallCNN

ARCHS: Registry = Registry("architecture")


@ARCHS.register("cnn_small")
def cnn_small(num_classes: int, in_chans: int = 1) -> nn.Module:
    """~47k parameters, ~3 M MACs at 28x28 (a tenth of EfficientNet-Lite0 at 64x64): the default student."""
    return SmallCNN([16, 32, 48, 64], [1, 2, 2, 1], num_classes, in_chans)


@ARCHS.register("cnn_compact")
def cnn_compact(num_classes: int, in_chans: int = 1) -> nn.Module:
    """~138k parameters in the same ~3.1 M MACs as cnn_small (a tenth of EfficientNet-Lite0 at 64x64): it reaches
    4x4 before its widest layers, so it affords three times the weights. The default student: 87.0 % vs cnn_small's
    85.2 % on the default config's subtask (same teacher, KD + labels + outlier exposure)."""
    return SmallCNN([12, 24, 48, 96, 96], [1, 2, 2, 2, 1], num_classes, in_chans)


@ARCHS.register("cnn_tiny")
def cnn_tiny(num_classes: int, in_chans: int = 1) -> nn.Module:
    """A few thousand parameters: for tests."""
    return SmallCNN([8, 16], [2, 2], num_classes, in_chans)


@ARCHS.register("cnn_medium")
def cnn_medium(num_classes: int, in_chans: int = 1) -> nn.Module:
    """~1M parameters: a student with real compute (INT8 pays off here)."""
    return SmallCNN([64, 128, 128, 256, 256], [1, 2, 1, 2, 1], num_classes, in_chans)


@ARCHS.register("cnn_teacher")
def cnn_teacher(num_classes: int, in_chans: int = 1) -> nn.Module:
    """~1.1M parameters: a teacher trained from scratch when no foundation model is at hand."""
    return SmallCNN([32, 64, 128, 128, 256, 256], [1, 2, 1, 2, 1, 1], num_classes, in_chans, hidden=256,
                    dropout=0.2)


def create_model(arch: str, num_classes: int, in_chans: int, pretrained: bool = False) -> nn.Module:
    if arch in ARCHS:
        if pretrained:
            raise ModelError(f"'{arch}' is an edgesmith CNN without pretrained weights.", "Set pretrained: false.")
        return ARCHS.get(arch)(num_classes=num_classes, in_chans=in_chans)
    import timm

    if not timm.is_model(arch):
        names = ARCHS.names()
        hint = did_you_mean(arch, names + timm.list_models(arch[:4] + "*"))
        raise ModelError(f"Unknown architecture '{arch}'.{hint}",
                         f"Use one of edgesmith's ({', '.join(names)}) or any timm model name (timm.list_models()).")
    return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans)
