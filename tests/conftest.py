"""Shared fixtures: a tiny build config (a few hundred Fashion-MNIST images, tiny CNNs) in a temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
EDGESMITH = [sys.executable, "-m", "pipeline.cli"]


# The stages after distill are left out unless a test adds them: most tests need teacher -> distill only.
DOWNSTREAM = ("qat", "export", "validate", "release")


def tiny_config_dict(output: Path, **overrides) -> dict:
    """configs/tiny.yaml up to distill, building under `output`, with dotted-key overrides."""
    from pipeline.config import apply_overrides

    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    return apply_overrides(cfg, {"build.output": str(output), **overrides}, remove=DOWNSTREAM)


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    """Path of a tiny YAML config whose builds go under tmp_path/builds."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "builds")))
    return path


@pytest.fixture
def write_config(tmp_path):
    """write_config(**overrides) -> path of a tiny config with dotted-key overrides."""
    def write(name: str = "cfg.yaml", **overrides) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "builds", **overrides)))
        return path
    return write


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*EDGESMITH, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
