"""The validate stage on a real tiny bundle reports where time and INT8 error go: the suite's p50 beside
benchmark_app's median, the top layers per artifact, the per-layer INT8 error (also in stage.json), and
`edgesmith profile --compare` prints the same error for any FP32 / INT8 ONNX pair."""

from __future__ import annotations

import json

import onnx
import pytest

from pipeline.config import parse_config
from pipeline.progress import ProgressDisplay
from pipeline.stage import StageContext, StageRecord
from pipeline.stages.validate import ValidateStage
from quantize.layer_error import compute_nodes, layer_name
from tests.conftest import run_cli, tiny_config_dict
from tests.helpers import TINY_LATENCY, shared_bundle


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layers")
    raw = tiny_config_dict(tmp / "builds")
    raw["validate"] = {"latency": TINY_LATENCY}
    out = tmp / "validate"
    out.mkdir()
    ctx = StageContext(parse_config(raw), out, {"export": StageRecord("export", "k" * 64, shared_bundle(), {})},
                       ProgressDisplay(enabled=False), "v" * 64)
    return ValidateStage().run(ctx), out


def _layers_of(file: str) -> set[str]:
    return {layer_name(n.name) for n in compute_nodes(onnx.load(str(shared_bundle() / file)).graph)}


def test_layer_error_is_in_stage_metrics_and_names_the_graphs_layers(validated):
    metrics, _ = validated
    error = metrics["layer_error"]
    assert error["int8"] == "model.int8.onnx" and error["images"] > 0
    rows = error["layers"]
    assert {r["layer"] for r in rows} == _layers_of("model.onnx") == _layers_of("model.int8.onnx")
    assert [r["sqnr_db"] for r in rows if r["quantized"]] == sorted(r["sqnr_db"] for r in rows if r["quantized"])
    assert all(-1 <= r["cosine"] <= 1 for r in rows)


def test_report_shows_tool_comparison_layers_and_error(validated):
    _, out = validated
    md = (out / "report.md").read_text()
    for title in ("Latency: the suite beside the runtime's own tool", "Where the time goes, per layer",
                  "Per-layer quantization error (INT8 vs FP32)"):
        assert f"## {title}" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") >= 2   # the stacked bar among the figures
    results = json.loads(next(out.glob("results-*.json")).read_text())
    ov = [r for r in results["runs"] if r["runtime"] == "openvino" and r["status"] == "passed"]
    assert ov and all(r["tool"]["tool"] == "benchmark_app" for r in ov)
    assert all(r["layers"]["layers"] for r in results["runs"] if r["status"] == "passed")


def test_profile_compare_prints_the_per_layer_error(tmp_path):
    out = tmp_path / "err.json"
    proc = run_cli("profile", shared_bundle() / "model.onnx", "--compare", shared_bundle() / "model.int8.onnx",
                   "--eval", shared_bundle() / "eval.npz", "--images", "64", "--json", out)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["layers"]
    assert {r["layer"] for r in rows} == _layers_of("model.onnx")
    assert "SQNR dB" in proc.stdout and rows[0]["layer"] in proc.stdout


def test_profile_compare_refuses_models_that_do_not_match(tmp_path):
    other = tmp_path / "other.onnx"
    model = onnx.load(str(shared_bundle() / "model.int8.onnx"))
    keep = [n for n in model.graph.node if n.op_type not in ("Gemm", "MatMul")]
    # a graph with a different set of compute layers (and different names)
    for i, n in enumerate(keep):
        n.name = f"n{i}"
    del model.graph.node[:]
    model.graph.node.extend(keep)
    onnx.save(model, other)
    proc = run_cli("profile", shared_bundle() / "model.onnx", "--compare", other, "--images", "8")
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    assert "do not have the same layers" in proc.stdout + proc.stderr
