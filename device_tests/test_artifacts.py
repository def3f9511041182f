"""Every artifact on every requested runtime: it loads, gives finite logits, is measured by the protocol
(warm-up, >= min queries and >= min duration), and an FP32 artifact reproduces the exported predictions."""

from __future__ import annotations

import pytest


def _measured(device, case) -> dict:
    artifact, runtime = case
    result = device.measure(artifact, runtime)  # checks the artifact's size and sha256 first
    if result["skipped"]:
        pytest.skip(result["message"])
    if result["status"] != "passed":
        pytest.fail(f"{artifact} on {runtime}: {result['message']}")
    return result


def test_artifact_runs(device, case):
    result = _measured(device, case)
    lat, settings = result["latency"], device.settings
    assert lat["queries"] >= settings.min_queries
    assert lat["duration_s"] >= settings.min_duration_s
    assert lat["model"]["n"] == lat["queries"] and lat["model"]["p50_ms"] > 0
    assert result["throughput"]["images_per_s"] > 0
    assert result["peak_rss_mb"] > 0


def test_accuracy_recorded(device, case):
    acc = _measured(device, case)["accuracy"]
    n_classes = len(acc["confusion"])
    assert sum(map(sum, acc["confusion"])) == acc["n"] == len(device.bundle.eval_set())
    assert acc["top1"] == pytest.approx(sum(acc["confusion"][c][c] for c in range(n_classes)) / acc["n"])


def test_fp32_artifact_reproduces_export(device, case):
    result = _measured(device, case)
    if result["precision"] != "fp32" or "agreement_fp32" not in result["accuracy"]:
        pytest.skip("only FP32 artifacts must reproduce the exported FP32 predictions")
    assert result["accuracy"]["agreement_fp32"] >= device.min_fp32_agreement, (
        f"{case[0]} on {case[1]} agrees with the exported FP32 predictions on only "
        f"{result['accuracy']['agreement_fp32']:.3f} of the evaluation set")
