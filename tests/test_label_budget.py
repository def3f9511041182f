"""Label budget (data.labels_per_class) and the unlabelled pool (data.unlabelled): who sees which labels, what
distillation trains on, what the cache key and model card say, and the errors for impossible budgets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import load_config, parse_config
from pipeline.data import load_dataset
from pipeline.data.budget import UNLABELLED, read_folder, val_per_class
from pipeline.data.for_config import subtask_data
from pipeline.data.subtask import make_subtask
from pipeline.distill.methods import label_loss
from pipeline.models import load_teacher
from pipeline.models.known_logits import KnownLogits
from pipeline.models.predict import predict_logits
from pipeline.release.model_card import CardFacts, render_model_card

from .conftest import REPO, run_cli, tiny_config_dict


def tiny_data_cfg(**data):
    raw = tiny_config_dict("unused")
    raw["data"].update(data)
    return parse_config(raw).data


def test_val_rule_holds_at_most_a_quarter_and_at_least_one():
    assert [val_per_class(n, 0.2) for n in (2, 4, 10, 50, 200)] == [1, 1, 2, 10, 40]
    assert all(val_per_class(n, 0.5) <= max(1, n // 4) for n in range(2, 300))


def test_budget_keeps_n_labels_per_class_and_pools_the_rest():
    dataset = load_dataset(tiny_data_cfg())                 # 40 training images per class, 10 classes
    ids = dataset.class_ids(["T-shirt/top", "Pullover", "Coat", "Shirt"])
    data = make_subtask(dataset, ["T-shirt/top", "Pullover", "Coat", "Shirt"], 0.2, 0, labels_per_class=12)
    assert np.bincount(data.train.labels).tolist() == [10] * 4      # 12 - round(0.2 x 12) = 12 - 2
    assert np.bincount(data.val.labels).tolist() == [2] * 4
    assert data.pool is not None and len(data.pool) == 400 - 48 and (data.pool.labels == UNLABELLED).all()
    # labelled train, labelled val and pool are disjoint and together are the whole training split
    digests = lambda s: {im.tobytes() for im in s.images}            # noqa: E731
    train, val, pool = digests(data.train), digests(data.val), digests(data.pool)
    assert not (train & val) and not ((train | val) & pool)
    assert len(train | val | pool) == len(digests(dataset.train))
    # the pool holds the other classes' images as well as the subtask's unlabelled ones
    assert len(pool) > 400 - 40 * len(ids) - 1
    transfer = data.transfer
    assert len(transfer) == 40 + 352 and (transfer.labels[:40] >= 0).all() and (transfer.labels[40:] < 0).all()
    # seeded: the same seed picks the same images, another seed others
    again = make_subtask(dataset, ["T-shirt/top", "Pullover", "Coat", "Shirt"], 0.2, 0, labels_per_class=12)
    other = make_subtask(dataset, ["T-shirt/top", "Pullover", "Coat", "Shirt"], 0.2, 1, labels_per_class=12)
    assert np.array_equal(again.train.images, data.train.images)
    assert not np.array_equal(other.train.images, data.train.images)
    capped = make_subtask(dataset, ["T-shirt/top", "Pullover", "Coat", "Shirt"], 0.2, 0, labels_per_class=12,
                          pool_cap=50)
    assert len(capped.pool) == 50 and digests(capped.pool) <= pool
    assert make_subtask(dataset, ["Coat", "Shirt"], 0.2, 0, labels_per_class=12, unlabelled="none").pool is None


def test_without_a_budget_nothing_changes():
    dataset = load_dataset(tiny_data_cfg())
    data = make_subtask(dataset, ["Coat", "Shirt"], 0.2, 0)
    assert data.pool is None and data.transfer is data.train and len(data.train) == 64 and len(data.val) == 16
    # the default config's dump (hence every cache key and config digest) has none of the new keys
    default = yaml.safe_load((REPO / "configs" / "fashion_tops.yaml").read_text())
    assert set(parse_config(default).dump()["data"]) == {"dataset", "root", "val_fraction", "train_per_class",
                                                          "test_per_class", "image_size", "augment", "allow_download"}


def test_a_folder_pool_is_read_in_the_datasets_format(tmp_path):
    from PIL import Image

    (tmp_path / "pool" / "sub").mkdir(parents=True)
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(tmp_path / "pool" / "a.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "pool" / "sub" / "b.jpg")
    (tmp_path / "pool" / "notes.txt").write_text("not an image")
    images = read_folder(tmp_path / "pool", channels=1, size=28)
    assert images.shape == (2, 1, 28, 28) and images.dtype == np.uint8
    assert images[0].min() == images[0].max() == 200 and images[1].max() == 0
    dataset = load_dataset(tiny_data_cfg())
    data = make_subtask(dataset, ["Coat", "Shirt"], 0.2, 0, labels_per_class=8, unlabelled=str(tmp_path / "pool"))
    assert len(data.pool) == 2 and data.pool_kind == str(tmp_path / "pool")


def test_label_loss_ignores_unlabelled_images():
    logits = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, UNLABELLED, 3, UNLABELLED, 1, UNLABELLED])
    keep = labels >= 0
    torch.testing.assert_close(label_loss(logits, labels), torch.nn.functional.cross_entropy(logits[keep], labels[keep]))
    none = label_loss(logits, torch.full((6,), UNLABELLED))
    none.backward()
    assert float(none.detach()) == 0.0 and torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("data, expected", [
    ({"labels_per_class": 41}, "data.labels_per_class is 41, but not every subtask class has that many"),
    ({"labels_per_class": 0}, "labels_per_class 0 leaves no labelled image"),
    ({"labels_per_class": 10, "unlabelled": "{tmp}/missing"}, "is neither rest, none nor an existing folder"),
    ({"labels_per_class": 10, "unlabelled": "{tmp}/empty"}, "holds no images"),
])
def test_impossible_budgets_fail_with_one_paragraph_and_exit_2_caching_nothing(tmp_path, data, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    raw = tiny_config_dict(tmp_path / "builds")
    raw["data"].update({k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in data.items()})
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = run_cli("build", config)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in " ".join(result.stdout.split()), result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "builds").exists() or not any((tmp_path / "builds").rglob("stage.json"))


def test_outlier_exposure_under_a_budget_is_refused_as_a_label_peek(tmp_path):
    raw = tiny_config_dict(tmp_path / "builds", **{"data.labels_per_class": 10, "ood": {"outlier_exposure": True}})
    with pytest.raises(Exception, match="ood.outlier_exposure trains on the images known to lie outside"):
        parse_config(raw)


@pytest.mark.slow
def test_a_budget_build_adapts_on_the_labels_and_distils_on_labels_plus_pool(write_config):
    config = write_config(**{"data.labels_per_class": 12, "data.unlabelled_max_images": 120,
                             "teacher.adapt": {"method": "finetune", "train_from": "features.1", "epochs": 1}})
    result = run_cli("build", config)
    assert result.returncode == 0, result.stdout + result.stderr
    cfg = load_config(config)
    build = config.parent / "builds" / "tiny"
    stages = {p.name.split("-")[0]: json.loads((p / "stage.json").read_text()) for p in build.glob("*-*")}
    teacher = stages["teacher"]["metrics"]
    adapt, distill = stages["adapt"]["metrics"], stages["distill"]["metrics"]
    # the from-scratch teacher and its adaptation saw the 4 x 10 labelled images only, selected on 4 x 2
    assert teacher["train_best_val_acc"] >= 0 and adapt["adapt_train_images"] == 40 and adapt["adapt_val_images"] == 8
    assert adapt["labels_per_class"] == 12 and distill["labels_per_class"] == 12
    assert distill["transfer_images"] == 40 + 120 and distill["val_images"] == 8
    # the head covers the subtask's classes only (no other class has a label)
    adapt_dir = next(build.glob("adapt-*"))
    model, spec = load_teacher(adapt_dir)
    assert spec.class_names == ("T-shirt/top", "Pullover", "Coat", "Shirt")
    # the pool's teacher logits are in the adapt stage's table (one pass of the frozen prefix there)
    data = subtask_data(cfg)
    known = KnownLogits.load(adapt_dir)
    rows = known.rows(data.pool.images)
    assert (rows >= 0).all()
    full = predict_logits(model, spec.input, data.pool.images, torch.device("cpu"))
    torch.testing.assert_close(torch.from_numpy(known.logits[rows]), full, atol=1e-4, rtol=1e-4)
    # the budget is part of every key: the same config without it builds elsewhere
    assert stages["adapt"]["config"]["data"]["labels_per_class"] == 12
    plain = tiny_config_dict(config.parent / "builds")
    from pipeline.runner import Build

    keys = {p.stage.name: p.key for p in Build(parse_config(plain)).plan()}
    assert keys["adapt"] != stages["adapt"]["key"] and keys["teacher"] != stages["teacher"]["key"]


def test_the_model_card_names_the_label_budget():
    raw = tiny_config_dict("builds", **{"data.labels_per_class": 50, "data.unlabelled_max_images": 12000})
    card = render_model_card(CardFacts("b", "0.1.0", parse_config(raw).dump(), ["a", "b"], [], {}, [], "passed"))
    assert ("Label budget: 50 labelled training images per subtask class" in card
            and "the dataset's other training images, without labels (at most 12000)" in card)
    plain = render_model_card(CardFacts("b", "0.1.0", parse_config(tiny_config_dict("builds")).dump(), ["a"], [], {},
                                        [], "passed"))
    assert "Label budget" not in plain
