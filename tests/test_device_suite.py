"""The on-device suite as a target runs it: `python -m pytest device_tests --bundle B --results R.json`, in a
subprocess, against real bundles (complete, altered, missing), with real runtimes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cache import PROJECT_ROOT
from tests.helpers import TINY_LATENCY, shared_bundle

TINY = ["--min-queries", str(TINY_LATENCY["min_queries"]), "--min-duration", str(TINY_LATENCY["min_duration_s"]),
        "--warmup", "5", "--throughput-batch", "8"]


def suite(bundle: Path, results: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run([sys.executable, "-m", "pytest", "device_tests", "--bundle", str(bundle),
                           "--results", str(results), "-q", *TINY, *extra],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def altered_bundle(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(shared_bundle(), bundle)
    with open(bundle / "model.int8.onnx", "ab") as fh:   # altered after export
        fh.write(b"tampered")
    (bundle / "openvino" / "model.bin").unlink()          # weights of the FP32 IR lost in the copy
    return bundle


@pytest.mark.slow
def test_suite_measures_every_artifact_on_every_runtime(tmp_path):
    results = tmp_path / "results.json"
    proc = suite(shared_bundle(), results)
    assert proc.returncode == 0, proc.stdout[-3000:]
    data = json.loads(results.read_text())
    meta = json.loads((shared_bundle() / "artifacts.json").read_text())
    measured = {(r["artifact"], r["runtime"]) for r in data["runs"]}
    expected = {(a["file"], "onnxruntime" if a["format"] == "onnx" else "openvino") for a in meta["artifacts"]}
    assert measured == expected and all(r["status"] == "passed" for r in data["runs"])
    assert data["tests"]["failed"] == 0 and data["tests"]["passed"] > 0
    assert data["settings"]["min_queries"] == TINY_LATENCY["min_queries"] and data["settings"]["threads"] == 1
    env = data["environment"]
    assert env["cpu_model"] and env["usable_cores"] >= 1 and env["python"]
    for run in data["runs"]:
        assert run["latency"]["queries"] >= TINY_LATENCY["min_queries"] and run["runtime_version"]
        assert run["peak_rss_mb"] > 0 and run["precision_hint"] == "f32"


@pytest.mark.slow
def test_altered_bundle_fails_but_keeps_the_intact_results(altered_bundle, tmp_path):
    results = tmp_path / "results.json"
    proc = suite(altered_bundle, results)
    assert proc.returncode == 1  # tests failed
    assert "does not match its recorded sha256" in proc.stdout and "model.bin" in proc.stdout
    data = json.loads(results.read_text())
    status = {r["artifact"]: r["status"] for r in data["runs"]}
    assert status == {"model.onnx": "passed", "model.int8.onnx": "error", "openvino/model.xml": "error",
                      "openvino/model.int8.xml": "passed"}
    assert data["tests"]["failed"] > 0


def test_missing_bundle_is_a_usage_error_with_a_results_file(tmp_path):
    results = tmp_path / "results.json"
    proc = suite(tmp_path / "nowhere", results)
    assert proc.returncode == 4
    assert "does not exist" in proc.stderr and "--bundle" in proc.stderr
    assert "does not exist" in json.loads(results.read_text())["error"]


def test_folder_without_metadata_is_not_a_bundle(tmp_path):
    (tmp_path / "b").mkdir()
    proc = suite(tmp_path / "b", tmp_path / "r.json")
    assert proc.returncode == 4 and "no artifacts.json" in proc.stderr


def test_unknown_runtime_is_refused_before_anything_runs(tmp_path):
    proc = suite(shared_bundle(), tmp_path / "r.json", "--runtime", "openvno")
    assert proc.returncode == 4 and "Did you mean 'openvino'" in proc.stderr
