"""Artifacts compiled by Vela for an Arm Ethos-U NPU (format ethos_u): they run on the NPU, not here, so the suite
records Vela's estimates from artifacts.json (NPU/CPU operators, SRAM, flash, cycles, time per inference) for the
budgets and the report. Where Vela is installed it compiles the bundle's INT8 .tflite again with the shipped .ini:
the same Vela version must give the same bytes and the same estimates."""

from __future__ import annotations

import pytest

from device_tests.vela import ESTIMATE_KEYS


def test_npu_estimates_recorded(device, npu_case):
    artifact = next(a for a in device.bundle.artifacts if a.file == npu_case)
    assert artifact.path.is_file(), f"{npu_case} is missing from the bundle"
    record = device.npu_estimates(npu_case)
    assert record["npu_ops"] + record["cpu_ops"] > 0 and record["cycles"] > 0 and record["inference_ms"] > 0
    assert record["cpu_ops"] == 0 or record["cpu_fallback"], "CPU-fallback operators counted but not named"


def test_npu_estimates_reproduce(device, npu_case):
    record = device.npu_estimates(npu_case)
    again = record["recompiled"]
    if again is None:
        pytest.skip(record.get("recompiled_note", "not compiled again here"))
    if again["vela_version"] != record.get("vela_version"):
        pytest.skip(f"Vela {again['vela_version']} here, {record.get('vela_version')} at export: estimates may differ")
    assert again["same_bytes"], f"Vela compiled {npu_case} to different bytes here"
    assert {k: again[k] for k in ESTIMATE_KEYS} == {k: record[k] for k in ESTIMATE_KEYS}
