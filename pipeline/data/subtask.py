"""The subtask: a few classes of the dataset, a seeded 80/20 train/val split, the official test split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..seeds import seed_for
from .base import Dataset, ImageSet


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split of indices. Defined over ALL classes so that the teacher's adaptation and the
    student's distillation hold out the same validation images."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


@dataclass(frozen=True)
class SubtaskData:
    dataset: Dataset
    class_ids: tuple[int, ...]      # ids in the dataset (= teacher head ids after adaptation)
    train: ImageSet                 # labels remapped to 0..k-1
    val: ImageSet
    test: ImageSet
    labels_per_class: int | None = None   # the label budget (None: every label)
    pool: ImageSet | None = None          # unlabelled transfer images (labels UNLABELLED), or None
    pool_kind: str | None = None          # rest, or the folder they came from
    pool_index: np.ndarray | None = None  # rest: each pool image's index in dataset.train
    labels_file: str | None = None        # the labels came from this file (data.labels_file)

    @property
    def few_labels(self) -> bool:
        """Only some images have labels (a budget or a labels file): the teacher's head learns the subtask alone."""
        return self.labels_per_class is not None or self.labels_file is not None

    @property
    def transfer(self) -> ImageSet:
        """What distillation trains on: the labelled training images, then the pool (labels -1)."""
        if self.pool is None or not len(self.pool):
            return self.train
        return ImageSet(np.concatenate([self.train.images, self.pool.images]),
                        np.concatenate([self.train.labels, self.pool.labels]))

    @property
    def budget(self) -> str:
        from .budget import describe

        return describe(self.labels_per_class, self.pool, self.pool_kind, self.labels_file,
                        len(self.train) + len(self.val))

    @property
    def class_names(self) -> list[str]:
        return [self.dataset.class_names[i] for i in self.class_ids]

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)


def _restrict(images: ImageSet, class_ids: list[int]) -> ImageSet:
    keep = np.flatnonzero(np.isin(images.labels, class_ids))
    remap = np.full(max(int(images.labels.max()) + 1, max(class_ids) + 1), -1, dtype=np.int64)
    remap[class_ids] = np.arange(len(class_ids))
    return ImageSet(images.images[keep], remap[images.labels[keep]])


def full_split(dataset: Dataset, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """The seeded 80/20 split of every training image (`seed`: build.seed; stream data.split)."""
    train_idx, val_idx = stratified_split(dataset.train.labels, val_fraction, seed_for(seed, "data.split"))
    return dataset.train.take(train_idx), dataset.train.take(val_idx)


def make_subtask(dataset: Dataset, classes: list, val_fraction: float, seed: int, labels_per_class: int | None = None,
                 unlabelled: str | None = None, pool_cap: int | None = None, capped: bool = False,
                 file_labels=None) -> SubtaskData:
    """Without a label budget: the subtask's images of the seeded 80/20 split (every label kept) and, only if
    `unlabelled` names one, a pool. With `labels_per_class` N: N labelled images per class (train + a small val,
    pipeline.data.budget) and the pool (`unlabelled`, default rest). With `file_labels`
    (pipeline.data.labels_file.FileLabels): exactly the file's images, with the file's classes, and the pool."""
    from .budget import choose_labelled, unlabelled_pool

    ids = dataset.class_ids(classes)
    test = _restrict(dataset.test, ids)
    kind = unlabelled or ("rest" if labels_per_class or file_labels is not None else "none")
    if file_labels is not None:
        (train_idx, train_labels), (val_idx, val_labels) = file_labels.split(len(ids), val_fraction, seed)
        pool, pool_index = unlabelled_pool(dataset, kind, file_labels.index, pool_cap, seed)
        return SubtaskData(dataset, tuple(ids), ImageSet(dataset.train.images[train_idx], train_labels),
                           ImageSet(dataset.train.images[val_idx], val_labels), test, None, pool,
                           None if pool is None else kind, pool_index, file_labels.path)
    if labels_per_class is None:
        train_idx, val_idx = stratified_split(dataset.train.labels, val_fraction, seed_for(seed, "data.split"))
        # rest without a budget: the other classes' images (the subtask's own are all labelled already)
        in_subtask = np.flatnonzero(np.isin(dataset.train.labels, ids))
    else:
        train_idx, val_idx = choose_labelled(dataset, ids, labels_per_class, val_fraction, seed, capped)
        in_subtask = np.concatenate([train_idx, val_idx])
    pool, pool_index = unlabelled_pool(dataset, kind, in_subtask, pool_cap, seed)
    return SubtaskData(dataset, tuple(ids), _restrict(dataset.train.take(train_idx), ids),
                       _restrict(dataset.train.take(val_idx), ids), test, labels_per_class, pool,
                       None if pool is None else kind, pool_index)
