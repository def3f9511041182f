"""Named random streams. Every random choice of a build draws from its own stream, whose seed is derived from
(build.seed, stream name) by a hash: two streams never share a seed by accident (as `seed + 2` and `seed + 3`
of different call sites could), and adding a stream moves no other. Names are dotted: "<stage or package>.<what>"."""

from __future__ import annotations

import hashlib

STREAMS = (
    "global",                  # torch / numpy / random global state at the start of every stage (model init)
    "data.split",              # the seeded 80/20 train/validation split (all classes)
    "data.labels",             # which training images keep their labels under a label budget
    "data.pool",               # the cap on the unlabelled pool
    "data.labels_file",        # which of a labels file's images are held out for model selection
    "data.spurious",           # which images get a marker (stress test), with data.spurious.seed
    "teacher.batches",         # from-scratch teacher: shuffling
    "teacher.augment",         # its augmentation (data.augment)
    "adapt.images",            # adapt.max_images: which training images adapt the head
    "adapt.batches",           # adapt: shuffling
    "adapt.heads",             # adapt.heads: the k-th extra head's initialisation and shuffling (adapt.heads.<k>)
    "adapt.augment",           # its augmentation (data.augment, a fit on images rather than on a cached prefix)
    "adapt.copies",            # adapt.augment_copies: the crops and flips of the cached copies
    "subspaces.images",        # subspaces.max_images
    "subspaces.positions",     # the spatial positions sampled for the moments
    "subspaces.basis",         # the random-basis baseline of pipeline.distill.subspace, + ".<pair index>"
    "distill.batches",         # distillation: shuffling, augmentation
    "ood.exposure.images",     # which outside images outlier exposure trains on
    "ood.exposure.batches",    # their order
    "qat.calibration",         # the INT8 calibration images (qat stage and the export stage's PT2E formats)
    "qat.batches",             # QAT fine-tuning: shuffling
    "search.sampler",          # the candidates Optuna's sampler draws (one seed per trial position)
    "search.calibration",      # the calibration images of the candidates' INT8 artifacts
    "xai.images",              # the test images explained
    "xai.flipping",            # pixel flipping's random reference order
    "suggest.kmeans",          # edgesmith suggest-labels: the k-means seeding of the pool's embeddings
    "suggest.pool",            # its cap on the images ranked without labels (data.unlabelled_max_images)
)


def seed_for(seed_or_config, stream: str) -> int:
    """The seed of `stream` for a build: a 63-bit integer (torch and numpy accept it) from blake2b(seed, name).
    `seed_or_config`: build.seed, or a config whose build.seed is used."""
    base = seed_or_config if isinstance(seed_or_config, int) else seed_or_config.build.seed
    if stream not in STREAMS and stream.rpartition(".")[0] not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}: add it to pipeline.seeds.STREAMS")
    digest = hashlib.blake2b(f"{int(base)}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_everything(seed: int, threads: int) -> None:
    import os
    import random

    import numpy as np
    import torch

    # cuBLAS picks its reduction order by workspace unless this is set before its first call in the process;
    # torch's deterministic mode warns on every cuBLAS product without it (docs/reproducibility.md).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # That also fills every new tensor with NaN (a debugging aid against reads of uninitialised memory, which no
    # operation here does): a write pass over each new buffer, 468 fills a SubDistill step and 299 a KD step on the
    # default config (torch profiler). Results are the same bytes without it (the default build's student).
    torch.utils.deterministic.fill_uninitialized_memory = False
    if threads:
        torch.set_num_threads(threads)
