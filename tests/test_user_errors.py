"""Mistakes a user can make get a clear message and an exit code, never a traceback: `diff --fail-on-change` on
differing bundles, corrupt .tar.xz / .tar.bz2 bundles, a config of random bytes or a folder, `profile` next to a
malformed artifacts.json, a target that injects HTML through results.json, and the layout of the messages."""

from __future__ import annotations

import bz2
import io
import lzma
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.release.bundle import ReleaseSources, assemble_release

from .test_release import make_export_dir, make_validate_dir, release_config, release_info

ROOT = Path(__file__).resolve().parent.parent


def edgesmith(*args, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300, env=env)


@pytest.fixture(scope="module")
def two_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    a = assemble_release(root / "a", ReleaseSources(make_export_dir(root / "up_a"), make_validate_dir(root / "va"),
                                                    None), release_info())
    other = release_config(version="0.2.0")
    b = assemble_release(root / "b", ReleaseSources(make_export_dir(root / "up_b", seed=1),
                                                    make_validate_dir(root / "vb"), None), release_info(other))
    return a, b


def test_diff_fail_on_change_exits_1_when_bundles_differ(two_bundles):
    a, b = two_bundles
    changed = edgesmith("diff", a.bundle_dir, b.tarball, "--fail-on-change")
    assert "changed  model.onnx" in changed.stdout, changed.stdout + changed.stderr
    assert changed.returncode == 1
    informative = edgesmith("diff", a.bundle_dir, b.tarball)
    assert informative.returncode == 0 and "changed  model.onnx" in informative.stdout


def _corrupt(path: Path, compress) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name in ("b/model.onnx", "b/manifest.json"):
            data = "".join(f"row {i} value {i * i % 977}\n" for i in range(60000)).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = bytearray(compress(raw.getvalue()))
    at = len(blob) * 3 // 4                           # past the first header: the archive opens, reading fails
    blob[at:at + 64] = b"\x00" * 64
    path.write_bytes(bytes(blob))
    return path


@pytest.mark.parametrize("suffix, compress", [(".tar.xz", lzma.compress), (".tar.bz2", bz2.compress),
                                              (".tar.gz", lambda b: __import__("gzip").compress(b, mtime=0))])
def test_a_corrupt_compressed_bundle_is_a_clear_error(tmp_path, suffix, compress):
    proc = edgesmith("verify", _corrupt(tmp_path / f"bundle{suffix}", compress))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout.startswith("error: ")
    assert "is not a readable tar" in proc.stdout or "failed verification" in proc.stdout


def test_a_config_of_random_bytes_or_a_folder_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.yaml"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="is not a text file"):
        load_config(junk)
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_config(tmp_path)
    proc = edgesmith("check", junk)
    assert proc.returncode == 2 and "not a text file" in proc.stdout and "Traceback" not in proc.stderr
    proc = edgesmith("build", tmp_path)
    assert proc.returncode == 2 and "is a folder" in proc.stdout and "does not exist" not in proc.stdout


def test_the_fix_of_a_bulleted_problem_is_on_its_own_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("build: {name: x, seeed: 1}\nsubtask: {classes: [a, b]}\nteacher: {source: train}\n"
                    "student: {arch: cnn_tiny}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    last_bullet, fix = err.value.message.splitlines()[-2:]
    assert last_bullet.startswith("  - ") and fix.startswith("Fix these keys")


def test_an_unknown_class_reads_as_a_sentence(write_config):
    proc = edgesmith("check", write_config(**{"subtask.classes": ["Pulover", "Coat"]}))
    assert proc.returncode == 2
    assert "'Pulover' (did you mean 'Pullover'?) is not a class" in proc.stdout, proc.stdout


def test_profile_next_to_a_malformed_artifacts_json_is_a_clear_error(tmp_path):
    from tests.helpers import shared_bundle

    bundle = shared_bundle()
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes())
    (folder / "eval.npz").write_bytes((bundle / "eval.npz").read_bytes())
    (folder / "artifacts.json").write_text("{ not json")
    proc = edgesmith("profile", folder / "model.onnx", "--eval", folder / "eval.npz", "--queries", "16",
                     "--duration", "0.01")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "artifacts.json" in proc.stdout and "is not valid JSON" in proc.stdout and "Traceback" not in proc.stderr


def test_counts_from_a_target_are_escaped_in_the_report():
    from pipeline.ood.report import ood_section

    hostile = "<script>alert(1)</script>"
    ood = {"score": "energy", "temperature": 1.0, "threshold": 0.5, "auroc": 0.9, "fpr95": 0.2,
           "tpr_at_threshold": 0.95, "fpr_at_threshold": 0.2, "accuracy_accepted": 0.9, "accuracy_all": 0.8,
           "open_set_accuracy": 0.85, "n_in": hostile, "n_out": hostile,
           "histogram": {"edges": [0.0, 0.5, 1.0], "in": [1, 2], "out": [2, 1]}}
    from pipeline.validation.suite import TargetRun

    run = TargetRun("local", {"runs": [{"status": "passed", "artifact": "model.onnx", "runtime": "onnxruntime",
                                        "ood": ood}]})
    section = ood_section([run])
    assert section is not None and hostile not in section.html and "&lt;script&gt;" in section.html


def test_brackets_in_an_error_are_printed_as_written(write_config):
    """The CLI prints through rich: an error that names `.[mobile]` or echoes a value like `[bold]` must not lose it
    as markup (the mobile-extra fix read "pip install ... -e '.'")."""
    result = edgesmith("check", write_config(**{"distill.method": "[bold]kd"}))
    assert result.returncode == 2
    assert "'[bold]kd'" in result.stdout + result.stderr
