"""Config section `qat`: how the distilled student is quantized to INT8 (NNCF PTQ, then optional QAT)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.schema import Section


class IgnoredScopeConfig(Section):
    """Layers NNCF leaves in float. Names are NNCF graph node names such as 'features/0/0/conv2d/0'
    (an unknown name is an error that lists the valid ones); types are op types such as 'linear'."""

    names: list[str] = Field(default_factory=list, description="NNCF node names kept in float")
    types: list[str] = Field(default_factory=list, description="op types kept in float, e.g. linear")
    patterns: list[str] = Field(default_factory=list, description="regular expressions over node names")

    @property
    def empty(self) -> bool:
        return not (self.names or self.types or self.patterns)


class QATConfig(Section):
    mode: Literal["qat", "ptq", "ptq_accuracy_control"] = Field(
        "qat", description="ptq: calibrate only; qat: calibrate, then fine-tune; ptq_accuracy_control: calibrate, "
        "then NNCF reverts the most harmful layers to float until the validation drop is at most max_drop")
    max_drop: float = Field(0.01, ge=0, le=1, description="ptq_accuracy_control: largest validation accuracy drop "
                            "vs FP32 (a fraction: 0.005 = half a point); the build fails if the result misses it")
    keep_fp32: list[str] = Field(default_factory=list, description="layers left in float (Conv/Linear module "
                                 "names such as features.0.0), or [auto]: the keep_fp32_count layers with the "
                                 "largest per-layer quantization error")
    keep_fp32_count: int = Field(1, ge=1, description="how many layers keep_fp32: [auto] keeps in float")
    calibration_size: int = Field(300, ge=1, description="training images used to calibrate the quantizers")
    epochs: int = Field(2, ge=1, description="QAT fine-tuning epochs (best epoch on validation is kept)")
    lr: float = Field(1e-4, gt=0, description="QAT fine-tuning learning rate")
    batch_size: int = Field(64, ge=1, description="QAT fine-tuning batch size")
    max_images: int | None = Field(None, ge=1, description="cap on training images per QAT epoch (None: all)")
    preset: Literal["performance", "mixed"] = Field(
        "performance", description="performance: symmetric activations; mixed: asymmetric activations")
    ignored_scope: IgnoredScopeConfig = IgnoredScopeConfig()
    fold_bn: bool = Field(True, description="fold BatchNorm into convolutions first (needed for fused INT8 kernels)")

    @model_validator(mode="after")
    def _auto_alone(self):
        if "auto" in self.keep_fp32 and len(self.keep_fp32) > 1:
            raise ValueError("keep_fp32 is either [auto] or a list of layer names, not both")
        return self
