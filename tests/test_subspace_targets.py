"""SubDistill's projected layer targets cached by the subspaces stage (float16) against the live ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.data import View
from pipeline.distill.config import DistillConfig
from pipeline.distill.methods import METHODS, Outputs
from pipeline.distill.subspace import Subspace, accumulate, load_subspaces, save_subspaces
from pipeline.distill.targets import compute_targets, load_targets, save_targets
from pipeline.distill.train import Models, TeacherOutputs, layer_pairs
from pipeline.models import create_model
from pipeline.models.layout import channels_last_model

from .conftest import run_cli

# float16 keeps 11 significant bits: relative rounding error <= 2^-11. Allowed: twice that, plus an absolute
# 1e-4 for values near zero (float16 subnormals) and the float32 noise of two evaluation orders.
RTOL, ATOL = 2 ** -10, 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    teacher = create_model("cnn_small", 10, 1).eval()
    student = create_model("cnn_tiny", 4, 1)
    view = View(28, 1, (0.5,), (0.5,))
    models = Models(teacher, student, view, View(20, 1, (0.5,), (0.5,)), [0, 2, 4, 6])
    pairs = layer_pairs("auto", models)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (96, 1, 28, 28), dtype=np.uint8)
    x = torch.from_numpy(images)
    moments = accumulate(teacher, (view(x[i:i + 32]) for i in range(0, 96, 32)), pairs, models.teacher_ids, 8, 0)
    folder = tmp_path_factory.mktemp("subspaces")
    save_subspaces(folder, pairs, [Subspace.from_moments(m, p.student_channels, "subdistill", 0)
                                   for m, p in zip(moments, pairs)], {})
    return models, pairs, images, folder


@pytest.mark.parametrize("method", ["subdistill"])
def test_cached_float16_targets_equal_the_live_ones(setup, method):
    models, pairs, images, folder = setup
    _, layers = load_subspaces(folder)
    logits, targets = compute_targets(models.teacher, models.teacher_view, images, pairs, layers, models.teacher_ids,
                                      torch.device("cpu"), batch=40)
    assert all(t.dtype == torch.float16 for t in targets) and len(logits) == len(images)
    save_targets(folder, images, logits, targets)
    cached = load_targets(folder, images, len(pairs))
    assert cached is not None and load_targets(folder, images[::-1], len(pairs)) is None   # other order: refused
    sub = METHODS.get(method)(DistillConfig(method=method), pairs=pairs, teacher=models.teacher,
                              student=models.student, subspaces_dir=folder)
    live = TeacherOutputs(models, sub, torch.from_numpy(images), torch.device("cpu"), cached=False)
    from_cache = TeacherOutputs(models, sub, torch.from_numpy(images), torch.device("cpu"), cached=False,
                                projected=cached)
    idx = torch.arange(10, 70)
    raw = torch.from_numpy(images)[idx]
    with channels_last_model(models.teacher):       # as distill() runs the teacher
        live_logits, live_targets = live.for_batch(idx, raw)
    cached_logits, cached_targets = from_cache.for_batch(idx, raw)
    torch.testing.assert_close(cached_logits, live_logits, rtol=1e-5, atol=1e-5)
    for i in range(len(pairs)):
        cached_map, live_map = cached_targets[i].maps, live_targets[i].flatten(2)
        assert cached_map.dtype == torch.float32 and cached_map.shape == (len(idx), live_map.shape[1] + 1, live_map.shape[2])
        torch.testing.assert_close(cached_targets[i].plain, live_map, rtol=RTOL, atol=ATOL)
        assert bool((cached_map[:, -1] == 1).all())                        # the ones channel the fused loss reads
        torch.testing.assert_close(cached_targets[i].sums, live_map.sum(dim=(0, 2)), rtol=RTOL,
                                   atol=ATOL * live_map[:, 0].numel())
        assert float(cached_targets[i].squares) == pytest.approx(float(live_map.pow(2).sum()), rel=2 * RTOL)
    # ... and the layer losses they give agree to the same relative precision
    student_feats = {i: torch.randn(len(idx), p.student_channels, *p.student_size) for i, p in enumerate(pairs)}
    sub.train()
    out = lambda t: sub.layer_losses(Outputs(torch.zeros(len(idx), 4), live_logits, torch.zeros(len(idx), dtype=torch.long),  # noqa: E731
                                             student_feats, t))
    for name, value in out(live_targets).items():
        assert float(out(cached_targets)[name].detach()) == pytest.approx(float(value.detach()), rel=2e-3)


@pytest.mark.slow
def test_subdistill_build_trains_from_the_cached_targets(write_config):
    config = write_config(**{"distill.method": "subdistill", "distill.epochs": 1})
    result = run_cli("build", config, "--until", "distill")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "teacher targets: cached by the subspaces stage" in result.stdout
    build = load_config(config)
    folder = next((config.parent / "builds" / "tiny").glob("subspaces-*"))
    metrics = json.loads((folder / "stage.json").read_text())["metrics"]
    assert metrics["targets_images"] == 4 * 32 and metrics["targets_dtype"] == "float16"
    # a change of the training settings reuses the subspaces and their targets
    again = run_cli("build", write_config("cfg2.yaml", **{"distill.method": "subdistill", "distill.epochs": 2,
                                                         "distill.lr": 0.002}), "--until", "distill")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "subspaces  cached" in again.stdout and "distill    running" in again.stdout, again.stdout
    assert build.distill.method == "subdistill"
