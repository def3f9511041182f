"""End to end through the CLI: a tiny build with SubDistill (teacher -> adapt -> subspaces -> distill)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import parse_config
from pipeline.runner import Build

EDGESMITH = str(Path(sys.executable).parent / "edgesmith")


def tiny_subdistill_config(tmp_path, **distill) -> dict:
    """The shape of /tmp/es/tiny.yaml: 60 training images per class, a one-epoch tiny teacher."""
    return {"build": {"name": "tiny_subdistill", "seed": 0, "output": str(tmp_path / "builds")},
            "data": {"dataset": "fashion_mnist", "train_per_class": 60, "test_per_class": 30},
            "subtask": {"classes": ["T-shirt/top", "Pullover", "Coat", "Shirt"]},
            "teacher": {"source": "train", "train": {"arch": "cnn_tiny", "epochs": 1}},
            "student": {"arch": "cnn_tiny"},
            "subspaces": {"positions_per_image": 8},
            "distill": {"method": "subdistill", "epochs": 2, **distill}}


def build(tmp_path, raw: dict):
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(raw))
    return subprocess.run([EDGESMITH, "build", str(path)], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_tiny_subdistill_build_through_the_cli(tmp_path):
    result = build(tmp_path, tiny_subdistill_config(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    root = tmp_path / "builds" / "tiny_subdistill"
    subspaces = next(root.glob("subspaces-*"))
    spectra = json.loads((subspaces / "spectra.json").read_text())
    # cnn_tiny (8, 16 channels at 14x14, 7x7) paired with itself: k = d, the whole basis is kept.
    assert [(layer["pair"]["teacher"], layer["pair"]["student"]) for layer in spectra["layers"]] == [
        ("features.0", "features.0"), ("features.1", "features.1")]
    assert [len(layer["eigenvalues"]) for layer in spectra["layers"]] == [8, 16]
    assert spectra["images"] == 192 and spectra["layers"][0]["rows"] == 192 * 8
    tensors = torch.load(subspaces / "subspaces.pt", weights_only=True)
    assert tensors["1.basis"].shape == (16, 16)
    distill = json.loads(next(root.glob("distill-*")).joinpath("stage.json").read_text())
    assert distill["inputs"]["subspaces"] == json.loads((subspaces / "stage.json").read_text())["key"]
    history = distill["metrics"]["history"]
    assert {"kd", "layer0", "layer1", "total"} <= set(history[0])
    assert 0.0 <= distill["metrics"]["student_test_acc"] <= 1.0
    # A rebuild reuses every stage (checked on the plan: a second 20-s build would only add time).
    status = Build(parse_config(tiny_subdistill_config(tmp_path))).status()
    assert [(name, cached) for name, _key, cached in status] == [
        ("teacher", True), ("adapt", True), ("subspaces", True), ("distill", True)]


def test_wrong_layer_name_fails_the_build_with_the_valid_names(tmp_path):
    raw = tiny_subdistill_config(tmp_path, method="fitnet", layers=[{"teacher": "features.7", "student": "features.1"}])
    result = build(tmp_path, raw)
    assert result.returncode == 2
    message = " ".join((result.stdout + result.stderr).split())
    assert "no module named 'features.7'" in message and "features.0, features.1" in message
    assert "Traceback" not in message
