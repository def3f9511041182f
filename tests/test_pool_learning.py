"""Learning from the unlabelled pool (distill.consistency, distill.pseudo_labels) and outliers mined from it
without labels (ood.mined_outliers): the views, the losses, the mining and the config checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import parse_config
from pipeline.data.budget import UNLABELLED
from pipeline.distill.augment import OPS, equalize, strong_view, weak_view
from pipeline.distill.pool import PoolLosses
from pipeline.ood.mining import knn_distance, mine

from .conftest import run_cli, tiny_config_dict


def images(n=32, channels=1, side=28, seed=0) -> torch.Tensor:
    """Bright blobs on black, like Fashion-MNIST (a uniform noise image would hide what the ops do)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, channels, side, side)
    x[:, :, side // 4:3 * side // 4, side // 3:2 * side // 3] = torch.rand(n, channels, 1, 1, generator=g) * 200 + 55
    return (x + torch.rand(x.shape, generator=g) * 30).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("channels, side", [(1, 28), (3, 32)])
def test_views_change_images_but_keep_shape_dtype_range_and_are_seeded(channels, side):
    x = images(channels=channels, side=side)
    for view in (weak_view, strong_view):
        out = view(x, torch.Generator().manual_seed(1))
        assert out.shape == x.shape and out.dtype == torch.uint8
        assert torch.equal(out, view(x, torch.Generator().manual_seed(1)))         # same seed, same views
        assert not torch.equal(out, view(x, torch.Generator().manual_seed(2)))     # another seed, others
        changed = (out != x).flatten(1).any(1).float().mean()
        assert changed > 0.4, f"{view.__name__} left {1 - changed:.0%} of the images as they were"
    # the weak view moves whole pixels: every value is one of the image's or the zero fill
    weak = weak_view(x, torch.Generator().manual_seed(3))
    for a, b in zip(x, weak):
        assert set(b.unique().tolist()) <= set(a.unique().tolist()) | {0}
    # the strong view changes more than the weak one (photometric ops and cutout on top of the geometry)
    strong = strong_view(x, torch.Generator().manual_seed(3))
    assert (strong.float() - x.float()).abs().mean() > (weak.float() - x.float()).abs().mean()
    assert len(OPS) >= 12


def test_equalize_spreads_a_narrow_histogram_over_the_whole_range():
    x = torch.randint(100, 120, (4, 3, 16, 16)).float()
    out = equalize(x)
    assert out.amin() == 0 and out.amax() == 255
    # order-preserving per image and channel
    a, b = x[0, 0].flatten(), out[0, 0].flatten()
    assert ((a[:, None] <= a[None]) <= (b[:, None] <= b[None])).all()


class Uniform(torch.nn.Module):
    """A 'student' whose every prediction is uniform over k classes, with one parameter for the graph."""

    def __init__(self, k=4):
        super().__init__()
        self.k, self.w = k, torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.zeros(len(x), self.k) + self.w


def option(threshold, weight=1.0):
    return type("Option", (), {"threshold": threshold, "weight": weight})()


def view(x):
    return x.float() / 255


def test_pool_losses_are_zero_when_nothing_is_confident_and_skip_labelled_images():
    x = images(8)
    labels = torch.tensor([0, 1, UNLABELLED, UNLABELLED, 2, UNLABELLED, 3, UNLABELLED])
    base = {"total": torch.tensor(1.5)}
    unsure_teacher = torch.zeros(8, 4)
    losses = PoolLosses(option(0.95), option(0.9), seed=0)(base, Uniform(), view, x, labels, unsure_teacher)
    assert losses["consistency"] == 0 and losses["pseudo"] == 0 and losses["total"] == 1.5
    assert losses["consistency_confident"] == 0 and losses["pseudo_confident"] == 0
    # a labelled-only batch: nothing to add
    assert PoolLosses(option(0.5), None, 0)(base, Uniform(), view, x, torch.arange(8) % 4, unsure_teacher) is base


def test_pseudo_labels_are_the_confident_teacher_classes_on_the_strong_view():
    x = images(6)
    labels = torch.full((6,), UNLABELLED)
    teacher = torch.zeros(6, 4)
    teacher[:3, 2] = 10.0                                       # confident on the first three images only
    student = Uniform()
    losses = PoolLosses(None, option(0.9, weight=2.0), seed=0)({"total": torch.tensor(0.0)}, student, view, x,
                                                             labels, teacher)
    # three of six confident, each costing log(4) under a uniform student: the mean over all six
    assert losses["pseudo_confident"] == 0.5
    assert torch.isclose(losses["pseudo"], torch.tensor(np.log(4) / 2, dtype=torch.float32))
    assert torch.isclose(losses["total"], 2 * losses["pseudo"])
    losses["total"].backward()                                   # it trains the student
    assert student.w.grad is not None


def test_consistency_targets_are_the_students_own_confident_weak_predictions():
    class Bright(torch.nn.Module):           # class 1 the brighter the image; unsure on black ones
        def forward(self, x):
            return F.pad(x.flatten(1).mean(1, keepdim=True) * 40, (1, 2))      # logits (0, 40 * mean, 0, 0)

    x = torch.cat([images(4), torch.zeros(4, 1, 28, 28, dtype=torch.uint8)])
    losses = PoolLosses(option(0.9), None, seed=0)({"total": torch.tensor(0.0)}, Bright(), view, x,
                                                   torch.full((8,), UNLABELLED), torch.zeros(8, 4))
    assert losses["consistency_confident"] == 0.5
    # the same views again (the generator's order: strong, then weak): class 1 on the bright half only
    g = torch.Generator().manual_seed(0)
    strong = Bright()(view(strong_view(x, g)))
    target_on = torch.tensor([True] * 4 + [False] * 4)
    expected = (F.cross_entropy(strong, torch.ones(8, dtype=torch.long), reduction="none") * target_on).mean()
    assert expected > 0 and torch.isclose(losses["consistency"], expected)


def test_mining_picks_the_planted_outliers():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 32, generator=g), dim=1)

    def cluster(n, centre_ids, spread=0.05):
        return F.normalize(centres[centre_ids] + spread * torch.randn(n, 32, generator=g), dim=1)

    labelled = cluster(40, torch.arange(40) % 4)
    held_out = cluster(12, torch.arange(12) % 4)
    inside = cluster(200, torch.arange(200) % 4)
    outside = F.normalize(torch.randn(50, 32, generator=g), dim=1)            # planted: random directions
    pool = torch.cat([inside, outside])
    picked, cut, distance = mine(labelled, held_out, pool, k=3, quantile=1.0)
    planted = set(range(200, 250))
    # every planted outlier, and few of the inside images (those beyond the held-out images' farthest)
    assert planted <= set(picked.tolist()) and len(set(picked.tolist()) - planted) <= 30
    assert distance[200:].min() > np.median(distance[:200])
    # the k-th neighbour of a reference row among the reference rows, itself left out
    self_distance = knn_distance(labelled, labelled, 1, exclude_self=True)
    assert (self_distance > 1e-4).all() and torch.allclose(knn_distance(labelled, labelled, 1), torch.zeros(40),
                                                            atol=1e-5)


