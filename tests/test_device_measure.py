"""One artifact measured in-process: the latency protocol is honoured, statistics are consistent, accuracy
is computed against the labels and the recorded teacher / FP32 predictions."""

import numpy as np
import pytest

from device_tests.bundle import Artifact, Bundle
from device_tests.errors import IncompatibleArtifactError
from device_tests.latency import LatencySettings
from device_tests.measure import main, measure
from tests.helpers import TINY_LATENCY, shared_bundle

SETTINGS = LatencySettings(**TINY_LATENCY)


@pytest.fixture(scope="module")
def bundle():
    return Bundle.load(shared_bundle())


@pytest.fixture(scope="module")
def fp32_result(bundle):
    art = next(a for a in bundle.artifacts if a.file == "model.onnx")
    return measure(art, "onnxruntime", SETTINGS, 1, "f32", bundle.eval_set(), bundle.preprocess)


def test_latency_protocol(fp32_result):
    lat = fp32_result["latency"]
    # both loops (model calls back to back; whole queries) meet the protocol
    assert lat["queries"] >= SETTINGS.min_queries and lat["pipeline_queries"] >= SETTINGS.min_queries
    assert lat["duration_s"] >= SETTINGS.min_duration_s
    for part in ("model", "preprocess", "model_in_pipeline", "postprocess", "end_to_end"):
        s = lat[part]
        assert s["n"] == (lat["queries"] if part == "model" else lat["pipeline_queries"])
        assert s["min_ms"] <= s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
        assert len(s["cdf_ms"]) == 101 and s["cdf_ms"] == sorted(s["cdf_ms"])
    # end-to-end is the sum of its parts, query by query, so its mean is the sum of the means
    assert lat["end_to_end"]["mean_ms"] == pytest.approx(
        lat["model_in_pipeline"]["mean_ms"] + lat["preprocess"]["mean_ms"] + lat["postprocess"]["mean_ms"], rel=1e-6)
    tp = fp32_result["throughput"]
    assert tp["batch"] == SETTINGS.throughput_batch and tp["images_per_s"] > 0
    assert fp32_result["peak_rss_mb"] >= fp32_result["baseline_rss_mb"] > 0


def test_accuracy_against_labels_teacher_and_fp32(bundle, fp32_result):
    ev = bundle.eval_set()
    acc = fp32_result["accuracy"]
    # the FP32 ONNX artifact predicts what the exporting torch model predicted
    assert acc["agreement_fp32"] == 1.0
    assert acc["top1"] == pytest.approx(np.mean(ev.fp32_pred == ev.labels))
    assert acc["agreement_teacher"] == pytest.approx(np.mean(ev.fp32_pred == ev.teacher_pred))
    assert acc["teacher_top1"] == pytest.approx(np.mean(ev.teacher_pred == ev.labels))
    cm = np.array(acc["confusion"])
    assert cm.sum() == len(ev) and np.array_equal(cm.sum(1), np.bincount(ev.labels, minlength=len(cm)))
    per_class = [cm[c, c] / cm[c].sum() for c in range(len(cm))]
    assert acc["per_class"] == pytest.approx(per_class)


def test_int8_artifact_is_measured_too(bundle):
    art = next(a for a in bundle.artifacts if a.file == "model.int8.onnx")
    result = measure(art, "onnxruntime", SETTINGS, 1, "f32", bundle.eval_set(), bundle.preprocess)
    assert result["precision"] == "int8" and result["size_bytes"] < next(
        a for a in bundle.artifacts if a.file == "model.onnx").size
    assert 0 <= result["accuracy"]["agreement_fp32"] <= 1


def test_bare_model_gets_synthetic_input():
    art = Artifact.from_path(shared_bundle() / "openvino" / "model.xml")
    result = measure(art, "openvino", SETTINGS)
    assert result["synthetic_input"] and "accuracy" not in result
    assert result["size_bytes"] == art.path.stat().st_size + art.path.with_suffix(".bin").stat().st_size


