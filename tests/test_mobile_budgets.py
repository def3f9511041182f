"""MCU budgets (max_arena_kb, max_flash_kb, per target like the latency budgets) and the report's "Fits on the
MCU" table, on measured-run records shaped like the device suite's."""

import pytest

from pipeline.validation.budgets import check
from pipeline.validation.config import ValidateConfig
from pipeline.validation.mcu import mcu_section
from pipeline.validation.suite import TargetRun


def run(artifact, runtime, **extra):
    return {"artifact": artifact, "runtime": runtime, "status": "passed", "precision": "int8", "size_bytes": 150_000,
            "peak_rss_mb": 80.0, "accuracy": {"top1": 0.86}, "latency": {"model": {"p90_ms": 4.0, "p99_ms": 5.0}},
            **extra}


RUNS = [TargetRun("local", {"runs": [run("model.int8.tflite", "litert"),
                                     run("tflm/model.int8.tflite", "tflm", arena_used_bytes=25_312,
                                         flash_bytes=150_000)]}),
        TargetRun("ssh://pi@mcu-host", {"runs": [run("tflm/model.int8.tflite", "tflm", arena_used_bytes=25_312,
                                                  flash_bytes=150_000)]})]


def test_arena_and_flash_budgets_apply_to_tflm_runs_only_and_per_target():
    cfg = ValidateConfig(targets=["local", "ssh://pi@mcu-host"],
                         budgets={"max_arena_kb": {"local": 64, "ssh://pi@mcu-host": 16}, "max_flash_kb": 256})
    verdicts = [v for v in check(RUNS, cfg.budgets) if v.budget in ("max_arena_kb", "max_flash_kb")]
    assert {(v.target, v.artifact, v.budget, v.ok) for v in verdicts} == {
        ("local", "tflm/model.int8.tflite", "max_arena_kb", True),
        ("local", "tflm/model.int8.tflite", "max_flash_kb", True),
        ("ssh://pi@mcu-host", "tflm/model.int8.tflite", "max_arena_kb", False),   # 24.7 KiB > 16
        ("ssh://pi@mcu-host", "tflm/model.int8.tflite", "max_flash_kb", True)}
    arena = next(v for v in verdicts if v.target == "local" and v.budget == "max_arena_kb")
    assert arena.measured == pytest.approx(25_312 / 1024)


def test_fits_on_the_mcu_table_says_which_target_it_does_not_fit():
    cfg = ValidateConfig(targets=["local", "ssh://pi@mcu-host"], budgets={"max_arena_kb": {"local": 64, "ssh://pi@mcu-host": 16}})
    section = mcu_section(RUNS, check(RUNS, cfg.budgets))
    assert section.title == "Fits on the MCU"
    rows = [line for line in section.markdown.splitlines() if "tflm/model.int8.tflite" in line]
    assert len(rows) == 2 and rows[0].endswith("| yes |") and rows[1].endswith("| NO |")
    assert "model.int8.tflite | 24.72" in rows[0]
    assert mcu_section([TargetRun("local", {"runs": [run("model.onnx", "onnxruntime")]})], []) is None


def test_mcu_budgets_validate_like_latency_budgets():
    with pytest.raises(ValueError, match="positive"):
        ValidateConfig(budgets={"max_arena_kb": 0})
    with pytest.raises(ValueError, match="not in targets"):
        ValidateConfig(targets=["local"], budgets={"max_flash_kb": {"ssh://elsewhere": 100}})
    assert ValidateConfig(runtimes=["litert", "tflm", "executorch"]).runtimes == ["litert", "tflm", "executorch"]
