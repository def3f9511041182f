"""End to end through the CLI: teacher -> adapt -> distill -> qat -> export on a tiny config."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipeline.cli import app

QAT_AND_EXPORT = {"qat.calibration_size": 32, "qat.epochs": 1, "qat.batch_size": 32,
                  "export.formats": ["onnx", "onnx_int8", "openvino", "tensorrt"],
                  "export.parity_limit": 100, "export.eval_images": 50}


@pytest.mark.slow
def test_tiny_build_quantizes_and_exports_and_reuses_qat(write_config, tmp_path):
    result = CliRunner().invoke(app, ["build", str(write_config("a.yaml", **QAT_AND_EXPORT))])
    assert result.exit_code == 0, result.output
    root = tmp_path / "builds" / "tiny"
    qat = json.loads(next(root.glob("qat-*")).joinpath("stage.json").read_text())
    export_dir = next(root.glob("export-*"))
    export = json.loads((export_dir / "stage.json").read_text())
    assert export["inputs"]["qat"] == qat["key"]
    assert qat["metrics"]["int8_val_acc"] >= qat["metrics"]["ptq_val_acc"]
    listing = json.loads((export_dir / "artifacts.json").read_text())
    assert {a["file"] for a in listing["artifacts"]} >= {"model.onnx", "model.int8.onnx", "openvino/model.int8.xml"}
    assert (export_dir / "eval.npz").is_file()


def test_changing_only_export_options_rebuilds_only_export(write_config):
    first = plan_keys(write_config("a.yaml", **QAT_AND_EXPORT))
    second = plan_keys(write_config("b.yaml", **QAT_AND_EXPORT, **{"export.opset": 18}))
    assert [s for s in first if first[s] != second[s]] == ["export"]
    third = plan_keys(write_config("c.yaml", **QAT_AND_EXPORT, **{"qat.preset": "mixed"}))
    assert [s for s in first if first[s] != third[s]] == ["qat", "export"]


def plan_keys(path) -> dict[str, str]:
    from pipeline.config import load_config
    from pipeline.runner import Build

    return {p.stage.name: p.key for p in Build(load_config(path)).plan()}
