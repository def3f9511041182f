"""Datasets: the IDX reader, splits, per-model views and augmentation."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from pipeline.data import View, augment_batch
from pipeline.data.sources import read_idx
from pipeline.data.subtask import stratified_split
from pipeline.errors import DataError


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_round_trips_a_file_the_test_writes(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    write_idx(path, images, compress)
    np.testing.assert_array_equal(read_idx(path), images)


def test_truncated_idx_is_a_data_error(tmp_path):
    path = tmp_path / "bad.idx"
    write_idx(path, np.zeros((4, 3, 3), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="not a readable IDX file"):
        read_idx(path)


def test_split_is_seeded_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), 50)
    train, val = stratified_split(labels, 0.2, seed=3)
    again_train, _ = stratified_split(labels, 0.2, seed=3)
    other_train, _ = stratified_split(labels, 0.2, seed=4)
    assert not set(train) & set(val) and len(train) + len(val) == 200
    assert np.bincount(labels[val]).tolist() == [10, 10, 10, 10]
    np.testing.assert_array_equal(train, again_train)
    assert not np.array_equal(train, other_train)


def test_views_give_each_model_its_own_input():
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    teacher = View(64, 3, (0.5,) * 3, (0.5,) * 3)(images)
    student = View(28, 1, (0.5,), (0.5,))(images)
    assert teacher.shape == (2, 3, 64, 64) and student.shape == (2, 1, 28, 28)
    expected = (images.float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(student, expected)
    assert teacher.min() >= -1.0 - 1e-5 and teacher.max() <= 1.0 + 1e-5


def test_augmentation_crops_and_flips_deterministically():
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    a = augment_batch(images, torch.Generator().manual_seed(0))
    b = augment_batch(images, torch.Generator().manual_seed(0))
    assert a.shape == images.shape and torch.equal(a, b)
    assert not all(torch.equal(augment_batch(images, torch.Generator().manual_seed(s)), images) for s in range(5))
