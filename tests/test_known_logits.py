"""The adapt stage's table of teacher logits (looked up by image content by distill, outlier exposure and QAT)
and the channels_last layout the teacher runs in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.data import View
from pipeline.data.for_config import subtask_data
from pipeline.models import create_model, load_teacher
from pipeline.models.known_logits import KnownLogits, image_digests, save_known_logits, teacher_logits
from pipeline.models.layout import channels_last, channels_last_model
from pipeline.models.predict import predict_logits

from .conftest import run_cli

VIEW = View(size=28, channels=1, mean=(0.5,), std=(0.5,))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def test_digests_tell_apart_images_that_differ_in_one_pixel():
    images = _images(5)
    changed = images.copy()
    changed[2, 0, 13, 7] ^= 1
    first, second = image_digests(images), image_digests(changed)
    assert len(set(first.tolist())) == 5
    assert (first == second).sum() == 4 and first[2] != second[2]
    assert (image_digests(images.copy()) == first).all()


def test_teacher_logits_come_from_the_table_where_known_and_from_the_model_elsewhere(tmp_path):
    torch.manual_seed(0)
    model = create_model("cnn_tiny", 6, 1).eval()
    images = _images(30)
    computed = predict_logits(model, VIEW, images, torch.device("cpu"))
    # The table holds shifted logits for the first 18 images, so a looked-up row is recognisable.
    save_known_logits(tmp_path, images[:18], computed[:18] + 100.0)
    known = KnownLogits.load(tmp_path)
    got = teacher_logits(model, VIEW, images, torch.device("cpu"), columns=[1, 4], known=known)
    assert got.shape == (30, 2)
    torch.testing.assert_close(got[:18], computed[:18, [1, 4]] + 100.0)
    torch.testing.assert_close(got[18:], computed[18:, [1, 4]], atol=1e-5, rtol=1e-5)
    assert KnownLogits.load(tmp_path / "elsewhere") is None
    # No table at all: everything computed; the model is back in the default layout afterwards.
    torch.testing.assert_close(teacher_logits(model, VIEW, images, torch.device("cpu")), computed, atol=1e-5, rtol=1e-5)
    assert all(p.is_contiguous() for p in model.parameters())


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    model = create_model("cnn_small", 4, 1).eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        reference = model(x)
        with channels_last_model(model):
            assert model.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
            fast = model(channels_last(x))
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    assert model.features[0][0].weight.is_contiguous()


@pytest.mark.slow
def test_adapt_on_a_cached_prefix_saves_the_finished_teachers_logits(write_config):
    config = write_config(**{"teacher.adapt": {"method": "finetune", "train_from": "features.1", "epochs": 1}})
    result = run_cli("build", config)
    assert result.returncode == 0, result.stdout + result.stderr
    cfg = load_config(config)
    adapt_dir = next((config.parent / "builds" / "tiny").glob("adapt-*"))
    teacher, spec = load_teacher(adapt_dir)
    view = spec.input
    data = subtask_data(cfg)
    known = KnownLogits.load(adapt_dir)
    # Every training/validation image of the dataset and every subtask test image is in the table ...
    seen = np.concatenate([data.dataset.train.images, data.test.images])
    rows = known.rows(seen)
    assert (rows >= 0).all()
    # ... with the logits of a full forward pass of the adapted teacher (the tail ran on the cached prefix).
    full = predict_logits(teacher, view, seen, torch.device("cpu"))
    torch.testing.assert_close(torch.from_numpy(known.logits[rows]), full, atol=1e-4, rtol=1e-4)
    stages = {p.name.split("-")[0]: json.loads((p / "stage.json").read_text())["metrics"]
              for p in adapt_dir.parent.glob("*-*")}
    assert stages["distill"]["teacher_test_acc"] == pytest.approx(stages["adapt"]["teacher_subtask_test_acc"])


def _adapt_folder(output: Path) -> tuple:
    folder = next((output / "tiny").glob("adapt-*"))
    return folder, json.loads((folder / "stage.json").read_text())["metrics"]


def _adapt_with_and_without(write_config, tmp_path, extra: dict) -> tuple:
    """Build until adapt twice, on a cached prefix, without and with the `extra` teacher.adapt keys: (config,
    folder, metrics) of each."""
    adapt = {"method": "finetune", "train_from": "features.1", "epochs": 2, "keep": "last"}
    built = []
    for name, keys in (("a", adapt), ("b", {**adapt, **extra})):
        config = write_config(f"{name}.yaml", **{"teacher.adapt": keys, "build.output": str(tmp_path / name / "builds")})
        result = run_cli("build", config, "--until", "adapt")
        assert result.returncode == 0, result.stdout + result.stderr
        built.append((config, *_adapt_folder(tmp_path / name / "builds")))
    return built


def test_adapt_heads_make_the_teacher_answers_the_mean_of_several_heads(write_config, tmp_path):
    (_, one_dir, one), (several, three_dir, three) = _adapt_with_and_without(write_config, tmp_path, {"heads": 3})
    assert one["adapt_best_epoch"] == three["adapt_best_epoch"] == 2          # keep: last
    assert "adapt_heads" not in one and three["adapt_heads"] == 3
    # The saved network is the first head, the same as without heads ...
    assert (one_dir / "teacher.pt").read_bytes() == (three_dir / "teacher.pt").read_bytes()
    # ... but the answers later stages read are the three heads' mean, and the teacher's test accuracy is theirs.
    data = subtask_data(load_config(several))
    test_one = KnownLogits.load(one_dir).logits[KnownLogits.load(one_dir).rows(data.test.images)]
    known = KnownLogits.load(three_dir)
    test_three = known.logits[known.rows(data.test.images)]
    assert np.abs(test_three - test_one).max() > 0.05
    ids = three["teacher_subtask_ids"]
    assert three["teacher_subtask_test_acc"] == pytest.approx(float((test_three[:, ids].argmax(1) == data.test.labels).mean()))


def test_adapt_augment_copies_train_the_tail_on_cached_crops_and_flips(write_config, tmp_path):
    (_, plain_dir, one), (copies, copies_dir, three) = _adapt_with_and_without(write_config, tmp_path,
                                                                                {"augment_copies": 3})
    assert one["adapt_train_views"] == one["adapt_train_images"]
    assert three["adapt_train_views"] == 3 * three["adapt_train_images"] == 3 * one["adapt_train_images"]
    assert (plain_dir / "teacher.pt").read_bytes() != (copies_dir / "teacher.pt").read_bytes()
    # The logits table holds the finished teacher's answers on the images themselves, not on their copies.
    teacher, spec = load_teacher(copies_dir)
    data = subtask_data(load_config(copies))
    known = KnownLogits.load(copies_dir)
    seen = np.concatenate([data.dataset.train.images[:500], data.test.images[:200]])
    full = predict_logits(teacher, spec.input, seen, torch.device("cpu"))
    torch.testing.assert_close(torch.from_numpy(known.logits[known.rows(seen)]), full, atol=1e-4, rtol=1e-4)


def test_distill_with_layer_targets_learns_the_heads_mean_not_the_first_head(write_config, tmp_path):
    # attention runs the teacher network (the first head) for its layer targets; the answers it distils must still
    # be the adapt stage's table, the mean of the heads, as for kd and QAT.
    from pipeline.distill.train import loop_parts
    from pipeline.progress import ProgressDisplay
    from pipeline.stage import StageContext, StageRecord
    from pipeline.stages.distill import DistillStage

    adapt = {"method": "finetune", "train_from": "features.1", "epochs": 2, "keep": "last", "heads": 3}
    config = write_config(**{"teacher.adapt": adapt, "distill.method": "attention"})
    result = run_cli("build", config, "--until", "adapt")
    assert result.returncode == 0, result.stdout + result.stderr
    adapt_dir, _ = _adapt_folder(tmp_path / "builds")
    inputs = {"adapt": StageRecord("adapt", "a" * 64, adapt_dir, {})}
    ctx = StageContext(load_config(config), tmp_path, inputs, ProgressDisplay(enabled=False), "d" * 64)
    run = DistillStage().prepare(ctx)
    logits, layer_targets = loop_parts(run.models, run.method, run.train, run.settings).teacher_out.cached
    assert len(layer_targets) == len(run.method.pairs) > 0
    known = KnownLogits.load(adapt_dir)
    table = known.logits[known.rows(run.train.images)][:, run.models.teacher_ids]
    torch.testing.assert_close(logits, torch.from_numpy(table))
    first_head = teacher_logits(run.models.teacher, run.models.teacher_view, run.train.images, torch.device("cpu"),
                                run.models.teacher_ids)
    assert (logits - first_head).abs().max() > 0.05


@pytest.mark.parametrize("key,value", [("heads", 3), ("augment_copies", 4)])
def test_adapt_options_on_a_cached_prefix_need_one(write_config, key, value):
    config = write_config(**{"teacher.adapt": {"method": "finetune", "epochs": 1, key: value}})
    result = run_cli("check", config)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"teacher.adapt.{key}" in result.stdout + result.stderr and "train_from" in result.stdout + result.stderr
