"""Out-of-subtask images for free: the dataset's other classes, with the same seeded train/val split as the
subtask. Outlier exposure trains on `train`; evaluation uses `test` only, so nothing used to train or calibrate
is ever scored as an outside input."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..data import ImageSet, load_dataset
from ..data.subtask import full_split
from ..errors import ConfigError


@dataclass(frozen=True)
class OutsideData:
    class_ids: tuple[int, ...]      # dataset ids of the classes outside the subtask
    class_names: tuple[str, ...]
    train: ImageSet                 # labels: dataset class ids
    val: ImageSet
    test: ImageSet


def outside_data(cfg) -> OutsideData:
    return _outside(cfg.data, tuple(cfg.subtask.classes), cfg.build.seed)


@lru_cache(maxsize=4)
def _outside(data_cfg, classes: tuple, seed: int) -> OutsideData:
    dataset = load_dataset(data_cfg)
    inside = dataset.class_ids(list(classes))
    others = [i for i in range(len(dataset.class_names)) if i not in inside]
    if not others:
        raise ConfigError("ood is enabled, but the subtask holds every class of the dataset: there are no "
                          "out-of-subtask images to calibrate against or evaluate with.",
                          "Leave a class out of subtask.classes, or remove the `ood:` section.")
    train, val = full_split(dataset, data_cfg.val_fraction, seed)

    def keep(images: ImageSet) -> ImageSet:
        return images.take(np.flatnonzero(np.isin(images.labels, others)))

    return OutsideData(tuple(others), tuple(dataset.class_names[i] for i in others), keep(train), keep(val),
                       keep(dataset.test))


def first(images: ImageSet, n: int) -> ImageSet:
    """The first n images in dataset order (deterministic; Fashion-MNIST's order mixes the classes)."""
    return images.take(np.arange(min(n, len(images))))
