"""Config section `validate`: where to run the on-device suite, how to measure, and the budgets that fail
the build. Accuracies are fractions (0.85 = 85 %); drops are in the same unit (0.01 = one point)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from device_tests.runners import RUNNERS

from ..schema import OmitNoneOptions, Section
from ..xai.config import ExplainConfig
from .targets import parse_target

# The device suite's runners (device_tests/runners, RUNNERS): a registered runner is a valid name here.
Runtime = Literal[tuple(sorted(RUNNERS))]  # type: ignore[valid-type]
PerTarget = Union[float, dict[str, float]]
PER_TARGET_BUDGETS = ("max_p90_ms", "max_p99_ms", "max_arena_kb", "max_flash_kb", "max_npu_ms", "max_npu_sram_kb",
                      "max_npu_flash_kb", "max_cpu_fallback_ops")


class LatencyConfig(Section):
    """MLPerf single-stream discipline (docs/validation.md): warm-up discarded, >= min_queries AND >= min_duration_s."""

    min_queries: int = Field(1024, ge=1, description="timed batch-1 queries, at least")
    min_duration_s: float = Field(2.0, ge=0, description="timed duration, at least (both minimums must be met)")
    warmup: int = Field(50, ge=0, description="untimed queries first (discarded)")
    throughput_batch: int = Field(64, ge=1, description="batch size of the throughput measurement")


class Budgets(Section):
    """Every budget is optional (None: not checked). Latency budgets apply to the model call at batch 1 and may
    be one number for all targets or a mapping target -> number."""

    min_accuracy: Optional[float] = Field(None, ge=0, le=1, description="top-1 of every artifact on the eval set")
    max_drop_vs_fp32: Optional[float] = Field(None, ge=0, le=1, description="FP32 student top-1 minus artifact top-1")
    max_drop_vs_teacher: Optional[float] = Field(None, ge=0, le=1, description="teacher top-1 minus artifact top-1")
    max_p90_ms: Optional[PerTarget] = Field(None, description="p90 of the batch-1 model call, ms (number or {target: ms})")
    max_p99_ms: Optional[PerTarget] = Field(None, description="p99 of the batch-1 model call, ms (number or {target: ms})")
    max_size_mb: Optional[float] = Field(None, gt=0, description="artifact file size (MiB)")
    max_peak_rss_mb: Optional[float] = Field(None, gt=0, description="peak resident memory of the measuring process (MiB)")
    max_fpr95: Optional[float] = Field(None, ge=0, le=1, description="out-of-subtask inputs accepted at 95 % TPR "
                                       "(needs the `ood` section)")
    min_auroc: Optional[float] = Field(None, ge=0, le=1, description="AUROC of in- vs out-of-subtask scores "
                                       "(needs the `ood` section)")
    max_arena_kb: Optional[PerTarget] = Field(None, description="TFLite Micro tensor arena (RAM) the tflm artifact "
                                              "uses, KiB (number or {target: KiB})")
    max_flash_kb: Optional[PerTarget] = Field(None, description="flash the tflm artifact's flatbuffer takes, KiB "
                                              "(number or {target: KiB})")

    # Arm Ethos-U NPUs (export format ethos_u): Vela's estimates for each compiled NPU target.
    max_npu_ms: Optional[PerTarget] = Field(None, description="Vela's estimated time per inference on the NPU, ms "
                                            "(number or {target: ms})")
    max_npu_sram_kb: Optional[PerTarget] = Field(None, description="SRAM Vela allocates for the NPU, KiB (number or "
                                                 "{target: KiB})")
    max_npu_flash_kb: Optional[PerTarget] = Field(None, description="flash (or DRAM) Vela places the weights in, KiB "
                                                  "(number or {target: KiB})")
    max_cpu_fallback_ops: Optional[PerTarget] = Field(None, description="operators Vela leaves to the CPU (number or "
                                                      "{target: count}; 0: all on the NPU)")

    @field_validator("max_p90_ms", "max_p99_ms", "max_arena_kb", "max_flash_kb", "max_npu_ms", "max_npu_sram_kb",
                     "max_npu_flash_kb")
    @classmethod
    def _positive(cls, v):
        values = v.values() if isinstance(v, dict) else [v] if v is not None else []
        if any(x <= 0 for x in values):
            raise ValueError("latency and MCU/NPU memory budgets must be positive (ms, KiB)")
        return v

    @field_validator("max_cpu_fallback_ops")
    @classmethod
    def _count(cls, v):
        values = v.values() if isinstance(v, dict) else [v] if v is not None else []
        if any(x < 0 or x != int(x) for x in values):
            raise ValueError("max_cpu_fallback_ops must be a whole number of operators, 0 or more")
        return v


class SshConfig(Section):
    python: str = Field("python3", description="Python on the target; a venv with its packages is made from it")
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP connect, banner and auth timeout")
    command_timeout_s: float = Field(1800.0, gt=0, description="limit for one remote command (the suite run)")
    known_hosts: Optional[str] = Field(None, description="default ~/.ssh/known_hosts; unknown hosts are refused")
    key_file: Optional[str] = Field(None, description="private key (default: ssh agent and ~/.ssh/id_*)")
    workdir: str = Field(".cache/edgesmith", description="folder on the target (relative to the login's home)")


class ValidateConfig(OmitNoneOptions):
    omit_when_none = ("explain",)

    targets: list[str] = Field(default_factory=lambda: ["local"], min_length=1,
                               description="local, or ssh://user@host[:port], optionally ?python=/path/to/python "
                               "and ?emulated=true (an emulated CPU: latency marked, not budgeted)")
    runtimes: list[Runtime] = Field(default_factory=lambda: ["onnxruntime", "openvino"], min_length=1,
                                    description="runtimes each artifact is measured with (where it can load it)")
    threads: int = Field(1, ge=0, description="runtime threads (0: the runtime's default)")
    precision_hint: Literal["f32", "bf16", "f16"] = Field("f32", description="OpenVINO inference precision")
    min_fp32_agreement: float = Field(0.99, ge=0, le=1, description="FP32 artifacts vs the exported FP32 predictions")
    latency: LatencyConfig = LatencyConfig()
    budgets: Budgets = Budgets()
    ssh: SshConfig = SshConfig()
    explain: Optional[ExplainConfig] = Field(
        None, description="heatmap agreement teacher vs student (LRP, zennit) in the report; None: not computed")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v):
        for target in v:
            parse_target(target)  # ValueError with the accepted forms
        if len(set(v)) != len(v):
            raise ValueError("targets must be distinct")
        return v

    @model_validator(mode="after")
    def _per_target_budgets_name_targets(self):
        for key in PER_TARGET_BUDGETS:
            value = getattr(self.budgets, key)
            unknown = sorted(set(value) - set(self.targets)) if isinstance(value, dict) else []
            if unknown:
                raise ValueError(f"budgets.{key} names {unknown}, which are not in targets {self.targets}")
        return self
