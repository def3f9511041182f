"""The adapted teacher's logits, computed once by the `adapt` stage and looked up by image content later.

The adapt stage already runs the frozen prefix of the teacher over every training image and trains only the tail,
so the finished teacher's logits for all of those images cost one cheap tail pass. Distillation, outlier exposure
and QAT all need the frozen teacher's logits on (subsets of) the same images: looking them up instead of running
the whole teacher again saves most of their time. The lookup is by a digest of the image bytes, so an image that
differs in any pixel (e.g. a spurious marker painted on it) is simply not found and the teacher runs on it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import View
from .layout import channels_last, channels_last_model

LOGITS_FILE, DIGESTS_FILE = "teacher_logits.npy", "teacher_digests.npy"


def image_digests(images: np.ndarray) -> np.ndarray:
    """One 64-bit content digest per image (its shape and bytes)."""
    images = np.ascontiguousarray(images)
    shape = repr(images.shape[1:]).encode()
    return np.array([int.from_bytes(hashlib.blake2b(shape + image.tobytes(), digest_size=8).digest(), "little")
                     for image in images], dtype=np.uint64)


def save_known_logits(folder: Path, images: np.ndarray, logits: torch.Tensor) -> int:
    """Writes the logits (all head columns) sorted by digest; identical images are kept once. Returns the count."""
    digests, first = np.unique(image_digests(images), return_index=True)
    np.save(Path(folder) / DIGESTS_FILE, digests)
    np.save(Path(folder) / LOGITS_FILE, logits.numpy()[first].astype(np.float32))
    return len(digests)


class KnownLogits:
    def __init__(self, digests: np.ndarray, logits: np.ndarray):
        self.digests, self.logits = digests, logits

    @classmethod
    def load(cls, folder: Path) -> "KnownLogits | None":
        folder = Path(folder)
        if not (folder / DIGESTS_FILE).exists():
            return None     # the teacher was not adapted on a cached prefix (e.g. adapt: none)
        return cls(np.load(folder / DIGESTS_FILE, allow_pickle=False), np.load(folder / LOGITS_FILE, allow_pickle=False))

    def rows(self, images: np.ndarray) -> np.ndarray:
        """Row of each image in the table, -1 where it is not known."""
        digests = image_digests(images)
        pos = np.minimum(np.searchsorted(self.digests, digests), len(self.digests) - 1)
        return np.where(self.digests[pos] == digests, pos, -1)


def teacher_logits(teacher: nn.Module, view: View, images: np.ndarray, device: torch.device,
                   columns: list[int] | None = None, known: KnownLogits | None = None) -> torch.Tensor:
    """The teacher's logits (optionally only some columns) for uint8 images, in order: looked up where known,
    computed (channels_last, batches of 128: fastest on the CPU) for the rest."""
    from .predict import predict_logits

    rows = known.rows(images) if known is not None and len(images) else np.full(len(images), -1)
    missing, found = np.flatnonzero(rows < 0), np.flatnonzero(rows >= 0)
    parts = []
    if len(missing):
        with channels_last_model(teacher.to(device)):
            parts.append((missing, predict_logits(teacher, view, images[missing], device, batch_size=128,
                                                  columns=columns, layout=channels_last)))
    if len(found):
        table = known.logits[rows[found]]
        parts.append((found, torch.from_numpy(np.ascontiguousarray(table[:, columns] if columns is not None else table))))
    if not parts:
        return torch.empty(0)
    out = torch.empty(len(images), parts[0][1].shape[1])
    for where, values in parts:
        out[torch.as_tensor(where)] = values
    return out
