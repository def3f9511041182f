"""The GPU check's CPU side: the dry run on a machine without a GPU, and the bundle preparation's size limit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

CHECK = REPO / "scripts" / "gpu_check.sh"


def dry_run(tmp_path: Path, path: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "PATH": path, "GPU_CHECK_WORK": str(tmp_path / "work")}
    return subprocess.run(["bash", str(CHECK)], capture_output=True, text=True, env=env, timeout=120)


def test_without_a_gpu_the_check_says_so_and_exits_3_having_done_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = dry_run(tmp_path, "/usr/bin:/bin")          # no nvidia-smi on this PATH
    assert result.returncode == 3, result.stderr
    message = result.stderr.strip()
    assert message.count("\n") == 0 and message.startswith("gpu_check: no usable NVIDIA GPU")
    assert "nvidia-smi is not installed" in message and "cuda available: False" in message and "Exit code 3" in message
    assert not (tmp_path / "work").exists()


def test_a_driver_without_a_cuda_torch_is_no_usable_gpu_either(tmp_path):
    """nvidia-smi lists a GPU, but the Python that must run the build sees none (a CPU-only torch, say)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB'\n")
    smi.chmod(0o755)
    result = dry_run(tmp_path, f"{bin_dir}:/usr/bin:/bin")
    assert result.returncode == 3, result.stderr
    assert "nvidia-smi lists NVIDIA H100 80GB HBM3" in result.stderr and "cuda available: False" in result.stderr


def test_a_bundle_over_the_limit_is_refused_and_removed(tmp_path):
    """The data alone (about 30 MiB of Fashion-MNIST) is over a 5 MiB limit: refused before any download."""
    out = tmp_path / "bundle"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_gpu_bundle.py"), str(out), "--max-mib", "5"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "over the 5 MiB limit (--max-mib)" in result.stderr and "fashion-mnist 29.4 MiB" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_a_folder_that_is_not_empty_is_refused(tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "keep.txt").write_text("mine")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_gpu_bundle.py"), str(tmp_path / "bundle")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "is not an empty folder" in result.stderr
    assert (tmp_path / "bundle" / "keep.txt").read_text() == "mine"


def test_a_build_that_stops_before_export_does_not_ask_for_the_export_extras(monkeypatch, tmp_path):
    """A GPU machine without the `mobile` extra builds the default config --until qat (the GPU check does)."""
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.preflight import check_build

    monkeypatch.setitem(sys.modules, "litert_torch", None)  # as if litert-torch were not installed
    cfg = load_config(REPO / "configs" / "tiny.yaml", {"build.output": str(tmp_path / "builds"),
                                                       "export.formats": ["onnx", "litert"]})
    check_build(cfg, until="qat")
    with pytest.raises(ConfigError, match="mobile"):
        check_build(cfg, until="export")
    with pytest.raises(ConfigError, match="mobile"):
        check_build(cfg)
