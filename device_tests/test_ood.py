"""The unknown answer on the device: each artifact with an OOD rule (artifacts.json: score, temperature,
threshold) is measured with it on the in-subtask and the out-of-subtask images of eval.npz."""

from __future__ import annotations

import numpy as np
import pytest

from device_tests.ood import Rule


def test_ood_rule_applied(device, case):
    artifact = next(a for a in device.bundle.artifacts if a.file == case[0])
    rule = Rule.from_dict(artifact.extra.get("ood"))
    eval_set = device.bundle.eval_set()
    if rule is None or eval_set.ood_images_u8 is None:
        pytest.skip("the bundle has no unknown answer (no ood section in the build config)")
    result = device.measure(*case)
    if result["skipped"]:
        pytest.skip(result["message"])
    if result["status"] != "passed":
        pytest.fail(f"{case[0]} on {case[1]}: {result['message']}")
    ood = result["ood"]
    assert (ood["score"], ood["temperature"], ood["threshold"]) == (rule.score, rule.temperature, rule.threshold)
    assert ood["n_in"] == len(eval_set) and ood["n_out"] == len(eval_set.ood_images_u8)
    assert 0.0 <= ood["auroc"] <= 1.0 and 0.0 <= ood["fpr95"] <= 1.0
    assert sum(ood["histogram"]["in"]) == ood["n_in"] and sum(ood["histogram"]["out"]) == ood["n_out"]
    rejected = round((1 - ood["tpr_at_threshold"]) * ood["n_in"]) + round((1 - ood["fpr_at_threshold"]) * ood["n_out"])
    assert ood["unknown_predictions"] == rejected and ood["predictions"] == ood["n_in"] + ood["n_out"]
    assert np.isfinite(ood["threshold"])
