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


def tiny_config_dict(output: Path, **overrides) -> dict:
    cfg = {
        "build": {"name": "tiny", "seed": 0, "output": str(output), "threads": 1},
        "data": {"dataset": "fashion_mnist", "train_per_class": 40, "test_per_class": 20},
        "subtask": {"classes": ["T-shirt/top", "Pullover", "Coat", "Shirt"]},
        "teacher": {"source": "train", "train": {"arch": "cnn_tiny", "epochs": 1}},
        "student": {"arch": "cnn_tiny"},
        "distill": {"method": "kd", "epochs": 2, "batch_size": 32},
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return cfg


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
