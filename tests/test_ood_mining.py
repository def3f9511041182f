"""Outliers mined from the unlabelled pool without labels (ood.mined_outliers): the mining, the config checks and
a budget build that trains outlier exposure on them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import parse_config
from pipeline.ood.mining import knn_distance, mine

from .conftest import run_cli, tiny_config_dict


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
    ({"data.labels_per_class": 10, "ood": {"mined_outliers": {}}}, "ood.mined_outliers chooses the images"),
    ({"ood": {"outlier_exposure": True, "mined_outliers": {}}}, "ood.mined_outliers looks for outliers in the "
                                                                "unlabelled pool, but this config has none"),
])
def test_pool_options_without_a_pool_are_refused(tmp_path, overrides, expected):
    with pytest.raises(Exception, match=expected):
        parse_config(tiny_config_dict(tmp_path, **overrides))


def test_mining_left_unset_keeps_the_config_dump_and_keys():
    raw = tiny_config_dict("builds", **{"data.labels_per_class": 10, "ood": {}})
    cfg = parse_config(raw)
    assert "mined_outliers" not in cfg.dump()["ood"] and cfg.ood.exposure_key() is None
    on = parse_config(tiny_config_dict("builds", **{"data.labels_per_class": 10,
                                                    "ood": {"outlier_exposure": True, "mined_outliers": {}}}))
    assert on.ood.exposure_key()["mined_outliers"] == {"neighbours": 5, "quantile": 0.95, "distill": True}


@pytest.mark.slow
def test_a_budget_build_trains_outlier_exposure_on_mined_pool_images(write_config):
    config = write_config(**{"data.labels_per_class": 12, "data.unlabelled_max_images": 120,
                             "ood": {"outlier_exposure": True, "oe_target": "uniform", "mined_outliers": {"distill": False}}})
    result = run_cli("build", config, "--until", "distill")
    assert result.returncode == 0, result.stdout + result.stderr
    out = " ".join(result.stdout.split())
    mined = int(out.split("outlier exposure: ")[1].split()[0])
    assert 0 < mined < 120 and f"the {mined} mined outliers left out of the pool" in out
    stage = json.loads(next((config.parent / "builds" / "tiny").glob("distill-*/stage.json")).read_text())
    assert stage["metrics"]["transfer_images"] == 40 + 120 - mined
    assert "outlier" in stage["metrics"]["history"][-1]
    assert stage["config"]["ood.outlier_exposure"]["mined_outliers"]["distill"] is False     # in the key
