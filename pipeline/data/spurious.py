"""A planted shortcut for stress tests (`data.spurious`): a small digit glyph pasted in a corner of a fraction of
the images. Training and validation images get the glyph of their class index, so the marker predicts the label;
test images get a random class index, so it predicts nothing. A model that learned the marker instead of the
object loses accuracy on the test split; one that kept to the object does not.

The glyphs come from a 3x5 dot font written here (no font files), drawn light on a dark box so they show on any
background. Which images are marked and the random test digits are seeded: the same config gives the same images.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..seeds import seed_for
from .base import ImageSet

# 3 columns x 5 rows per digit, '#' = dot.
FONT = {
    0: ("###", "#.#", "#.#", "#.#", "###"),
    1: (".#.", "##.", ".#.", ".#.", "###"),
    2: ("###", "..#", "###", "#..", "###"),
    3: ("###", "..#", ".##", "..#", "###"),
    4: ("#.#", "#.#", "###", "..#", "..#"),
    5: ("###", "#..", "###", "..#", "###"),
    6: ("###", "#..", "###", "#.#", "###"),
    7: ("###", "..#", ".#.", ".#.", ".#."),
    8: ("###", "#.#", "###", "#.#", "###"),
    9: ("###", "#.#", "###", "..#", "###"),
}
INK, PAPER = 255, 0


def glyph(number: int, scale: int = 1) -> np.ndarray:
    """Boolean mask of `number` in decimal (digits side by side, one dot apart), each dot scale x scale pixels."""
    digits = [np.array([[c == "#" for c in row] for row in FONT[int(d)]]) for d in str(int(number))]
    gap = np.zeros((5, 1), dtype=bool)
    mask = np.concatenate([part for d in digits for part in (d, gap)][:-1], axis=1)
    return np.kron(mask, np.ones((scale, scale), dtype=bool))


def default_scale(image_side: int) -> int:
    return max(1, round(image_side / 28))


def marker_box(number: int, scale: int) -> np.ndarray:
    """The pasted patch: the glyph with a one-dot dark margin, as uint8 (INK on PAPER)."""
    mask = np.pad(glyph(number, scale), scale, constant_values=False)
    return np.where(mask, INK, PAPER).astype(np.uint8)


def paste(images: np.ndarray, index: np.ndarray, numbers: np.ndarray, corner: str, scale: int) -> np.ndarray:
    """A copy of `images` (N x C x H x W uint8) with marker `numbers[i]` pasted on image `index[i]`."""
    out = images.copy()
    h, w = images.shape[2:]
    for i, number in zip(index, numbers):
        box = marker_box(int(number), scale)
        bh, bw = min(box.shape[0], h), min(box.shape[1], w)
        top = 0 if corner.startswith("top") else h - bh
        left = 0 if corner.endswith("left") else w - bw
        out[i, :, top:top + bh, left:left + bw] = box[None, :bh, :bw]
    return out


@dataclass(frozen=True)
class Markers:
    """Which images of a split carry a marker, and which number each shows."""

    index: np.ndarray     # image indices, sorted
    numbers: np.ndarray   # the number pasted on each of them


def choose(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly round(fraction * n) distinct indices, sorted."""
    return np.sort(rng.permutation(n)[: int(round(fraction * n))])


def mark(images: ImageSet, fraction: float, correlated: bool, num_classes: int, corner: str, scale: int,
         rng: np.random.Generator) -> tuple[ImageSet, Markers]:
    index = choose(len(images), fraction, rng)
    numbers = images.labels[index] if correlated else rng.integers(0, num_classes, size=len(index))
    markers = Markers(index, np.asarray(numbers, dtype=np.int64))
    return ImageSet(paste(images.images, index, markers.numbers, corner, scale), images.labels), markers


def add_markers(data, cfg, seed: int):
    """SubtaskData with markers: train and val (both drawn from the training images) show the class index,
    test a random class index. Returns (new SubtaskData, {split: Markers})."""
    scale = cfg.scale or default_scale(data.train.images.shape[-1])
    rng = np.random.default_rng(seed_for(seed, f"data.spurious.{cfg.seed}"))
    splits, markers = {}, {}
    for split, correlated in (("train", True), ("val", True), ("test", False)):
        splits[split], markers[split] = mark(getattr(data, split), cfg.fraction, correlated, data.num_classes,
                                             cfg.corner, scale, rng)
    return replace(data, **splits), markers
