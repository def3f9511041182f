"""The subtask: a few classes of the dataset, a seeded 80/20 train/val split, the official test split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    train_idx, val_idx = stratified_split(dataset.train.labels, val_fraction, seed)
    return dataset.train.take(train_idx), dataset.train.take(val_idx)


def make_subtask(dataset: Dataset, classes: list, val_fraction: float, seed: int) -> SubtaskData:
    ids = dataset.class_ids(classes)
    train, val = full_split(dataset, val_fraction, seed)
    return SubtaskData(dataset, tuple(ids), _restrict(train, ids), _restrict(val, ids), _restrict(dataset.test, ids))
