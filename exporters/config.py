"""Config section `export`: which deployable artifacts are written and how they are checked."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from pydantic import Field, field_validator

from pipeline.registry import did_you_mean
from pipeline.schema import Section


@dataclass(frozen=True)
class FormatSpec:
    name: str
    int8_only: bool = False  # writes only the qat stage's INT8 model, so the config needs a qat section
    mobile: bool = False     # converters in the `mobile` extra; its INT8 is PT2E on the qat stage's calibration images
    extra: str = ""          # another extra it needs besides (ethos_u: `npu`, Arm's Vela compiler)


# The one list of export formats, in the order they run whatever the config's order (later ones convert the
# earlier ones' files). exporters/formats.py registers one function per name (a test keeps it in step); this
# module stays free of torch so that a config is validated without loading the converters.
FORMATS = (FormatSpec("onnx"), FormatSpec("onnx_int8", int8_only=True), FormatSpec("openvino"),
           FormatSpec("tensorrt"), FormatSpec("litert", mobile=True), FormatSpec("tflm", int8_only=True, mobile=True),
           FormatSpec("ethos_u", int8_only=True, mobile=True, extra="npu"), FormatSpec("executorch", mobile=True))
FORMAT_NAMES = tuple(f.name for f in FORMATS)
INT8_ONLY_FORMATS = tuple(f.name for f in FORMATS if f.int8_only)
MOBILE_FORMATS = tuple(f.name for f in FORMATS if f.mobile)
FORMAT_EXTRAS = {f.name: f.extra for f in FORMATS if f.extra}

# Vela's --accelerator-config choices (ethos-u-vela 5.2): Ethos-U55/U65/U85 and their MACs per cycle. Listed here
# so that a config is checked without Vela installed.
ACCELERATORS = ("ethos-u55-32", "ethos-u55-64", "ethos-u55-128", "ethos-u55-256", "ethos-u65-256", "ethos-u65-512",
                "ethos-u85-128", "ethos-u85-256", "ethos-u85-512", "ethos-u85-1024", "ethos-u85-2048")
# System config and memory mode of Arm's vela.ini that Vela itself falls back to for each NPU family.
NPU_DEFAULTS = {"ethos-u55": ("Ethos_U55_High_End_Embedded", "Shared_Sram"),
                "ethos-u65": ("Ethos_U65_Client_Server", "Dedicated_Sram_384KB"),
                "ethos-u85": ("Ethos_U85_SYS_DRAM_Mid", "Dedicated_Sram_384KB")}


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


class NpuTarget(Section):
    accelerator: str = Field(description=f"Vela accelerator config: {', '.join(ACCELERATORS)}")
    system_config: Optional[str] = Field(
        None, description="[System_Config.<name>] of the ini (clock, memories); None: Vela's default for the family "
                          "(U55: Ethos_U55_High_End_Embedded, U65: Ethos_U65_Client_Server, U85: Ethos_U85_SYS_DRAM_Mid)")
    memory_mode: Optional[str] = Field(
        None, description="[Memory_Mode.<name>] of the ini; None: Vela's default (U55: Shared_Sram, else "
                          "Dedicated_Sram_384KB)")
    name: Optional[str] = Field(None, description="folder under ethos_u/ (default: the accelerator)")

    @field_validator("accelerator")
    @classmethod
    def _known(cls, v):
        if v not in ACCELERATORS:
            raise ValueError(f"unknown Ethos-U accelerator config '{v}'.{did_you_mean(v, list(ACCELERATORS))} "
                             f"Valid accelerator configs (Vela's --accelerator-config): {', '.join(ACCELERATORS)}")
        return v

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v):
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"ethos_u target name '{v}' must be a plain folder name (letters, digits, . _ -)")
        return v

    @property
    def folder(self) -> str:
        return self.name or self.accelerator

    def resolved(self) -> tuple[str, str]:
        """(system config, memory mode), Vela's family defaults filled in."""
        system, memory = NPU_DEFAULTS[self.accelerator.rsplit("-", 1)[0]]
        return self.system_config or system, self.memory_mode or memory


class EthosUConfig(Section):
    targets: list[NpuTarget] = Field(
        default_factory=lambda: [NpuTarget(accelerator="ethos-u55-128")], min_length=1,
        description="NPU configurations to compile for: an accelerator name, or {accelerator, system_config, "
                    "memory_mode, name}")
    ini: Optional[str] = Field(None, description="a Vela .ini with the system configs and memory modes named "
                                                 "(None: Arm's vela.ini shipped with Vela)")
    optimise: Literal["Performance", "Size"] = Field("Performance", description="Vela's --optimise strategy")

    @field_validator("targets", mode="before")
    @classmethod
    def _names_as_targets(cls, v):
        return [{"accelerator": t} if isinstance(t, str) else t for t in v] if isinstance(v, list) else v

    @field_validator("targets")
    @classmethod
    def _distinct(cls, v):
        folders = [t.folder for t in v]
        twice = sorted({f for f in folders if folders.count(f) > 1})
        if twice:
            raise ValueError(f"ethos_u targets share the folder {', '.join(twice)}: give each a distinct `name`")
        return v


class ExportConfig(Section):
    formats: list[str] = Field(
        default_factory=lambda: ["onnx", "onnx_int8", "openvino"],
        description=f"{', '.join(n for n in FORMAT_NAMES if n not in MOBILE_FORMATS)}; "
                    f"{', '.join(MOBILE_FORMATS)} (the `mobile` extra; ethos_u the `npu` extra too)")
    opset: int = Field(17, ge=13, le=21, description="ONNX opset (13+: per-channel QuantizeLinear)")
    dynamic_batch: bool = Field(True, description="ONNX/IR batch dimension left dynamic")
    parity_limit: int = Field(1000, ge=1, description="validation images used for the parity checks")
    eval_images: int = Field(2000, ge=1, description="test images written to eval.npz for the device tests")
    tensorrt: TensorRTConfig = TensorRTConfig()
    ethos_u: EthosUConfig = EthosUConfig()

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