def test_dynamic_image_size_needs_a_shape(tmp_path):
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    path = tmp_path / "dyn.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 16, 16), path, input_names=["x"], dynamo=False,
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    with pytest.raises(IncompatibleArtifactError, match="--shape N,C,H,W"):
        measure(Artifact.from_path(path), "onnxruntime", SETTINGS)
    result = measure(Artifact.from_path(path), "onnxruntime", SETTINGS, shape=(1, 3, 24, 24))
    assert result["latency"]["queries"] >= SETTINGS.min_queries


def test_measure_cli_writes_an_error_result_for_a_missing_artifact(tmp_path):
    out = tmp_path / "r.json"
    code = main(["--bundle", str(shared_bundle()), "--artifact", "nope.onnx", "--runtime", "onnxruntime",
                 "--out", str(out)])
    import json

    result = json.loads(out.read_text())
    assert code == 2 and result["status"] == "error" and "no artifact 'nope.onnx'" in result["message"]


def test_measure_main_in_process_gives_its_caller_the_cpus_back(tmp_path):
    """main() pins to --threads CPUs while it measures; called in-process (as here) it used to leave pytest on one
    CPU for every later test (and test_measure_pins_itself_... then skipped: 'fewer than 2 usable CPUs')."""
    import os

    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(os.getppid())) < 2:
        pytest.skip("fewer than 2 usable CPUs (or no affinity API): nothing to pin")
    before = os.sched_getaffinity(os.getppid())      # pytest's parent: not pinned by anything in this session
    os.sched_setaffinity(0, before)
    code = main(["--bundle", str(shared_bundle()), "--artifact", "model.onnx", "--runtime", "onnxruntime",
                 "--threads", "1", "--min-queries", "8", "--min-duration", "0", "--layer-runs", "0", "--no-tool",
                 "--out", str(tmp_path / "r.json")])
    assert code == 0 and os.sched_getaffinity(0) == before


def test_agreement_with_the_quantized_torch_model_when_recorded(tmp_path):
    import shutil

    bundle_dir = tmp_path / "b"
    shutil.copytree(shared_bundle(), bundle_dir)
    with np.load(bundle_dir / "eval.npz") as data:
        arrays = dict(data)
    int8_pred = (arrays["fp32_pred"] + (np.arange(len(arrays["labels"])) % 5 == 0)) % 4  # differs on every 5th image
    np.savez(bundle_dir / "eval.npz", **arrays, int8_pred=int8_pred)
    bundle = Bundle.load(bundle_dir)
    art = next(a for a in bundle.artifacts if a.file == "model.onnx")
    acc = measure(art, "onnxruntime", SETTINGS, eval_set=bundle.eval_set(), preprocess=bundle.preprocess)["accuracy"]
    assert acc["agreement_int8"] == pytest.approx(np.mean(arrays["fp32_pred"] == int8_pred))
    assert acc["int8_top1"] == pytest.approx(np.mean(int8_pred == arrays["labels"]))


def _measure_process(tmp_path, *extra: str) -> tuple[int, dict, str]:
    """device_tests.measure in its own process: pinning in this one would pin the rest of the test session."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "device_tests.measure", "--bundle", str(shared_bundle()), "--artifact", "model.onnx",
           "--runtime", "onnxruntime", "--threads", "1", "--min-queries", "32", "--min-duration", "0",
           "--layer-runs", "0", "--no-tool", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    return proc.returncode, json.loads(out.read_text()), proc.stderr


def test_measure_pins_itself_to_as_many_cpus_as_threads(tmp_path):
    import os

    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(usable) < 2:
        pytest.skip("fewer than 2 usable CPUs (or no affinity API): nothing to pin")
    code, result, _ = _measure_process(tmp_path)
    assert code == 0 and result["environment"]["pinned_cpus"] == usable[-1:]
    assert result["environment"]["usable_cores"] == 1   # read after pinning: the mask really changed
    code, free, _ = _measure_process(tmp_path, "--cpus", "none")
    assert code == 0 and free["environment"]["pinned_cpus"] is None and free["environment"]["usable_cores"] == len(usable)


def test_measure_refuses_cpus_it_cannot_use(tmp_path):
    for bad, words in (("x,y", "not a list of CPU numbers"), ("4096", "not all usable here")):
        code, result, stderr = _measure_process(tmp_path, "--cpus", bad)
        assert code == 2 and result["status"] == "error" and words in result["message"] and "Traceback" not in stderr
