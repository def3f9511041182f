"""End to end through the CLI: a tiny build up to export, then validate. A missed budget makes the build
exit non-zero with the budget table, and the validate folder with its results and report is kept."""

import json

import pytest

from tests.conftest import run_cli
from tests.helpers import TINY_LATENCY

EXPORT = {"export.formats": ["onnx", "openvino"], "export.parity_limit": 50, "export.eval_images": 60}


@pytest.mark.slow
def test_build_fails_on_a_missed_budget_and_keeps_the_results(write_config, tmp_path):
    cfg = write_config("v.yaml", **EXPORT, **{"validate.latency": TINY_LATENCY,
                                              "validate.budgets": {"max_p90_ms": 1e-6, "max_size_mb": 100.0}})
    proc = run_cli("build", cfg)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "max_p90_ms" in output and "MISSED" in output and "allowed" in output
    validate = next((tmp_path / "builds" / "tiny").glob("validate-*"))
    meta = json.loads((validate / "stage.json").read_text())
    assert meta["metrics"]["passed"] is False
    export = json.loads(next((tmp_path / "builds" / "tiny").glob("export-*")).joinpath("artifacts.json").read_text())
    results = json.loads((validate / "results-local.json").read_text())
    assert {r["artifact"] for r in results["runs"]} == {a["file"] for a in export["artifacts"]}
    assert all(r["status"] == "passed" for r in results["runs"])
    # the FP32 artifacts reproduce the predictions the export stage recorded, on the device side
    assert all(r["accuracy"]["agreement_fp32"] >= 0.99 for r in results["runs"])
    assert (validate / "report.html").is_file() and (validate / "report.md").is_file()
    sizes = [v for v in meta["metrics"]["budgets"] if v["budget"] == "max_size_mb"]
    assert sizes and all(v["ok"] for v in sizes)
