"""A label budget: labels for N seeded training images per subtask class, everything else an unlabelled pool.

The user's situation this models: a few labelled images of the device's classes and plenty of unlabelled ones
from its domain. Of the N labelled images per class, round(val_fraction x N) (at most N/4, at least one) are held
out for model selection, so no stage ever looks at a label the user does not have. The pool is every other
training image of the dataset (`rest`: the subtask's remaining images and the other classes'), a folder of images,
or nothing; distillation trains on labelled + pool, with labels only where they exist (UNLABELLED elsewhere).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from ..seeds import seed_for
from .base import Dataset, ImageSet

UNLABELLED = -1          # the label of a pool image (cross-entropy ignores it)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def val_per_class(labels_per_class: int, val_fraction: float) -> int:
    """Held-out labelled images per class: round(val_fraction x N), at most N/4, at least 1."""
    return max(1, min(int(round(labels_per_class * val_fraction)), labels_per_class // 4))


def choose_labelled(dataset: Dataset, class_ids: list[int], labels_per_class: int, val_fraction: float,
                    seed: int, capped: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class choice of N training images; returns sorted (train, val) indices into dataset.train."""
    short = [(dataset.class_names[c], int((dataset.train.labels == c).sum())) for c in class_ids
             if (dataset.train.labels == c).sum() < labels_per_class]
    if short:
        listed = ", ".join(f"'{name}' has {count}" for name, count in short)
        raise DataError(
            f"data.labels_per_class is {labels_per_class}, but not every subtask class has that many training "
            f"images: {listed}" + (" (data.train_per_class caps them)" if capped else "") + ".",
            f"Lower data.labels_per_class to at most {min(count for _, count in short)}, or set it to null to keep "
            "every label.")
    rng = np.random.default_rng(seed_for(seed, "data.labels"))
    n_val = val_per_class(labels_per_class, val_fraction)
    train, val = [], []
    for c in class_ids:
        idx = np.flatnonzero(dataset.train.labels == c)
        chosen = idx[rng.permutation(len(idx))[:labels_per_class]]
        val.append(chosen[:n_val])
        train.append(chosen[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def unlabelled_pool(dataset: Dataset, kind: str, labelled: np.ndarray, cap: int | None,
                    seed: int) -> tuple[ImageSet | None, np.ndarray | None]:
    """The pool named by data.unlabelled ('rest', 'none' or a folder), capped to `cap` seeded images, and (rest)
    each pool image's index in the training split (label suggestions name images by it)."""
    if kind == "none":
        return None, None
    if kind == "rest":
        index = np.setdiff1d(np.arange(len(dataset.train)), labelled)
        images = dataset.train.images[index]
    else:
        index, images = None, read_folder(Path(kind).expanduser(), dataset.channels, dataset.size)
    if cap is not None and cap < len(images):
        keep = np.sort(np.random.default_rng(seed_for(seed, "data.pool")).permutation(len(images))[:cap])
        images, index = images[keep], None if index is None else index[keep]
    return ImageSet(np.ascontiguousarray(images), np.full(len(images), UNLABELLED, dtype=np.int64)), index


def read_folder(folder: Path, channels: int, size: int) -> np.ndarray:
    """Every image file under `folder` (recursively, sorted by path), converted to the dataset's channels and
    side: uint8 N x C x H x W."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise DataError(f"data.unlabelled '{folder}' is neither rest, none nor an existing folder.",
                        "Point data.unlabelled at a folder of unlabelled images from the device's domain, or use "
                        "rest (the dataset's other training images) or none.")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"data.unlabelled folder '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)}, "
                        "searched recursively).",
                        "Put the unlabelled images in that folder, or use data.unlabelled: rest or none.")
    mode = "L" if channels == 1 else "RGB"
    images = []
    for file in files:
        try:
            with Image.open(file) as im:
                array = np.asarray(im.convert(mode).resize((size, size), Image.BILINEAR))
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"data.unlabelled: {file} is not a readable image ({exc}).",
                            "Remove or replace that file.") from None
        images.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
    return np.stack(images)


def describe(labels_per_class: int | None, pool: ImageSet | None, kind: str | None, labels_file: str | None = None,
             labelled: int = 0) -> str:
    """One line naming the label budget (model card, report, logs)."""
    shown_pool = f"{len(pool)} images ({kind})" if pool is not None else "none"
    if labels_file is not None:
        return f"{labelled} labelled images from {Path(labels_file).name}; unlabelled pool: {shown_pool}"
    if labels_per_class is None:
        return "every training label" + (f"; unlabelled pool: {shown_pool}" if pool is not None else "")
    return f"{labels_per_class} labelled images per class; unlabelled pool: {shown_pool}"
