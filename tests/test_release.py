"""Release bundles: assembled from synthetic stage outputs (real files), checked for byte-stable output."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import parse_config
from pipeline.errors import ConfigError
from pipeline.release.bundle import ReleaseError, ReleaseInfo, ReleaseSources, assemble_release
from pipeline.release.diff import diff_bundles, render_diff
from pipeline.release.manifest import MANIFEST_NAME, budget_verdict, git_state, host_info
from pipeline.release.tarball import source_date_epoch, write_tarball
from pipeline.release.verify import verify_bundle
from pipeline.stages.release import budgets_of, device_tests_dir

CLASSES = ["T-shirt/top", "Shirt", "Pullover"]
# As the validate stage records them (stage.json metrics["budgets"]).
BUDGETS = [{"artifact": "model.int8.onnx", "target": "cpu", "runtime": "onnxruntime", "budget": "max_p90_ms",
            "measured": 0.21, "allowed": 5.0, "ok": True}]


def release_config(**release) -> dict:
    raw = {"build": {"name": "tiny", "seed": 7}, "subtask": {"classes": CLASSES},
           "teacher": {"source": "timm", "name": "tf_efficientnet_lite0"}, "student": {"arch": "cnn_s"},
           "export": {"formats": ["onnx", "openvino"]}, "validate": {}, "release": {"version": "1.2.3", **release}}
    return raw


def make_export_dir(root: Path, seed: int = 0) -> Path:
    """What the export stage writes: models, OpenVINO IR, a TensorRT build script, artifacts.json, eval.npz."""
    rng = np.random.default_rng(seed)
    export = root / "export"
    (export / "openvino").mkdir(parents=True)
    (export / "tensorrt").mkdir()
    files = {"model.onnx": 3000, "model.int8.onnx": 1500, "openvino/model.xml": 400, "openvino/model.bin": 2500}
    for rel, size in files.items():
        (export / rel).write_bytes(rng.bytes(size))
    script = export / "tensorrt" / "build_engine.sh"
    script.write_text("#!/bin/sh\ntrtexec --onnx=../model.int8.onnx --saveEngine=model.engine\n")
    script.chmod(0o755)
    artifacts = [{"file": rel, "format": "onnx" if rel.endswith("onnx") else "openvino",
                  "precision": "int8" if "int8" in rel else "fp32",
                  "sha256": hashlib.sha256((export / rel).read_bytes()).hexdigest(), "size": size,
                  "parity": {"top1_agreement": 0.995 if "int8" in rel else 1.0}}
                 for rel, size in files.items() if not rel.endswith(".bin")]
    # One artifact outside the usual names, with a sidecar, and a path that tries to leave the folder.
    (export / "extra").mkdir()
    for rel in ("extra/student.fp16.xml", "extra/student.fp16.bin", "extra/student.fp16.xml.json"):
        (export / rel).write_bytes(rng.bytes(64))
    artifacts += [{"file": "extra/student.fp16.xml", "format": "openvino", "precision": "fp16",
                   "sidecar": "extra/student.fp16.xml.json"}, {"file": "../../etc/passwd", "format": "onnx"}]
    index = {"artifacts": artifacts, "class_names": CLASSES,
             "preprocessing": {"size": 28, "channels": 1, "mean": [0.5], "std": [0.5], "layout": "NCHW"}}
    (export / "artifacts.json").write_text(json.dumps(index, indent=2))
    np.savez(export / "eval.npz", images_u8=rng.integers(0, 255, (6, 1, 28, 28), dtype=np.uint8),
             labels=np.array([0, 1, 2, 0, 1, 2]))
    (export / "stage.json").write_text('{"wall_time_s": 12.5}')  # must not end up in the bundle
    return export


def make_validate_dir(root: Path) -> Path:
    validate = root / "validate"
    validate.mkdir(parents=True)
    (validate / "report.html").write_text("<html><body><h1>tiny</h1></body></html>\n")
    (validate / "report.md").write_text("# tiny\n")
    results = {"environment": {"cpu_model": "Test CPU 9000", "cpu_count": 4, "os": "Linux"},
               "settings": {"threads": 1, "min_queries": 1024},
               "runs": [{"artifact": "model.onnx", "runtime": "onnxruntime", "runtime_version": "1.31.1",
                         "threads": 1, "latency": {"p90_ms": 0.2}}]}
    (validate / "results_cpu.json").write_text(json.dumps(results))
    return validate


def release_info(config: dict | None = None, metrics: dict | None = None) -> ReleaseInfo:
    cfg = parse_config(config or release_config())
    from pipeline.release.manifest import StageEntry

    stages = {"distill": StageEntry(key="d" * 64, device="cpu", seed=7, versions={"torch": "2.14.1"},
                                    metrics=metrics or {"student_test_acc": 0.9, "teacher_test_acc": 0.95}),
              "validate": StageEntry(key="v" * 64, device="cpu", seed=7, metrics={"budgets": BUDGETS})}
    return ReleaseInfo(build=cfg.build.name, version=cfg.release.version, seed=cfg.build.seed, source_date_epoch=0,
                       config=cfg.recorded(), stages=stages, budgets=budgets_of({"budgets": BUDGETS}),
                       packages={"python": "3.11", "onnx": "1.20.0"}, source=git_state(), host=host_info())


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> ReleaseSources:
    root = tmp_path_factory.mktemp("upstream")
    return ReleaseSources(make_export_dir(root), make_validate_dir(root), device_tests_dir())


@pytest.fixture(scope="module")
def info() -> ReleaseInfo:
    return release_info()


@pytest.fixture(scope="module")
def built(tmp_path_factory, sources, info):
    return assemble_release(tmp_path_factory.mktemp("release"), sources, info)


def test_two_builds_in_fresh_folders_are_byte_identical(tmp_path, sources, info, built):
    again = assemble_release(tmp_path / "second", sources, info)
    assert again.tarball.read_bytes() == built.tarball.read_bytes()
    assert (again.bundle_dir / MANIFEST_NAME).read_bytes() == (built.bundle_dir / MANIFEST_NAME).read_bytes()
    assert [(f.path, f.sha256) for f in again.manifest.files] == [(f.path, f.sha256) for f in built.manifest.files]


def test_manifest_lists_every_file_with_its_real_hash(built, info):
    listed = {f.path: f for f in built.manifest.files}
    on_disk = sorted(p.relative_to(built.bundle_dir).as_posix() for p in built.bundle_dir.rglob("*")
                     if p.is_file() and p.name != MANIFEST_NAME)
    assert sorted(listed) == on_disk
    for rel, entry in listed.items():
        data = (built.bundle_dir / rel).read_bytes()
        assert entry.sha256 == hashlib.sha256(data).hexdigest() and entry.size == len(data)
    raw = json.loads((built.bundle_dir / MANIFEST_NAME).read_text())
    assert raw["schema_version"] == 1 and raw["config_sha256"] == parse_config(release_config()).digest()
    assert raw["budget_verdict"] == "pass" and raw["budgets"] == BUDGETS
    assert raw["stages"]["distill"]["metrics"]["student_test_acc"] == 0.9
    assert raw["measurement_conditions"] == {"results/results_cpu.json": {
        "environment": {"cpu_model": "Test CPU 9000", "cpu_count": 4, "os": "Linux"},
        "settings": {"threads": 1, "min_queries": 1024},
        "runs": [{"artifact": "model.onnx", "runtime": "onnxruntime", "runtime_version": "1.31.1", "threads": 1}]}}


def test_bundle_holds_the_payload_and_nothing_time_dependent(built):
    names = {f.path for f in built.manifest.files}
    expected = {"model.onnx", "model.int8.onnx", "openvino/model.xml", "openvino/model.bin", "artifacts.json",
                "eval.npz", "tensorrt/build_engine.sh", "report.html", "report.md", "results/results_cpu.json",
                "labels.txt", "preprocessing.json", "MODEL_CARD.md", "device_tests/__init__.py",
                "extra/student.fp16.xml", "extra/student.fp16.bin", "extra/student.fp16.xml.json"}
    assert expected <= names
    assert not any("__pycache__" in n or n.endswith("stage.json") or "passwd" in n for n in names)
    assert built.missing == ["openvino/model.int8.bin", "openvino/model.int8.xml"]
    assert (built.bundle_dir / "labels.txt").read_text().splitlines() == CLASSES
    for text_file in ("manifest.json", "MODEL_CARD.md"):
        assert "wall_time" not in (built.bundle_dir / text_file).read_text()


def test_tarball_entries_are_sorted_stamped_and_owned_by_root(built):
    raw = built.tarball.read_bytes()
    assert raw[4:8] == b"\0\0\0\0", "gzip header must carry no timestamp"
    assert not raw[3] & 0x08, "gzip header must carry no file name"
    with tarfile.open(built.tarball) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == "tiny-1.2.3" and all(n.startswith("tiny-1.2.3/") for n in names[1:])
    assert names == sorted(names, key=lambda n: n.split("/"))
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
    modes = {m.name.split("/", 1)[-1]: m.mode for m in members}
    assert modes["tensorrt/build_engine.sh"] == 0o755 and modes["model.onnx"] == 0o644


def test_tarball_is_byte_identical_when_rebuilt_from_the_same_folder(tmp_path, built):
    first = write_tarball(built.bundle_dir, tmp_path / "a.tar.gz", "x", mtime=1_700_000_000)
    for path in built.bundle_dir.rglob("*"):
        os.utime(path, (123456789, 123456789))  # file mtimes must not leak into the archive
    second = write_tarball(built.bundle_dir, tmp_path / "b.tar.gz", "x", mtime=1_700_000_000)
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(second) as tar:
        assert {m.mtime for m in tar.getmembers()} == {1_700_000_000}
    assert not list(tmp_path.glob(".*tmp*")), "temporary files are renamed into place"


def test_model_card_names_the_subtask_teacher_metrics_and_limits(built):
    card = (built.bundle_dir / "MODEL_CARD.md").read_text()
    for needle in ("`T-shirt/top`", "`Pullover`", "tf_efficientnet_lite0", "student_test_acc", "| 0.9 |",
                   "## Known limits", "no 'none of these' class", "INT8", "Device-specific", "verdict: pass",
                   "model.int8.onnx", "top1_agreement=0.995",
                   "taken on Test CPU 9000, 4 cores", "runtimes: onnxruntime 1.31.1"):
        assert needle in card, needle
    assert card.count("max_p90_ms") == 1, "budgets are shown once, in their own table"
    assert "None" not in card


@pytest.mark.parametrize("flags, verdict", [([], "none"), ([{"ok": True}, {"passed": True}], "pass"),
                                            ([{"ok": True}, {"ok": False}], "fail"), ([{"ok": True}, {}], "unknown")])
def test_budget_verdict_reads_each_checks_flag(flags, verdict):
    assert budget_verdict([{"budget": "x", **f} for f in flags]) == verdict


def test_the_recorded_config_loads_back_to_the_same_digest(built):
    manifest = json.loads((built.bundle_dir / MANIFEST_NAME).read_text())
    assert parse_config(manifest["config"]).digest() == manifest["config_sha256"]


def test_release_refuses_an_export_without_the_onnx_model(tmp_path, info):
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.int8.onnx").write_bytes(b"q")
    with pytest.raises(ReleaseError, match="no model.onnx"):
        assemble_release(tmp_path / "out", ReleaseSources(export, None, None), info)


def test_bundle_without_validation_records_what_is_missing(tmp_path, sources, info):
    out = assemble_release(tmp_path / "out", ReleaseSources(sources.export_dir, None, None,
                                                            include_eval_set=False), info)
    assert {"report.html", "results/", "device_tests/"} <= set(out.missing)
    assert out.manifest.missing == out.missing
    # Left out on purpose (include_eval_set: false), so neither shipped nor reported missing.
    assert "eval.npz" not in out.missing and not (out.bundle_dir / "eval.npz").exists()
    assert verify_bundle(out.bundle_dir).ok


def test_diff_reports_config_metric_and_artifact_changes(tmp_path, sources, built):
    changed_export = make_export_dir(tmp_path / "up", seed=1)  # different model bytes
    other_config = release_config(version="1.2.3")
    other_config["build"]["seed"] = 8
    other = assemble_release(tmp_path / "b", ReleaseSources(changed_export, sources.validate_dir, None),
                             release_info(other_config, metrics={"student_test_acc": 0.93, "teacher_test_acc": 0.95}))
    d = diff_bundles(built.tarball, other.bundle_dir)
    assert ("build.seed", 7, 8) in d.config
    assert ("stages.distill.metrics.student_test_acc", 0.9, 0.93) in d.metrics
    assert {"model.onnx", "model.int8.onnx", "eval.npz"} <= set(d.changed)
    assert "device_tests/__init__.py" in d.removed and d.substantive and not d.same_content
    text = render_diff(d)
    assert "build.seed: 7 -> 8" in text and "+0.03" in text and "changed  model.onnx" in text


def test_diff_of_a_bundle_with_its_own_tarball_finds_nothing(built):
    d = diff_bundles(built.bundle_dir, built.tarball)
    assert d.same_content and not d.substantive and not d.environment


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                   check=True, capture_output=True)


def test_git_state_reports_commit_and_uncommitted_code(tmp_path):
    repo = tmp_path / "checkout"
    (repo / "pipeline").mkdir(parents=True)
    (repo / "pipeline" / "a.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "pipeline")
    _git(repo, "commit", "-q", "-m", "c")
    (repo / "notes.txt").write_text("not code\n")  # untracked, but outside the code: still clean
    state = git_state(repo)
    assert len(state.git_commit) == 40 and state.git_dirty is False
    (repo / "pipeline" / "new_module.py").write_text("y = 2\n")  # untracked code changes the build
    assert git_state(repo).git_dirty is True
    assert git_state(repo / "pipeline").git_commit == "unknown"  # not the checkout's root
    assert git_state(tmp_path).model_dump() == {"git_commit": "unknown", "git_dirty": "unknown"}


def test_source_date_epoch_comes_from_config_then_environment(monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert source_date_epoch(None) == 0
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert source_date_epoch(None) == 1_700_000_000 and source_date_epoch(5) == 5
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ConfigError, match="SOURCE_DATE_EPOCH is 'yesterday'"):
        source_date_epoch(None)
