"""Config section `export`: which deployable artifacts are written and how they are checked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from pipeline.registry import did_you_mean
from pipeline.schema import Section


@dataclass(frozen=True)
class FormatSpec:
    name: str
    int8_only: bool = False  # writes only the qat stage's INT8 model, so the config needs a qat section
    mobile: bool = False     # converters in the `mobile` extra; its INT8 is PT2E on the qat stage's calibration images


# The one list of export formats, in the order they run whatever the config's order (later ones convert the
# earlier ones' files). exporters/formats.py registers one function per name (a test keeps it in step); this
# module stays free of torch so that a config is validated without loading the converters.
FORMATS = (FormatSpec("onnx"), FormatSpec("onnx_int8", int8_only=True), FormatSpec("openvino"),
           FormatSpec("tensorrt"), FormatSpec("litert", mobile=True), FormatSpec("tflm", int8_only=True, mobile=True),
           FormatSpec("executorch", mobile=True))
FORMAT_NAMES = tuple(f.name for f in FORMATS)
INT8_ONLY_FORMATS = tuple(f.name for f in FORMATS if f.int8_only)
MOBILE_FORMATS = tuple(f.name for f in FORMATS if f.mobile)


def in_order(names: list[str]) -> list[str]:
    """Config format names in the order they run."""
    return sorted(names, key=FORMAT_NAMES.index)


class TensorRTConfig(Section):
    precision: Literal["fp16", "int8"] = Field(
        "int8", description="int8 builds from the Q/DQ ONNX (explicit quantization); fp16 from the FP32 ONNX")
    workspace_mb: int = Field(1024, ge=16, description="builder workspace memory pool")
    timing_cache: bool = Field(True, description="reuse kernel timings between builds on the same device")
    min_batch: int = Field(1, ge=1, description="optimisation profile: smallest batch")
    opt_batch: int = Field(1, ge=1, description="optimisation profile: batch the kernels are tuned for")
    max_batch: int = Field(64, ge=1, description="optimisation profile: largest batch")


class ExportConfig(Section):
    formats: list[str] = Field(
        default_factory=lambda: ["onnx", "onnx_int8", "openvino"],
        description=f"{', '.join(n for n in FORMAT_NAMES if n not in MOBILE_FORMATS)}; "
                    f"{', '.join(MOBILE_FORMATS)} (the `mobile` extra)")
    opset: int = Field(17, ge=13, le=21, description="ONNX opset (13+: per-channel QuantizeLinear)")
    dynamic_batch: bool = Field(True, description="ONNX/IR batch dimension left dynamic")
    parity_limit: int = Field(1000, ge=1, description="validation images used for the parity checks")
    eval_images: int = Field(2000, ge=1, description="test images written to eval.npz for the device tests")
    tensorrt: TensorRTConfig = TensorRTConfig()

    def int8_only(self) -> list[str]:
        """The asked-for formats that can only be written from the qat stage's INT8 model."""
        int8_engine = "tensorrt" in self.formats and self.tensorrt.precision == "int8"
        return [f for f in self.formats if f in INT8_ONLY_FORMATS] + (["tensorrt"] if int8_engine else [])

    @field_validator("formats")
    @classmethod
    def _distinct(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("export formats must be distinct")
        if not v:
            raise ValueError("list at least one export format")
        unknown = [f"unknown export format '{name}'.{did_you_mean(name, list(FORMAT_NAMES))}"
                   for name in v if name not in FORMAT_NAMES]
        if unknown:
            raise ValueError(" ".join(unknown) + f" Valid formats: {', '.join(FORMAT_NAMES)}")
        return v
