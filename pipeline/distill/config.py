"""Config sections of the distillation half: `subspaces` and `distill`."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ..schema import Section


class LayerPair(Section):
    teacher: str = Field(description="teacher module name, e.g. 'blocks.4'")
    student: str = Field(description="student module name, e.g. 'features.2'")


class SubspacesConfig(Section):
    basis: Literal["subdistill", "pca", "prca", "random"] = "subdistill"
    positions_per_image: int = Field(20, ge=1)
    max_images: Optional[int] = Field(None, ge=1, description="cap on training images used (None: all)")
    batch_size: int = Field(128, ge=1)


class DistillConfig(Section):
    method: str = "kd"
    temperature: float = Field(4.0, gt=0)
    label_weight: float = Field(0.0, ge=0, description="weight of the label cross-entropy added to the KD loss")
    lambda_layer: float = Field(100.0, ge=0)
    layers: list[LayerPair] | Literal["auto"] = Field(default_factory=list)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_step_epochs: int = Field(25, ge=1, description="halve the learning rate every this many epochs")
    lr_gamma: float = Field(0.5, gt=0, le=1)
    cache_teacher: bool = Field(True, description="compute the frozen teacher's outputs once (no augmentation)")
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
