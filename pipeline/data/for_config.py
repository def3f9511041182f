"""The subtask data a config describes (dataset, classes, label budget, pool, markers), loaded once per process."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .sources import load_dataset
from .subtask import SubtaskData, make_subtask


def subtask_data(cfg) -> SubtaskData:
    return _subtask_data(cfg.data, tuple(cfg.subtask.classes), cfg.build.seed, _stamp(cfg.data.labels_file))


def _stamp(path: str | None) -> tuple | None:
    """A labels file's size and modification time: a file rewritten in this process is read again."""
    try:
        st = Path(path).expanduser().stat() if path else None
    except OSError:
        return None
    return None if st is None else (st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4)
def _subtask_data(data_cfg, classes: tuple, seed: int, labels_stamp: tuple | None) -> SubtaskData:
    dataset = load_dataset(data_cfg)
    labelled = None
    if data_cfg.labels_file is not None:
        from .labels_file import file_labels

        labelled = file_labels(data_cfg, dataset, dataset.class_ids(list(classes)))
    data = make_subtask(dataset, list(classes), data_cfg.val_fraction, seed, data_cfg.labels_per_class,
                        data_cfg.unlabelled, data_cfg.unlabelled_max_images, data_cfg.train_per_class is not None,
                        labelled)
    if data_cfg.spurious is not None:
        # Only the subtask splits get markers: the teacher trains/adapts on data.dataset, which stays clean.
        from .spurious import add_markers

        data, _ = add_markers(data, data_cfg.spurious, seed)
    return data
