"""Architectures by name: the small CNNs registered here, and any timm model."""

from __future__ import annotations

from torch import nn

from ..errors import ModelError
from ..registry import Registry, did_you_mean
from .cnn import SmallCNN, parse_cnn_name

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


# The fixed comparison setting of bench/reference_setting.py: VGG-style conv3x3-BN-ReLU blocks with max pools,
# global average pool, one linear layer. features.i: teacher 0-1 at 28x28, 3-4 at 14x14, 6-7 at 7x7; student 0 at
# 28x28, 2 at 14x14, 4-5 at 7x7 (the others are the pools).
_POOL = 0     # the width entry of a max pool is ignored

@ARCHS.register("cnn_reference_teacher")
def cnn_reference_teacher(num_classes: int, in_chans: int = 1) -> nn.Module:
    """1.13 M parameters, ~101 M MACs at 28x28: widths 32-64-maxpool-128-128-maxpool-256-256."""
    return SmallCNN([32, 64, _POOL, 128, 128, _POOL, 256, 256], [1, 1, "M", 1, 1, "M", 1, 1], num_classes, in_chans)


@ARCHS.register("cnn_reference_student")
def cnn_reference_student(num_classes: int, in_chans: int = 1) -> nn.Module:
    """~61 k parameters, ~3.7 M MACs at 28x28: widths 16-maxpool-32-maxpool-64-64."""
    return SmallCNN([16, _POOL, 32, _POOL, 64, 64], [1, "M", 1, "M", 1, 1], num_classes, in_chans)


def create_model(arch: str, num_classes: int, in_chans: int, pretrained: bool = False) -> nn.Module:
    named = parse_cnn_name(arch)
    if arch in ARCHS or named is not None:
        if pretrained:
            raise ModelError(f"'{arch}' is an edgesmith CNN without pretrained weights.", "Set pretrained: false.")
        if named is not None:
            widths, strides, separable = named
            return SmallCNN(widths, strides, num_classes, in_chans, separable=separable)
        return ARCHS.get(arch)(num_classes=num_classes, in_chans=in_chans)
    import timm

    if not timm.is_model(arch):
        names = ARCHS.names()
        hint = did_you_mean(arch, names + timm.list_models(arch[:4] + "*"))
        raise ModelError(f"Unknown architecture '{arch}'.{hint}",
                         f"Use one of edgesmith's ({', '.join(names)}), a CNN by its layers (e.g. cnn-12-24s2-48s2-96s2-96, "
                         "sepcnn-... for depthwise-separable blocks) or any timm model name (timm.list_models()).")
    return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans)
