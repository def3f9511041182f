"""Dataset sources: fashion_mnist (gzipped IDX), image_folder (class-per-folder images), cifar100 (torchvision)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import DATASETS, Dataset, ImageSet, per_class_cap

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_DIRS = ("/usr/share/datasets/fashion-mnist", "~/.cache/edgesmith/fashion-mnist")
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x0000 <dtype> <ndim>, big-endian dims, then data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code not in IDX_DTYPES:
            raise ValueError("bad magic number")
        dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        array = np.frombuffer(data, dtype=IDX_DTYPES[dtype_code], offset=4 + 4 * ndim)
        if array.size != int(np.prod(dims)):
            raise ValueError(f"header says {dims} but the file holds {array.size} values")
        return array.reshape(dims)
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise DataError(f"{path} is not a readable IDX file ({exc}).",
                        "Reinstall the dataset (make data) or point data.root at intact files.") from None


def fashion_root(root: str | None) -> Path:
    candidates = [root] if root else [os.environ.get("FASHION_MNIST_DIR"), *FASHION_DIRS]
    for candidate in filter(None, candidates):
        path = Path(candidate).expanduser()
        if all((path / f).is_file() for pair in FASHION_FILES.values() for f in pair):
            return path
    where = root or ", ".join(["$FASHION_MNIST_DIR", *FASHION_DIRS])
    raise DataError(
        f"Fashion-MNIST files not found (looked in {where}).",
        "Run `make data` (installs the Debian package dataset-fashion-mnist, or downloads and checks the official "
        "files), or set data.root / FASHION_MNIST_DIR to a folder holding the four .gz IDX files.",
    )


@DATASETS.register("fashion_mnist")
def fashion_mnist(cfg) -> Dataset:
    root = fashion_root(cfg.root)
    splits = {}
    for split, (images_file, labels_file) in FASHION_FILES.items():
        images = read_idx(root / images_file)[:, None]
        labels = read_idx(root / labels_file).astype(np.int64)
        cap = cfg.train_per_class if split == "train" else cfg.test_per_class
        keep = per_class_cap(labels, cap)
        splits[split] = ImageSet(np.ascontiguousarray(images[keep]), labels[keep])
    return Dataset("fashion_mnist", FASHION_CLASSES, splits["train"], splits["test"])


@DATASETS.register("image_folder")
def image_folder(cfg) -> Dataset:
    """root/train/<class>/*.png|jpg and root/test/<class>/*; images resized to data.image_size (RGB)."""
    from PIL import Image

    if not cfg.root or not Path(cfg.root).expanduser().is_dir():
        raise DataError(f"data.root '{cfg.root}' is not a folder.",
                        "For image_folder set data.root to a folder with train/<class>/ and test/<class>/ images.")
    root, size = Path(cfg.root).expanduser(), cfg.image_size or 64
    class_names = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir())) \
        if (root / "train").is_dir() else ()
    if not class_names:
        raise DataError(f"{root}/train holds no class folders.", "Lay the images out as train/<class>/<image>.")

    def load(split: str, cap: int | None) -> ImageSet:
        images, labels = [], []
        for label, files in enumerate(folder_files(root, split, class_names, cap)):
            for file in files:
                with Image.open(file) as im:
                    images.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)).transpose(2, 0, 1))
                labels.append(label)
        if not images:
            raise DataError(f"{root / split} holds no images.", "Add .png or .jpg files under each class folder.")
        return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64))

    return Dataset("image_folder", class_names, load("train", cfg.train_per_class), load("test", cfg.test_per_class))


def folder_files(root: Path, split: str, class_names: tuple[str, ...], cap: int | None) -> list[list[Path]]:
    """The image files of an image_folder split, per class, in the order the dataset holds them."""
    return [sorted(p for p in (root / split / name).glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:cap]
            for name in class_names]


def training_ids(cfg, dataset: Dataset) -> list[str]:
    """How a user names each training image (labels files, label suggestions): its path under data.root for an
    image_folder dataset, else its index in the training split as the config loads it (after train_per_class)."""
    if cfg.dataset != "image_folder":
        return [str(i) for i in range(len(dataset.train))]
    root = Path(cfg.root).expanduser()
    return [file.relative_to(root).as_posix() for files in folder_files(root, "train", dataset.class_names,
                                                                         cfg.train_per_class) for file in files]


@DATASETS.register("cifar100")
def cifar100(cfg) -> Dataset:
    from torchvision.datasets import CIFAR100

    root = Path(cfg.root or "~/.cache/edgesmith/cifar100").expanduser()
    try:
        train = CIFAR100(str(root), train=True, download=cfg.allow_download)
        test = CIFAR100(str(root), train=False, download=cfg.allow_download)
    except RuntimeError as exc:
        raise DataError(f"CIFAR-100 is not in {root} ({exc}).",
                        "Set data.allow_download: true to fetch it, or data.root to a folder that holds it.") from None

    def to_set(ds, cap) -> ImageSet:
        labels = np.asarray(ds.targets, dtype=np.int64)
        keep = per_class_cap(labels, cap)
        return ImageSet(np.ascontiguousarray(ds.data[keep].transpose(0, 3, 1, 2)), labels[keep])

    return Dataset("cifar100", tuple(train.classes), to_set(train, cfg.train_per_class),
                   to_set(test, cfg.test_per_class))


def load_dataset(cfg) -> Dataset:
    return DATASETS.get(cfg.dataset)(cfg)
