"""End to end through the CLI: a tiny build with SubDistill (teacher -> adapt -> subspaces -> distill)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import load_config
from pipeline.runner import Build
from tests.conftest import run_cli


@pytest.mark.slow
def test_tiny_subdistill_build_through_the_cli(write_config, tmp_path):
    config = write_config(**{"distill.method": "subdistill", "subspaces.positions_per_image": 8})
    result = run_cli("build", config)
    assert result.returncode == 0, result.stdout + result.stderr
    root = tmp_path / "builds" / "tiny"
    subspaces = next(root.glob("subspaces-*"))
    spectra = json.loads((subspaces / "spectra.json").read_text())
    # cnn_tiny (8, 16 channels at 14x14, 7x7) paired with itself: k = d, the whole basis is kept.
    assert [(layer["pair"]["teacher"], layer["pair"]["student"]) for layer in spectra["layers"]] == [
        ("features.0", "features.0"), ("features.1", "features.1")]
    assert [len(layer["eigenvalues"]) for layer in spectra["layers"]] == [8, 16]
    train_images = 4 * 32                       # 40 per class, 80/20 split
    assert spectra["images"] == train_images and spectra["layers"][0]["rows"] == train_images * 8
    tensors = torch.load(subspaces / "subspaces.pt", weights_only=True)
    assert tensors["1.basis"].shape == (16, 16)
    distill = json.loads(next(root.glob("distill-*")).joinpath("stage.json").read_text())
    assert distill["inputs"]["subspaces"] == json.loads((subspaces / "stage.json").read_text())["key"]
    history = distill["metrics"]["history"]
    assert {"kd", "layer0", "layer1", "total"} <= set(history[0])
    assert 0.0 <= distill["metrics"]["student_test_acc"] <= 1.0
    # A rebuild reuses every stage (checked on the plan: a second build would only add time).
    status = Build(load_config(config)).status()
    assert [(name, cached) for name, _key, cached in status] == [
        ("teacher", True), ("adapt", True), ("subspaces", True), ("distill", True)]


def test_wrong_layer_name_fails_the_build_with_the_valid_names(write_config):
    config = write_config(**{"distill.method": "fitnet",
                             "distill.layers": [{"teacher": "features.7", "student": "features.1"}]})
    result = run_cli("build", config)
    assert result.returncode == 2
    message = " ".join((result.stdout + result.stderr).split())
    assert "no module named 'features.7'" in message and "features.0, features.1" in message
    assert "Traceback" not in message
