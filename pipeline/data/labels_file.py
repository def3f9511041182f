"""Labels brought back from a file (data.labels_file): a CSV whose rows name a training image and its class.

The labelled set is exactly the file's images, a seeded part of each class held out for model selection (the
label budget's rule, pipeline.data.budget.val_per_class); every other training image is the unlabelled pool.
Format: a header row with the columns `image` and `label` (others are ignored, so the CSV that `edgesmith
suggest-labels` writes can be filled in and used as it is); `image` is the training image's id (its index in the
training split, or its path under data.root for an image_folder dataset), `label` a subtask class name. A row
with an empty label is an image not labelled (left in the pool: e.g. one of none of the subtask's classes); the
same image twice with the same class counts once.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..registry import did_you_mean
from ..seeds import seed_for
from .base import Dataset
from .budget import val_per_class

MIN_PER_CLASS = 2          # one image to train the head on, one to select the epoch with
SHOWN_PROBLEMS = 5


@dataclass(frozen=True)
class FileLabels:
    """The labelled images a labels file names: training indices (sorted) and their subtask labels (0..k-1)."""

    path: str
    index: np.ndarray
    labels: np.ndarray

    def split(self, num_classes: int, val_fraction: float, seed: int) -> tuple[tuple, tuple]:
        """((train index, train labels), (val index, val labels)): per class, a seeded val_per_class(n) held out."""
        rng = np.random.default_rng(seed_for(seed, "data.labels_file"))
        train, val = [], []
        for c in range(num_classes):
            members = self.index[self.labels == c]
            chosen = members[rng.permutation(len(members))]
            n_val = val_per_class(len(members), val_fraction)
            val += [(int(i), c) for i in chosen[:n_val]]
            train += [(int(i), c) for i in chosen[n_val:]]
        return _sorted_pairs(train), _sorted_pairs(val)


def _sorted_pairs(pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    pairs = sorted(pairs)
    return (np.array([i for i, _ in pairs], dtype=np.int64), np.array([c for _, c in pairs], dtype=np.int64))


def read_labels_file(path: str, ids: list[str], class_names: list[str]) -> FileLabels:
    """Parse and check the whole file; every problem found is reported at once (DataError, nothing built).
    `ids`: the training images' ids in order (pipeline.data.sources.training_ids); `class_names`: the subtask's."""
    file = Path(path).expanduser()
    rows = _rows(file)
    where = {image_id: i for i, image_id in enumerate(ids)}
    chosen: dict[int, tuple[int, int]] = {}                # training index -> (class, line)
    problems = []
    for line, image, label in rows:
        if not label:
            continue
        if label not in class_names:
            problems.append(f"line {line}: '{label}' is not a subtask class.{did_you_mean(label, class_names)}")
            continue
        index = where.get(_normal_id(image))
        if index is None:
            problems.append(f"line {line}: image '{image}' is not a training image of the dataset")
            continue
        c = class_names.index(label)
        if index in chosen and chosen[index][0] != c:
            first_class, first_line = chosen[index]
            problems.append(f"line {line}: image '{image}' is labelled '{label}', but line {first_line} labels it "
                            f"'{class_names[first_class]}'")
            continue
        chosen.setdefault(index, (c, line))
    if problems:
        raise _error(file, problems, ids, class_names)
    counts = np.bincount([c for c, _ in chosen.values()], minlength=len(class_names))
    few = [f"'{name}' has {int(n)}" for name, n in zip(class_names, counts) if n < MIN_PER_CLASS]
    if few:
        raise DataError(
            f"data.labels_file {file}: every subtask class needs at least {MIN_PER_CLASS} labelled images (one to adapt "
            f"the teacher on, one to select with), but {', '.join(few)}.",
            "Label more images of those classes (edgesmith suggest-labels lists candidates), or drop the classes "
            "from subtask.classes.")
    index = np.array(sorted(chosen), dtype=np.int64)
    return FileLabels(str(path), index, np.array([chosen[i][0] for i in index], dtype=np.int64))


def _normal_id(image: str) -> str:
    """'12', ' 12 ' and '012' name the same index; paths are compared as POSIX paths without a leading ./"""
    text = image.strip()
    if text.isdigit():
        return str(int(text))
    return Path(text).as_posix().removeprefix("./")


def _rows(file: Path) -> list[tuple[int, str, str]]:
    """(line number, image, label) of every data row; DataError for a missing, empty or malformed file."""
    fix = ("Write a CSV with a header row `image,label` and one row per labelled image, e.g. `17,Coat` "
           "(docs/label_efficiency.md#bring-labels-back).")
    if not file.is_file():
        raise DataError(f"data.labels_file {file} does not exist.", "Point data.labels_file at your labels CSV "
                        "(a path relative to the folder edgesmith runs in, or absolute).")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"data.labels_file {file} cannot be read as UTF-8 text ({exc}).", fix) from None
    if not text.strip():
        raise DataError(f"data.labels_file {file} is empty.", fix)
    try:
        table = list(csv.reader(text.splitlines()))
    except csv.Error as exc:
        raise DataError(f"data.labels_file {file} is not a valid CSV ({exc}).", fix) from None
    header = [h.strip().lower() for h in table[0]]
    if "image" not in header or "label" not in header:
        raise DataError(f"data.labels_file {file}, line 1: the header {table[0]} lacks the column "
                        f"{'image' if 'image' not in header else 'label'}.", fix)
    col_image, col_label = header.index("image"), header.index("label")
    rows, short = [], []
    for line, row in enumerate(table[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(col_image, col_label):
            short.append(f"line {line} has {len(row)} field{'s' * (len(row) != 1)}, the header {len(header)}")
            continue
        rows.append((line, row[col_image].strip(), row[col_label].strip()))
    if short:
        raise DataError(f"data.labels_file {file} is malformed: {_listed(short)}.", fix)
    if not any(label for _, _, label in rows):
        raise DataError(f"data.labels_file {file} labels no image (no row has a label).", fix)
    return rows


def _listed(problems: list[str]) -> str:
    more = len(problems) - SHOWN_PROBLEMS
    return "; ".join(problems[:SHOWN_PROBLEMS]) + (f" (and {more} more)" if more > 0 else "")


def _error(file: Path, problems: list[str], ids: list[str], class_names: list[str]) -> DataError:
    example = ids[0] if ids else "0"
    return DataError(
        f"data.labels_file {file} has {len(problems)} problem{'s' * (len(problems) > 1)}: {_listed(problems)}.",
        f"Fix those rows: `image` is a training image's id (e.g. {example}; ids run over the training split as "
        f"the config loads it), `label` one of {', '.join(class_names)} (or empty for an image not labelled).")


def file_labels(data_cfg, dataset: Dataset, class_ids: list[int]) -> FileLabels:
    """The labels file a data config names, read against the dataset's training images and the subtask."""
    from .sources import training_ids

    return read_labels_file(data_cfg.labels_file, training_ids(data_cfg, dataset),
                            [dataset.class_names[i] for i in class_ids])
