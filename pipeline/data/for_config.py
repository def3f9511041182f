"""The subtask data a config describes (dataset, classes, label budget, pool, markers), loaded once per process."""

from __future__ import annotations

from functools import lru_cache

from .sources import load_dataset
from .subtask import SubtaskData, make_subtask


def subtask_data(cfg) -> SubtaskData:
    return _subtask_data(cfg.data, tuple(cfg.subtask.classes), cfg.build.seed)


@lru_cache(maxsize=4)
def _subtask_data(data_cfg, classes: tuple, seed: int) -> SubtaskData:
    data = make_subtask(load_dataset(data_cfg), list(classes), data_cfg.val_fraction, seed, data_cfg.labels_per_class,
                        data_cfg.unlabelled, data_cfg.unlabelled_max_images, data_cfg.train_per_class is not None)
    if data_cfg.spurious is not None:
        # Only the subtask splits get markers: the teacher trains/adapts on data.dataset, which stays clean.
        from .spurious import add_markers

        data, _ = add_markers(data, data_cfg.spurious, seed)
    return data
