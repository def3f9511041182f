"""Datasets, subtask splits and per-model views."""

from .base import DATASETS, Dataset, ImageSet
from .sources import load_dataset
from .subtask import SubtaskData, make_subtask
from .views import View, augment_batch, batches

__all__ = ["DATASETS", "Dataset", "ImageSet", "load_dataset", "SubtaskData", "make_subtask", "View",
           "augment_batch", "batches"]
