"""The view bank (data.views): K seeded augmented views per image, the teacher's outputs computed once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rich.console import Console

from pipeline.config import parse_config
from pipeline.data import ImageSet, View
from pipeline.data.views import ViewBank
from pipeline.distill.config import DistillConfig
from pipeline.distill.methods import METHODS
from pipeline.distill.train import DistillSettings, Models, distill
from pipeline.models import create_model
from pipeline.progress import ProgressDisplay

from .conftest import tiny_config_dict

QUIET = ProgressDisplay(Console(quiet=True), enabled=False)


def test_bank_is_seeded_and_each_image_cycles_through_its_views():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (10, 1, 12, 12), dtype=np.uint8))
    bank = ViewBank.build(images, 3, seed=0)
    assert bank.images.shape == (30, 1, 12, 12) and bank.images.dtype == torch.uint8
    assert torch.equal(bank.images, ViewBank.build(images, 3, seed=0).images)
    assert not torch.equal(bank.images, ViewBank.build(images, 3, seed=1).images)
    idx = torch.arange(10)
    seen = torch.stack([bank.rows(idx, epoch) for epoch in (1, 2, 3)])
    assert (seen % 10 == idx).all() and all(len(set(seen[:, i].tolist())) == 3 for i in range(10))
    # views differ from each other (crops and flips), and each is a crop of the same image
    assert not torch.equal(bank.images[:10], bank.images[10:20])


def test_views_need_augment():
    raw = tiny_config_dict("b", **{"data.views": 4})
    with pytest.raises(Exception, match="set data.augment: true"):
        parse_config(raw)
    assert parse_config(tiny_config_dict("b", **{"data.views": 4, "data.augment": True})).data.views == 4


class Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


@pytest.mark.parametrize("use_bank", [True, False])
def test_with_a_bank_the_teacher_runs_once_per_view_not_every_step(use_bank):
    torch.manual_seed(0)
    teacher = Counting(create_model("cnn_tiny", 4, 1)).eval()
    student = create_model("cnn_tiny", 4, 1)
    view = View(28, 1, (0.5,), (0.5,))
    models = Models(teacher, student, view, view, [0, 1, 2, 3])
    rng = np.random.default_rng(0)
    train = ImageSet(rng.integers(0, 256, (96, 1, 28, 28), dtype=np.uint8), rng.integers(0, 4, 96))
    cfg = DistillConfig(method="kd", epochs=3, batch_size=32)
    bank = ViewBank.build(torch.from_numpy(train.images), 2, seed=0) if use_bank else None
    settings = DistillSettings(cfg, 0, torch.device("cpu"), QUIET, augment=True, bank=bank)
    result = distill(models, METHODS.get("kd")(cfg), train, train, settings)
    steps = 3 * 96 // 32
    # bank: one cached pass over the 2 x 96 views (batches of 256); without: the teacher runs at every step
    assert teacher.calls == (1 if use_bank else steps)
    assert len(result["history"]) == 3


@pytest.mark.slow
def test_a_build_with_a_view_bank_caches_the_teachers_outputs(write_config):
    import json

    from .conftest import run_cli

    config = write_config(**{"data.augment": True, "data.views": 2, "distill.method": "subdistill"})
    result = run_cli("build", config, "--until", "distill")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "view bank: 2 augmented views of 128 images (256 teacher inputs)" in result.stdout
    metrics = json.loads(next((config.parent / "builds" / "tiny").glob("distill-*/stage.json")).read_text())["metrics"]
    assert metrics["view_bank_images"] == 256 and 0 <= metrics["student_test_acc"] <= 1