@pytest.mark.parametrize("overrides, expected", [
    ({"distill.consistency": {}}, "distill.consistency needs an unlabelled pool, but this config has none"),
    ({"data.labels_per_class": 10, "distill.method": "student_only", "distill.pseudo_labels": {}},
     "distill.method student_only trains on the labelled images alone"),
    ({"data.labels_per_class": 10, "ood": {"mined_outliers": {}}}, "ood.mined_outliers chooses the images"),
    ({"ood": {"outlier_exposure": True, "mined_outliers": {}}}, "ood.mined_outliers looks for outliers in the "
                                                                "unlabelled pool, but this config has none"),
])
def test_pool_options_without_a_pool_are_refused(tmp_path, overrides, expected):
    with pytest.raises(Exception, match=expected):
        parse_config(tiny_config_dict(tmp_path, **overrides))


def test_new_options_left_unset_keep_the_config_dump():
    raw = tiny_config_dict("builds", **{"data.labels_per_class": 10, "ood": {}})
    dump = parse_config(raw).dump()
    assert "consistency" not in dump["distill"] and "pseudo_labels" not in dump["distill"]
    assert "mined_outliers" not in dump["ood"]


@pytest.mark.slow
def test_a_budget_build_learns_from_the_pool_and_mines_outliers(write_config):
    config = write_config(**{"data.labels_per_class": 12, "data.unlabelled_max_images": 120,
                             "distill.consistency": {"threshold": 0.3}, "distill.pseudo_labels": {"threshold": 0.3},
                             "ood": {"outlier_exposure": True, "oe_target": "uniform", "mined_outliers": {"distill": False}}})
    result = run_cli("build", config, "--until", "distill")
    assert result.returncode == 0, result.stdout + result.stderr
    out = " ".join(result.stdout.split())
    mined = int(out.split("outlier exposure: ")[1].split()[0])
    assert 0 < mined < 120 and f"the {mined} mined outliers left out of the pool" in out
    stage = json.loads(next((config.parent / "builds" / "tiny").glob("distill-*/stage.json")).read_text())
    assert stage["metrics"]["transfer_images"] == 40 + 120 - mined
    last = stage["metrics"]["history"][-1]
    assert {"consistency", "pseudo", "outlier"} <= set(last)
    assert stage["config"]["distill"]["consistency"]["threshold"] == 0.3
