"""`edgesmith diff --fail-on-change` gates on what defines the model (files of every format, artifacts.json minus
measured fields, preprocessing, labels, eval set, recorded config); measured results are listed but do not gate.
`--max-accuracy-drop` gates on accuracy with a tolerance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.release.bundle import ReleaseSources, assemble_release
from pipeline.release.diff import diff_bundles, render_diff
from pipeline.release.manifest import StageEntry

from .test_release import make_export_dir, make_validate_dir, release_info

ROOT = Path(__file__).resolve().parent.parent


def edgesmith(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def measured_info(top1: float, p90: float):
    """release_info with a validate stage that measured `top1` and `p90` (as the validate stage records them)."""
    info = release_info()
    validate = info.stages["validate"]
    row = {"artifact": "model.int8.onnx", "target": "local", "runtime": "onnxruntime", "top1": top1, "p90_ms": p90}
    stages = {**info.stages, "validate": StageEntry(key=validate.key, device=validate.device, seed=validate.seed,
                                                      metrics={**validate.metrics, "artifacts": [row]})}
    return info.__class__(**{**info.__dict__, "stages": stages})


def remeasure(validate: Path, export: Path, p90: float, accuracy: float) -> None:
    """What a second build of the same model changes: latency results, the report, measured index fields."""
    results = json.loads((validate / "results_cpu.json").read_text())
    results["runs"][0]["latency"]["p90_ms"] = p90
    (validate / "results_cpu.json").write_text(json.dumps(results))
    (validate / "report.md").write_text(f"# tiny\np90 {p90} ms\n")
    index = json.loads((export / "artifacts.json").read_text())
    for artifact in index["artifacts"]:
        artifact.setdefault("parity", {})["accuracy"] = accuracy
    (export / "artifacts.json").write_text(json.dumps(index, indent=2))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffgate")
    out = {}
    for name, seed, p90, acc in (("a", 0, 0.2, 0.90), ("same_model", 0, 0.3, 0.897), ("worse", 0, 0.2, 0.88),
                                 ("new_model", 1, 0.2, 0.90)):
        export, validate = make_export_dir(root / f"up_{name}", seed=seed), make_validate_dir(root / f"v_{name}")
        remeasure(validate, export, p90, acc)
        out[name] = assemble_release(root / name, ReleaseSources(export, validate, None), measured_info(acc, p90))
    return out


def test_bundles_differing_only_in_measured_files_pass_the_gate_and_list_the_differences(bundles):
    a, b = bundles["a"], bundles["same_model"]
    proc = edgesmith("diff", a.bundle_dir, b.tarball, "--fail-on-change")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = diff_bundles(a.bundle_dir, b.tarball)
    assert {"results/results_cpu.json", "report.md", "MODEL_CARD.md", "artifacts.json"} <= set(d.changed)
    assert d.model_changes == [] and d.measured_only == ["artifacts.json"]
    text = proc.stdout
    assert "measured files changed" in text and "changed  results/results_cpu.json" in text
    assert "changed  report.md" in text and "changed  artifacts.json" in text
    assert "stages.validate.metrics.artifacts[0].p90_ms: 0.2 -> 0.3" in text
    assert "model: identical (--fail-on-change)" in text
    # Everything, measured results included, still gates with --fail-on-any-change.
    assert edgesmith("diff", a.bundle_dir, b.tarball, "--fail-on-any-change").returncode == 1


def test_a_changed_model_file_fails_the_gate(bundles):
    a, b = bundles["a"], bundles["new_model"]
    d = diff_bundles(a.bundle_dir, b.bundle_dir)
    assert "changed model.int8.onnx" in d.model_changes and "changed eval.npz" in d.model_changes
    proc = edgesmith("diff", a.bundle_dir, b.bundle_dir, "--fail-on-change")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "changed  model.int8.onnx" in proc.stdout and "model: differs" in proc.stdout


def test_a_changed_index_field_that_defines_the_model_fails_the_gate(tmp_path, bundles):
    a = bundles["a"]
    export, validate = make_export_dir(tmp_path / "up"), make_validate_dir(tmp_path / "v")
    remeasure(validate, export, 0.2, 0.90)
    index = json.loads((export / "artifacts.json").read_text())
    index["preprocessing"]["mean"] = [0.4]
    (export / "artifacts.json").write_text(json.dumps(index, indent=2))
    b = assemble_release(tmp_path / "b", ReleaseSources(export, validate, None), measured_info(0.90, 0.2))
    assert edgesmith("diff", a.bundle_dir, b.bundle_dir, "--fail-on-change").returncode == 1
    d = diff_bundles(a.bundle_dir, b.bundle_dir)
    assert "changed artifacts.json" in d.model_changes and "changed preprocessing.json" in d.model_changes


def test_max_accuracy_drop_gates_on_accuracy_with_a_tolerance(bundles):
    a = bundles["a"]
    small = edgesmith("diff", a.bundle_dir, bundles["same_model"].bundle_dir, "--max-accuracy-drop", "0.005")
    assert small.returncode == 0 and "no artifact dropped more than 0.005" in small.stdout, small.stdout + small.stderr
    big = edgesmith("diff", a.bundle_dir, bundles["worse"].bundle_dir, "--max-accuracy-drop", "0.005")
    assert big.returncode == 1, big.stdout + big.stderr
    assert "accuracy of model.int8.onnx on local/onnxruntime dropped 0.9 -> 0.88" in big.stdout
    # The model files are the same, so the default gate passes the same pair.
    assert edgesmith("diff", a.bundle_dir, bundles["worse"].bundle_dir, "--fail-on-change").returncode == 0


def test_render_lists_model_and_measured_files_apart(bundles):
    text = render_diff(diff_bundles(bundles["a"].bundle_dir, bundles["new_model"].bundle_dir))
    gate, measured = text.split("measured files changed")
    assert "changed  model.onnx" in gate and "results/results_cpu.json" not in gate
    assert "report.md" in measured or "none" in measured.splitlines()[0]
