"""The unknown answer for inputs outside the subtask: scores and metrics against hand-computed values,
calibration, the device side (numpy + ONNX Runtime) marking unknowns, budgets, and a tiny end-to-end build with
outlier exposure whose thresholds travel into artifacts.json, the device results and the release manifest."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from device_tests.ood import UNKNOWN, Rule, auroc, calibrate, classify, evaluate, fpr_at_tpr, postprocess, score
from pipeline.validation.budgets import check
from pipeline.validation.config import Budgets
from pipeline.validation.suite import TargetRun
from tests.conftest import run_cli, tiny_config_dict

# -- scores and metrics --------------------------------------------------------------------------------------


def test_scores_match_hand_computed_values():
    z = np.array([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    e2 = math.exp(2)
    assert score(z, "msp") == pytest.approx([e2 / (e2 + 2), 1 / 3])
    assert score(z, "energy") == pytest.approx([math.log(e2 + 2), 1 + math.log(3)])
    assert score(z, "energy", 2.0) == pytest.approx([2 * math.log(math.e + 2), 2 * (0.5 + math.log(3))])
    assert score(z, "msp", 2.0)[0] == pytest.approx(math.e / (math.e + 2))
    assert score(z, "max_logit") == pytest.approx([2.0, 1.0])
    # large logits: no overflow
    assert np.isfinite(score(np.array([[1000.0, 0.0]]), "energy")).all()
    assert score(np.array([[1000.0, 0.0]]), "msp")[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="valid scores"):
        score(z, "entropy")


def test_auroc_of_known_separations():
    assert auroc([3, 4, 5], [1, 2]) == 1.0
    assert auroc([1, 2], [3, 4, 5]) == 0.0
    assert auroc([1.0], [1.0]) == 0.5                        # a tie counts half
    assert auroc([0.35, 0.8], [0.1, 0.4]) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    rng = np.random.default_rng(0)
    # two unit Gaussians 2 apart: AUROC = Phi(2 / sqrt 2) = 0.9214
    assert auroc(rng.normal(2, 1, 20000), rng.normal(0, 1, 20000)) == pytest.approx(0.9214, abs=0.005)


def test_fpr_at_95_tpr_and_calibration():
    inside = np.arange(100.0)                # the threshold keeping 95 of them is 5
    assert calibrate(inside, 0.95) == 5.0
    assert fpr_at_tpr(inside, np.arange(-10.0, 10.0)) == pytest.approx(5 / 20)   # 5..9 slip through
    assert fpr_at_tpr(inside, np.arange(-10.0, 0.0)) == 0.0
    val = np.random.default_rng(1).normal(size=1001)
    for tpr in (0.95, 0.9, 0.5):
        kept = (val >= calibrate(val, tpr)).mean()
        assert tpr <= kept < tpr + 2 / len(val)


def test_evaluate_and_classify_mark_unknowns():
    in_logits = np.array([[5.0, 0.0], [0.0, 4.0], [3.0, 0.0], [0.1, 0.0]])
    labels = np.array([0, 1, 1, 0])
    out_logits = np.array([[0.2, 0.1], [2.0, 1.9]])
    rule = Rule("max_logit", 1.0, threshold=1.0)
    assert classify(in_logits, rule).tolist() == [0, 1, 0, UNKNOWN]
    assert classify(out_logits, rule).tolist() == [UNKNOWN, 0]
    assert classify(out_logits, None).tolist() == [0, 0]
    assert postprocess(out_logits[:1], rule)[0] == UNKNOWN and postprocess(in_logits[:1], rule)[0] == 0
    m = evaluate(in_logits, labels, out_logits, rule)
    assert m["tpr_at_threshold"] == 0.75 and m["fpr_at_threshold"] == 0.5
    assert m["accuracy_all"] == 0.75 and m["accuracy_accepted"] == pytest.approx(2 / 3)
    assert m["open_set_accuracy"] == pytest.approx((2 + 1) / 6)
    assert m["auroc"] == pytest.approx(auroc([5, 4, 3, 0.1], [0.2, 2.0]))
    assert sum(m["histogram"]["in"]) == 4 and sum(m["histogram"]["out"]) == 2
    assert Rule.from_dict(rule.to_dict()) == rule and Rule.from_dict(None) is None


# -- the device side with a real runtime ---------------------------------------------------------------------


def test_onnxruntime_runner_and_measure_apply_the_rule(tmp_path):
    from device_tests.bundle import Bundle
    from device_tests.latency import LatencySettings
    from device_tests.measure import measure
    from device_tests.runners import get_runner
    from tests.helpers import make_bundle

    root = make_bundle(tmp_path / "b", n_eval=120, int8=False, openvino=False)
    data = dict(np.load(root / "eval.npz"))
    data["ood_images_u8"] = np.random.default_rng(5).integers(0, 40, (80, *data["images_u8"].shape[1:]), dtype=np.uint8)
    np.savez(root / "eval.npz", **data)
    bundle = Bundle.load(root)
    artifact = bundle.artifacts[0]
    x = bundle.preprocess(bundle.eval_set().images_u8)
    with get_runner("onnxruntime")(artifact.path, artifact.format) as runner:
        logits = runner.infer(x)
        rule = Rule("energy", 1.0, calibrate(score(logits[:100], "energy"), 0.95))
        pred = runner.predict(x[:100], rule)
    assert (pred == UNKNOWN).sum() == 5                      # 5 % of the calibration images answer "unknown"
    assert (pred[pred != UNKNOWN] == logits[:100].argmax(1)[pred != UNKNOWN]).all()

    meta = json.loads((root / "artifacts.json").read_text())
    meta["artifacts"][0]["ood"] = rule.to_dict()
    (root / "artifacts.json").write_text(json.dumps(meta))
    bundle = Bundle.load(root, verify=False)
    result = measure(bundle.artifacts[0], "onnxruntime", LatencySettings(16, 0.0, 2, 8), eval_set=bundle.eval_set(),
                     preprocess=bundle.preprocess)
    ood = result["ood"]
    assert ood["threshold"] == rule.threshold and ood["n_in"] == 120 and ood["n_out"] == 80
    accepted_out = round(ood["fpr_at_threshold"] * 80)
    assert ood["unknown_predictions"] == round((1 - ood["tpr_at_threshold"]) * 120) + 80 - accepted_out


# -- budgets -------------------------------------------------------------------------------------------------


def _run(ood: dict | None) -> dict:
    run = {"artifact": "model.onnx", "runtime": "onnxruntime", "status": "passed", "accuracy": {"top1": 0.9},
           "latency": {"model": {"p90_ms": 1.0, "p99_ms": 1.0}}, "size_bytes": 1000, "peak_rss_mb": 100}
    return {**run, "ood": ood} if ood else run


def test_budgets_max_fpr95_and_min_auroc():
    budgets = Budgets(max_fpr95=0.3, min_auroc=0.9)
    met = check([TargetRun("local", {"runs": [_run({"fpr95": 0.2, "auroc": 0.95})]})], budgets)
    assert [(v.budget, v.ok) for v in met] == [("max_fpr95", True), ("min_auroc", True)]
    missed = check([TargetRun("local", {"runs": [_run({"fpr95": 0.31, "auroc": 0.89})]})], budgets)
    assert [(v.budget, v.ok) for v in missed] == [("max_fpr95", False), ("min_auroc", False)]
    unmeasured = check([TargetRun("local", {"runs": [_run(None)]})], budgets)
    assert [v.ok for v in unmeasured] == [False, False] and "not measured" in unmeasured[0].measured
    assert check([TargetRun("local", {"runs": [_run(None)]})], Budgets()) == []


# -- config and cache keys -----------------------------------------------------------------------------------


def test_ood_section_is_optional_and_keys_only_what_it_changes(tmp_path):
    from pipeline.config import parse_config
    from pipeline.runner import Build

    def keys(**overrides):
        cfg = parse_config(tiny_config_dict(tmp_path / "b", **{"export.formats": ["onnx"], **overrides}))
        return {p.stage.name: p.key for p in Build(cfg).plan()}

    plain = keys()
    scored = keys(ood={"score": "msp"})
    exposed = keys(ood={"score": "msp", "outlier_exposure": True})
    assert parse_config(tiny_config_dict(tmp_path)).ood is None
    assert scored["distill"] == plain["distill"] and scored["export"] != plain["export"]
    assert exposed["distill"] != plain["distill"]
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="ood.scor"):
        parse_config(tiny_config_dict(tmp_path, ood={"scor": "msp"}))


# -- end to end ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_build_with_outlier_exposure_ships_and_applies_the_threshold(tmp_path):
    from tests.helpers import TINY_LATENCY

    cfg = tiny_config_dict(tmp_path / "builds", **{
        "teacher.train.epochs": 2, "distill.epochs": 3,
        "qat": {"calibration_size": 50, "epochs": 1},
        "export.formats": ["onnx", "onnx_int8"], "export.parity_limit": 50, "export.eval_images": 60,
        "validate.runtimes": ["onnxruntime"], "validate.latency": TINY_LATENCY,
        "validate.budgets": {"max_fpr95": 1.0, "min_auroc": 0.0},
        "release": {"version": "0.0.1"},
        "ood": {"score": "energy", "outlier_exposure": True, "oe_target": "uniform", "eval_images": 50},
    })
    path = tmp_path / "ood.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_cli("build", path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    build = tmp_path / "builds" / "tiny"

    distill = json.loads(next(build.glob("distill-*")).joinpath("stage.json").read_text())
    assert distill["config"]["ood.outlier_exposure"]["outlier_exposure"] is True
    assert all(h["outlier"] >= 0 for h in distill["metrics"]["history"])     # the exposure loss was trained

    export_dir = next(build.glob("export-*"))
    listing = json.loads((export_dir / "artifacts.json").read_text())
    thresholds = listing["metadata"]["ood"]["thresholds"]
    assert set(thresholds) == {"fp32", "int8"}
    for a in listing["artifacts"]:
        assert a["ood"] == {"score": "energy", "temperature": 1.0, "tpr": 0.95, "threshold": thresholds[a["precision"]]}
    export_metrics = json.loads((export_dir / "stage.json").read_text())["metrics"]["ood"]
    assert export_metrics["calibration_images"] == 32        # the in-subtask validation split (8 per class)
    assert export_metrics["fp32"]["n_in"] == 60 and export_metrics["fp32"]["n_out"] == 50
    assert "int8_with_fp32_threshold" in export_metrics
    with np.load(export_dir / "eval.npz") as npz:
        assert npz["ood_images_u8"].shape == (50, 1, 28, 28)
        assert not np.isin(npz["ood_classes"], [0, 2, 4, 6]).any()   # only classes outside the subtask

    validate = next(build.glob("validate-*"))
    results = json.loads((validate / "results-local.json").read_text())
    assert results["tests"]["failed"] == 0
    for run in results["runs"]:
        ood = run["ood"]
        assert ood["threshold"] == thresholds[run["precision"]] and ood["n_out"] == 50
        # the device's numbers for the FP32 ONNX reproduce the build's (same images, same rule)
        if run["precision"] == "fp32":
            assert ood["auroc"] == pytest.approx(export_metrics["fp32"]["auroc"], abs=1e-6)
    assert {v["budget"] for v in json.loads((validate / "stage.json").read_text())["metrics"]["budgets"]} >= {
        "max_fpr95", "min_auroc"}
    assert "Inputs outside the subtask" in (validate / "report.html").read_text()

    bundle = next(build.glob("release-*")) / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["stages"]["export"]["metrics"]["ood"]["thresholds"] == thresholds
    assert "answers 'unknown'" in (bundle / "MODEL_CARD.md").read_text()
