"""SubDistill's layer targets computed once: t~ = U_k^T (pool(t) - mu) of the frozen teacher on every transfer
image, per layer pair (k dims at the resolution where the pair is compared), with the teacher's subtask logits.

The `subspaces` stage writes them next to the subspaces (it has the basis and already runs the teacher), so the
distill loop looks targets up instead of running the teacher, and a change of the distillation settings (epochs,
lambda, lr) reuses them with the subspaces. Stored float16: half the memory and disk of float32; the parity test
(tests/test_subspace_targets.py) bounds the difference to the live targets (relative 2^-11, float16's rounding).
Rows follow the transfer set's order; each image's content digest is stored with them and checked on load, so a
cache can never be applied to other images."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..data.views import as_tensor, batches
from ..models.known_logits import image_digests
from ..models.layout import channels_last, channels_last_model
from .features import PairSpec, as_map, pool_to, prefix_tokens, tap_features
from .matching import PairTarget

LOGITS_FILE, DIGESTS_FILE = "target_logits.npy", "target_digests.npy"
STORE_DTYPE = np.float16


def target_file(index: int) -> str:
    return f"targets{index}.npy"


def project(teacher_map: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """U_k^T (t - mu) at every position (a 1x1 convolution); the map is already at the compared size."""
    centred = teacher_map - mean.view(1, -1, 1, 1)
    return F.conv2d(centred, basis.T[:, :, None, None])


@torch.no_grad()
def compute_targets(teacher: nn.Module, view, images: np.ndarray, pairs: Sequence[PairSpec], layers: Sequence[dict],
                    class_ids: Sequence[int], device, on_batch=lambda n: None, batch: int = 128
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(subtask logits float32, [projected targets float16 per pair]) for every image, in order. Under torchrun each
    process runs its share and all gather the whole."""
    total, source = len(images), as_tensor(images)
    rows = distributed.row_range(total)
    source, num_prefix = source[rows], prefix_tokens(teacher)
    logits, targets = [], [[] for _ in pairs]
    teacher = teacher.to(device).eval()
    with channels_last_model(teacher), tap_features(teacher, [p.teacher for p in pairs]) as feats:
        for idx in batches(len(source), batch):
            logits.append(teacher(channels_last(view(source[idx].to(device))))[:, list(class_ids)].float().cpu())
            for i, (pair, layer) in enumerate(zip(pairs, layers)):
                pooled = pool_to(as_map(feats[i].float(), num_prefix), pair.size)
                targets[i].append(project(pooled, layer["basis"].to(device), layer["mean"].to(device))
                                  .to(torch.float16).cpu())
            on_batch(len(idx))
    gather = lambda parts: distributed.all_gather_rows(torch.cat(parts), total)  # noqa: E731
    return gather(logits), [gather(t) for t in targets]


def save_targets(folder: Path, images: np.ndarray, logits: torch.Tensor, targets: Sequence[torch.Tensor]) -> int:
    """Returns the bytes written."""
    folder = Path(folder)
    np.save(folder / DIGESTS_FILE, image_digests(images))
    np.save(folder / LOGITS_FILE, logits.numpy().astype(np.float32))
    for i, t in enumerate(targets):
        np.save(folder / target_file(i), t.numpy().astype(STORE_DTYPE))
    return sum((folder / f).stat().st_size for f in [DIGESTS_FILE, LOGITS_FILE, *map(target_file, range(len(targets)))])


def load_targets(folder: Path, images: np.ndarray, pairs: int) -> tuple[torch.Tensor, dict[int, np.ndarray]] | None:
    """The cached (logits, {pair: float16 targets, memory-mapped}) when `folder` holds them for exactly these
    images, else None. Mapped, not read: TargetStore copies them chunk by chunk into its own layout."""
    folder = Path(folder)
    if not (folder / DIGESTS_FILE).exists() or not all((folder / target_file(i)).exists() for i in range(pairs)):
        return None
    digests = np.load(folder / DIGESTS_FILE, allow_pickle=False)
    if len(digests) != len(images) or not np.array_equal(digests, image_digests(images)):
        return None
    logits = torch.from_numpy(np.load(folder / LOGITS_FILE, allow_pickle=False))
    return logits, {i: np.load(folder / target_file(i), mmap_mode="r", allow_pickle=False) for i in range(pairs)}


class TargetStore:
    """The cached targets laid out for the loop: all pairs' maps of an image in one float16 row, each pair's with
    the ones channel the fused loss reads (matching.PairTarget), and a float32 row of the image's ||t~||^2 and
    sum of t~ per channel and pair. A batch's targets are then two row gathers, not several per pair.
    `transform` turns a cached float16 projection into the target (the method's from_projection)."""

    def __init__(self, targets: dict[int, np.ndarray | torch.Tensor], transform, chunk: int = 2048):
        self.shapes = [tuple(targets[i].shape[1:]) for i in range(len(targets))]       # (k, h, w)
        self.offsets = np.cumsum([0, *[(k + 1) * h * w for k, h, w in self.shapes]]).tolist()
        self.table_offsets = np.cumsum([0, *[k + 1 for k, _, _ in self.shapes]]).tolist()
        total = len(targets[0])
        self.maps = torch.empty(total, self.offsets[-1], dtype=torch.float16)
        self.table = torch.empty(total, self.table_offsets[-1], dtype=torch.float32)
        for start in range(0, total, chunk):
            rows = slice(start, min(start + chunk, total))
            for i, (k, h, w) in enumerate(self.shapes):
                stored = transform(i, torch.as_tensor(np.array(targets[i][rows]))).half().reshape(-1, k, h * w)
                block = self._pair_maps(i, self.maps[rows])
                block[:, :k], block[:, k] = stored, 1.0
                # Sums of what the loss reads, rounded as it is. ||t~||^2 only enters the loss value: float32, in
                # one pass (vector_norm, no squared copy); sum t~ enters the gradient: accumulated in float64.
                values, table = stored.float(), self.table[rows, self.table_offsets[i]:self.table_offsets[i + 1]]
                table[:, 0] = torch.linalg.vector_norm(values, dim=(1, 2)).square()
                table[:, 1:] = values.sum(dim=2, dtype=torch.float64)

    def batch(self, idx: torch.Tensor, device) -> dict[int, PairTarget]:
        maps = self.maps.index_select(0, idx).to(device).float()
        sums = self.table.index_select(0, idx).to(device).sum(0)
        targets = {}
        for i in range(len(self.shapes)):
            pair_sums = sums[self.table_offsets[i]:self.table_offsets[i + 1]]
            targets[i] = PairTarget(self._pair_maps(i, maps), pair_sums[0], pair_sums[1:])
        return targets

    def _pair_maps(self, index: int, rows: torch.Tensor) -> torch.Tensor:
        """Pair `index`'s columns of some rows as (n, k + 1, P) maps (a view)."""
        k, h, w = self.shapes[index]
        return rows[:, self.offsets[index]:self.offsets[index + 1]].view(-1, k + 1, h * w)
