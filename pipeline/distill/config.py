"""Config sections of the distillation half: `subspaces` and `distill`."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from ..schema import OmitNoneOptions, Section
from .methods import METHODS


class LayerPair(Section):
    teacher: str = Field(description="teacher module name, e.g. 'blocks.4'")
    student: str = Field(description="student module name, e.g. 'features.2'")


class SubspacesConfig(Section):
    positions_per_image: int = Field(20, ge=1, description="random spatial positions kept per image and layer")
    max_images: Optional[int] = Field(
        2048, ge=1, description="cap on training images (None: all); the teacher backward pass dominates the cost")
    batch_size: int = Field(128, ge=1, description="teacher forward/backward batch size")


class DistillConfig(OmitNoneOptions):
    omit_when_none = ("layer_every", "ema_decay")   # left out while unset: existing configs keep their keys

    method: str = Field("kd", description=", ".join(METHODS.names()))  # the METHODS registry
    temperature: float = Field(4.0, gt=0, description="KD softmax temperature T (the loss is scaled by T^2)")
    label_weight: float = Field(0.0, ge=0, description="weight of the label cross-entropy added to the KD loss")
    lambda_layer: Optional[float] = Field(
        None, ge=0, description="weight of the layer loss; None: the method's own default, chosen on validation "
        "data (the loss scales differ by orders of magnitude between methods)")
    layers: list[LayerPair] | Literal["auto"] = Field(
        "auto", description="teacher/student module pairs, or auto: pair the models' stages by relative depth")
    epochs: int = Field(10, ge=1, description="distillation epochs (best on validation kept, unless ema_decay)")
    batch_size: int = Field(64, ge=1, description="training batch size")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    lr_step_epochs: int = Field(25, ge=1, description="halve the learning rate every this many epochs")
    lr_gamma: float = Field(0.5, gt=0, le=1, description="factor applied every lr_step_epochs")
    layer_every: Optional[int] = Field(
        None, ge=1, description="layer methods: the layer loss on every n-th optimizer step only, weighted n x so that "
        "its expected gradient is unchanged (lazy regularisation, as StyleGAN2's R1 term); the steps between are KD "
        "steps that neither tap features nor gather targets (docs/subdistill.md: how large n may be); None: every "
        "step, as the method's reference code does")
    ema_decay: Optional[float] = Field(
        None, gt=0, lt=1, description="keep an exponential moving average of the student's weights (this decay per "
        "optimizer step, e.g. 0.99) and ship the last epoch's average instead of the epoch the validation images "
        "pick; None: the best epoch on validation")
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")

    @model_validator(mode="after")
    def _every_only_for_layer_methods(self):
        # The registry says which methods have a layer loss (an unknown name is reported later).
        if self.layer_every is not None and self.method in METHODS and not METHODS.get(self.method).uses_layers:
            layered = ", ".join(name for name in METHODS if METHODS.get(name).uses_layers)
            raise ValueError(f"layer_every spaces out the layer loss; method {self.method!r} has none: remove "
                             f"distill.layer_every or use a layer method ({layered})")
        return self
