"""Config section `search`: which students to try, how long each trial trains, and the budgets the chosen one must
meet. With the section set (and `student.arch: search`), the search stage picks the student and distill trains it."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from ..schema import Section


def _non_empty_unique(values: list, what: str) -> list:
    if not values:
        raise ValueError(f"{what} is empty: give at least one value")
    if len(set(values)) != len(values):
        raise ValueError(f"{what} lists a value twice: {values}")
    return values


class CnnFamily(Section):
    """edgesmith's CNN, parametrised: `blocks` 3x3 conv blocks; the first is `width` channels wide, and the width
    doubles at each of the `downsamples` stride-2 blocks that follow it (cnn_compact is blocks 5, width 12,
    downsamples 3, plain, at 28 px)."""

    family: Literal["cnn"] = "cnn"
    blocks: list[int] = Field([3, 4, 5, 6], description="numbers of conv blocks to try")
    widths: list[int] = Field([4, 6, 8, 12, 16], description="widths of the first block to try (channels)")
    downsamples: list[int] = Field([2, 3], description="numbers of stride-2 blocks to try (after the first block)")
    separable: list[bool] = Field([False, True], description="plain 3x3 convolutions, depthwise-separable ones, or both")
    resolutions: list[int] = Field([20, 24, 28], description="student input sizes to try (pixels)")

    @field_validator("blocks", "widths", "downsamples", "resolutions")
    @classmethod
    def _positive(cls, v, info):
        _non_empty_unique(v, f"search cnn family {info.field_name}")
        if any(x < 1 for x in v):
            raise ValueError(f"search cnn family {info.field_name} must be positive: {v}")
        return v

    @field_validator("separable")
    @classmethod
    def _choices(cls, v):
        return _non_empty_unique(v, "search cnn family separable")


class TimmFamily(Section):
    """Named timm architectures (e.g. mobilenetv3_small_050, mnasnet_small, efficientnet_b0 ...) at the given
    input sizes, trained from scratch on the subtask (no pretrained weights are downloaded)."""

    family: Literal["timm"]
    names: list[str] = Field(description="timm model names (timm.list_models())")
    resolutions: list[int] = Field([32], description="student input sizes to try (pixels)")

    @field_validator("names", "resolutions")
    @classmethod
    def _non_empty(cls, v, info):
        return _non_empty_unique(v, f"search timm family {info.field_name}")


Family = Annotated[Union[CnnFamily, TimmFamily], Field(discriminator="family")]


class SearchBudgets(Section):
    """What the chosen student must meet (None: not checked). MACs and parameters are known before training,
    so a candidate over them is never trained; size, arena and flash are exact figures of its artifacts and decide
    before latency, which is measured (a candidate over them is not timed)."""

    max_macs: Optional[int] = Field(None, gt=0, description="multiply-accumulates per image")
    max_params: Optional[int] = Field(None, gt=0, description="parameters")
    max_size_kb: Optional[float] = Field(None, gt=0, description="INT8 ONNX file size, KiB")
    max_arena_kb: Optional[float] = Field(None, gt=0, description="TFLite Micro tensor arena (RAM) the INT8 .tflite "
                                          "uses, KiB, as validate.budgets.max_arena_kb reads it (needs the `mobile` "
                                          "extra; each candidate is converted as the tflm format converts it)")
    max_flash_kb: Optional[float] = Field(None, gt=0, description="flash the INT8 .tflite flatbuffer takes, KiB, as "
                                          "validate.budgets.max_flash_kb reads it (needs the `mobile` extra)")
    max_p99_ms: Optional[float] = Field(None, gt=0, description="p99 of the INT8 ONNX model call at batch 1 on "
                                        "ONNX Runtime, validate.threads threads, on search.latency.target, ms")
    min_val_acc: Optional[float] = Field(None, ge=0, le=1, description="validation top-1 after the full schedule")

    def set(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}

    @property
    def needs_tflite(self) -> bool:
        """Whether candidates need their INT8 .tflite (the MCU budgets)."""
        return self.max_arena_kb is not None or self.max_flash_kb is not None


class SearchLatency(Section):
    """How candidates are timed: the suite's single-stream protocol, shortened (many candidates), then repeated in
    interleaved rounds for the finalists, whose p99 is the median over the rounds."""

    target: str = Field("local", description="where candidates are timed: local (this machine) or one of "
                        "validate.targets (ssh://...: one connection per measuring round)")
    min_queries: int = Field(300, ge=1, description="timed batch-1 queries per round, at least")
    min_duration_s: float = Field(0.5, ge=0, description="timed seconds per round, at least")
    warmup: int = Field(30, ge=0, description="untimed queries first")
    rounds: int = Field(3, ge=1, description="interleaved measuring rounds for the finalists")
    margin: float = Field(0.1, ge=0, le=1, description="a p99 within this fraction of max_p99_ms is measured "
                          "again for rounds more rounds before it is judged")


class SearchConfig(Section):
    families: list[Family] = Field(default_factory=lambda: [CnnFamily()],
                                   description="the search space: cnn (parametrised) and/or timm (named) families")
    trials: int = Field(24, ge=1, description="candidates trained on the proxy schedule (pruned ones count)")
    epochs: int = Field(4, ge=1, description="proxy schedule: most epochs a trial trains; every trial trains "
                        "ceil(epochs / reduction_factor) of them, then successive halving stops the weaker ones")
    reduction_factor: int = Field(3, ge=2, description="successive halving lets about 1 in this many trials go on "
                                  "at each cut")
    finalists: int = Field(3, ge=1, description="best proxy candidates within budget that get the full distill schedule")
    budgets: SearchBudgets = SearchBudgets()
    latency: SearchLatency = SearchLatency()
    storage: Optional[str] = Field(
        None, description="Optuna storage shared by search workers: a journal file path or an RDB URL "
        "(sqlite:///..., postgresql://...); default: a journal file in the build folder")

    @field_validator("families")
    @classmethod
    def _some_family(cls, v):
        if not v:
            raise ValueError("search.families is empty: list at least one family (cnn or timm)")
        return v

    @model_validator(mode="after")
    def _finalists_fit(self):
        if self.finalists > self.trials:
            raise ValueError(f"search.finalists ({self.finalists}) is more than search.trials ({self.trials})")
        return self

    def study_fields(self) -> dict:
        """What the trials depend on: the space and the proxy schedule. Budgets, trial count, finalists, the latency
        settings and target, and storage only decide which stored trials are used and how they are measured, so
        changing them reuses the study (timings are recorded per target and protocol: timing.py)."""
        return {"families": [f.model_dump(mode="json") for f in self.families], "epochs": self.epochs,
                "reduction_factor": self.reduction_factor}
