"""In-memory image sets: uint8 arrays N x C x H x W, int64 labels, class names."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..registry import Registry, did_you_mean


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # uint8, N x C x H x W
    labels: np.ndarray  # int64, N

    def __post_init__(self):
        assert self.images.ndim == 4 and self.images.dtype == np.uint8, self.images.shape
        assert len(self.images) == len(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])


@dataclass(frozen=True)
class Dataset:
    name: str
    class_names: tuple[str, ...]
    train: ImageSet
    test: ImageSet

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def size(self) -> int:
        return self.train.images.shape[2]

    def class_ids(self, classes: list) -> list[int]:
        """Map names (or integer ids) to ids; every unknown name is reported at once."""
        ids, unknown = [], []
        for c in classes:
            if isinstance(c, int) and 0 <= c < len(self.class_names):
                ids.append(c)
            elif isinstance(c, str) and c in self.class_names:
                ids.append(self.class_names.index(c))
            else:
                hint = did_you_mean(str(c), list(self.class_names)).strip()
                unknown.append(f"'{c}'" + (f" ({hint[0].lower()}{hint[1:]})" if hint else ""))
        if unknown:
            raise ConfigError(
                f"subtask.classes: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a class of "
                f"dataset '{self.name}'.",
                f"Use names or ids (0..{len(self.class_names) - 1}) from: {', '.join(self.class_names)}.",
            )
        return ids


DATASETS: Registry = Registry("dataset")


def per_class_cap(labels: np.ndarray, cap: int | None) -> np.ndarray:
    """Indices of the first `cap` images of each class, in dataset order (deterministic)."""
    if cap is None:
        return np.arange(len(labels))
    keep = np.concatenate([np.flatnonzero(labels == c)[:cap] for c in np.unique(labels)])
    return np.sort(keep)
