"""Step A of SubDistill: each teacher layer's relevant subspace, from the teacher's own top-2 margin gradients.

Streaming: per layer only float64 sums of a, c, a a^T, c c^T, a c^T are kept (memory O(d^2), not O(N d)), and
the centred covariances come out at the end as E[a a^T] - mu mu^T (the same as centring first)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .features import PairSpec, as_map, prefix_tokens

BASES = ("subdistill", "pca", "prca", "random")
SIGN_SAMPLE_ROWS = 4096    # rows kept to orient the eigenvectors (cosmetic), bounded whatever N is


@dataclass
class Moments:
    """Running float64 sums over the rows (positions) of one layer: activations a, gradients c."""

    dim: int
    count: int = 0
    sum_a: torch.Tensor = field(init=False)
    sum_c: torch.Tensor = field(init=False)
    sum_aa: torch.Tensor = field(init=False)
    sum_cc: torch.Tensor = field(init=False)
    sum_ac: torch.Tensor = field(init=False)
    sample: list = field(default_factory=list)

    def __post_init__(self):
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.sum_a, self.sum_c = zeros(self.dim), zeros(self.dim)
        self.sum_aa, self.sum_cc, self.sum_ac = zeros(self.dim, self.dim), zeros(self.dim, self.dim), zeros(self.dim, self.dim)

    def add(self, a: torch.Tensor, c: torch.Tensor) -> None:
        """a, c: rows x d (same rows: position of an image)."""
        a, c = a.detach().to("cpu", torch.float64), c.detach().to("cpu", torch.float64)
        self.count += len(a)
        self.sum_a += a.sum(0)
        self.sum_c += c.sum(0)
        self.sum_aa += a.T @ a
        self.sum_cc += c.T @ c
        self.sum_ac += a.T @ c
        kept = sum(len(s) for s in self.sample)
        if kept < SIGN_SAMPLE_ROWS:
            self.sample.append(a[: SIGN_SAMPLE_ROWS - kept])

    @property
    def mean(self) -> torch.Tensor:
        return self.sum_a / self.count

    def covariances(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sigma_a (centred), Sigma_c (not centred), Sigma_ac (centred a against c)."""
        mu, mean_c = self.mean, self.sum_c / self.count
        sigma_a = self.sum_aa / self.count - torch.outer(mu, mu)
        sigma_c = self.sum_cc / self.count
        sigma_ac = self.sum_ac / self.count - torch.outer(mu, mean_c)
        return _symmetric(sigma_a), _symmetric(sigma_c), sigma_ac


def _symmetric(m: torch.Tensor) -> torch.Tensor:
    return (m + m.T) / 2


def relevance_matrix(sigma_a: torch.Tensor, sigma_c: torch.Tensor, sigma_ac: torch.Tensor) -> torch.Tensor:
    """M = (S_ac + S_ac^T) + 2 s S_a + (2/s) S_c with s = sqrt(tr S_c / tr S_a): positive semi-definite, as it
    equals E[(sqrt(s) a + c / sqrt(s))(...)^T] + s S_a + S_c / s (the plain cross term is indefinite)."""
    scale = torch.sqrt(torch.trace(sigma_c) / torch.trace(sigma_a).clamp_min(1e-300)).clamp_min(1e-12)
    return (sigma_ac + sigma_ac.T) + 2 * scale * sigma_a + (2 / scale) * sigma_c


def eigen_basis(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (largest first) and eigenvectors as columns, float64 symmetric solver."""
    values, vectors = torch.linalg.eigh(_symmetric(matrix))
    order = torch.argsort(values, descending=True)
    return values[order], vectors[:, order]


def basis_of(kind: str, moments: Moments, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(U with all d columns, eigenvalues or None) for one of BASES."""
    sigma_a, sigma_c, sigma_ac = moments.covariances()
    if kind == "subdistill":
        return _swap(eigen_basis(relevance_matrix(sigma_a, sigma_c, sigma_ac)))
    if kind == "pca":
        return _swap(eigen_basis(sigma_a))
    if kind == "prca":
        return _swap(eigen_basis(sigma_ac + sigma_ac.T))
    if kind == "random":
        gaussian = torch.randn(moments.dim, moments.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        return q * torch.sign(torch.diagonal(r)), None    # sign fix: Haar-distributed
    raise ValueError(f"unknown basis {kind!r}")            # the config's Literal lists the valid names


def _swap(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = pair
    return vectors, values


def orient(basis: torch.Tensor, centred_rows: torch.Tensor) -> torch.Tensor:
    """Flip each column so that most projections of the (centred) activations on it are positive (cosmetic)."""
    positive = (centred_rows @ basis > 0).double().mean(0)
    return basis * torch.where(positive < 0.5, -1.0, 1.0).to(basis)


@dataclass
class Subspace:
    """What distillation needs of one teacher layer: U_k (d x k), mu (d), alpha; and what the report plots."""

    basis: torch.Tensor
    mean: torch.Tensor
    alpha: float
    spectrum: dict

    @classmethod
    def from_moments(cls, moments: Moments, k: int, kind: str, seed: int) -> "Subspace":
        sigma_a, sigma_c, _ = moments.covariances()
        full, values = basis_of(kind, moments, seed)
        full = orient(full, torch.cat(moments.sample) - moments.mean)
        basis = full[:, :k]
        energy = torch.einsum("di,de,ei->i", full, sigma_a, full)       # u_i^T Sigma_a u_i, all d directions
        relevance = torch.einsum("di,de,ei->i", full, sigma_c, full)    # u_i^T Sigma_c u_i
        alpha = float(energy[:k].sum())
        return cls(basis, moments.mean, alpha, {
            "eigenvalues": values.tolist() if values is not None else None,
            "activation_energy": energy.tolist(), "gradient_energy": relevance.tolist(),
            "energy_fraction_in_subspace": alpha / max(float(torch.trace(sigma_a)), 1e-300),
            "rows": moments.count,
        })


class GradientTaps:
    """Forward hooks that make the tapped outputs part of the autograd graph (the teacher's weights are frozen,
    so nothing before the first tap is differentiated) and keep them to read their gradients."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        modules = dict(model.named_modules())
        self.outputs: dict[int, torch.Tensor] = {}
        self.hooks = [modules[n].register_forward_hook(self._hook(i)) for i, n in enumerate(names)]

    def _hook(self, index: int) -> Callable:
        def keep(_module, _inputs, out):
            if not out.requires_grad:
                out.requires_grad_(True)
            self.outputs[index] = out
        return keep

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def margin(logits: torch.Tensor) -> torch.Tensor:
    """f(x) = top-1 minus top-2 of the teacher's own subtask logits."""
    top = logits.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def pick_positions(maps: torch.Tensor, grads: torch.Tensor, count: int, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same `count` random positions of each image for activations and gradients: rows x d each."""
    n, d, h, w = maps.shape
    count = min(count, h * w)
    chosen = torch.rand(n, h * w, generator=generator).argsort(dim=1)[:, :count].to(maps.device)
    index = chosen[:, None, :].expand(n, d, count)
    take = lambda x: x.flatten(2).gather(2, index).transpose(1, 2).reshape(n * count, d)  # noqa: E731
    return take(maps), take(grads)


@dataclass(frozen=True)
class Elsewhere:
    """In place of a batch that another process handles: its size, so that this process still draws (and drops)
    its random positions and its position generator stays in step with a single process's."""

    size: int


def skip_positions(generator: torch.Generator, size: int, pairs: Sequence[PairSpec]) -> None:
    """The draws pick_positions makes for a batch of `size` images, layer by layer, thrown away."""
    for p in pairs:
        torch.rand(size, p.teacher_size[0] * p.teacher_size[1], generator=generator)


def accumulate(teacher: nn.Module, batches, pairs: Sequence[PairSpec], class_ids: Sequence[int],
               positions: int, seed: int, on_batch: Callable[[int], None] = lambda n: None) -> list[Moments]:
    """Run the frozen teacher over batches of normalised images, backpropagate the summed margin to the tapped
    layers and add the chosen positions' (activation, gradient) rows to each layer's moments.
    Under torchrun each process gets its own batches and an `Elsewhere` for each of the others' (the same
    positions are chosen as in one process); the float64 sums are then all-reduced, so every process ends with
    the moments of all the images."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    names = [p.teacher for p in pairs]
    moments = [Moments(p.teacher_channels) for p in pairs]
    generator = torch.Generator().manual_seed(seed)
    num_prefix = prefix_tokens(teacher)
    taps = GradientTaps(teacher, names)
    own: list[int] = []            # numbers of the batches this process handled
    try:
        for number, x in enumerate(batches):
            if isinstance(x, Elsewhere):
                skip_positions(generator, x.size, pairs)
                on_batch(x.size)
                continue
            own.append(number)
            with torch.enable_grad():
                logits = teacher(x)[:, list(class_ids)]
                acts = [taps.outputs[i] for i in range(len(names))]
                grads = torch.autograd.grad(margin(logits).sum(), acts)
            for i, (a, g) in enumerate(zip(acts, grads)):
                rows_a, rows_c = pick_positions(as_map(a.detach(), num_prefix), as_map(g, num_prefix), positions, generator)
                moments[i].add(rows_a, rows_c)
            on_batch(len(x))
    finally:
        taps.close()
    for m in moments:
        all_reduce_moments(m, own)
    return moments


def all_reduce_moments(moments: Moments, own: Sequence[int]) -> None:
    """Sum one layer's moments over the processes (in float64) and rebuild the orientation sample a single
    process would keep: the first rows in batch order. `own`: the batch numbers behind this process's sample."""
    from .. import distributed

    if not distributed.active():
        return
    count = torch.tensor([float(moments.count)], dtype=torch.float64)
    for tensor in (count, moments.sum_a, moments.sum_c, moments.sum_aa, moments.sum_cc, moments.sum_ac):
        distributed.all_reduce_sum_(tensor)
    moments.count = int(count.item())
    parts = distributed.all_gather_object(list(zip(own, moments.sample)))
    ordered = [rows for _number, rows in sorted((p for part in parts for p in part), key=lambda p: p[0])]
    moments.sample = [torch.cat(ordered)[:SIGN_SAMPLE_ROWS]] if ordered else []


SUBSPACES_FILE, SPECTRA_FILE = "subspaces.pt", "spectra.json"


def save_subspaces(folder: Path, pairs: Sequence[PairSpec], subspaces: Sequence[Subspace], info: dict) -> None:
    """Plain tensors (loadable with weights_only=True) and a JSON of the pairs and full spectra."""
    tensors = {}
    for i, sub in enumerate(subspaces):
        tensors[f"{i}.basis"] = sub.basis.float().contiguous()
        tensors[f"{i}.mean"] = sub.mean.float().contiguous()
        tensors[f"{i}.alpha"] = torch.tensor(sub.alpha, dtype=torch.float32)
    torch.save(tensors, Path(folder) / SUBSPACES_FILE)
    layers = [{"pair": p.to_dict(), "k": s.basis.shape[1], "alpha": s.alpha, **s.spectrum}
              for p, s in zip(pairs, subspaces)]
    (Path(folder) / SPECTRA_FILE).write_text(json.dumps({**info, "layers": layers}, indent=1) + "\n")


def load_subspaces(folder: Path) -> tuple[list[PairSpec], list[dict[str, torch.Tensor]]]:
    """The pairs and, per pair, {'basis', 'mean', 'alpha'} tensors."""
    tensors = torch.load(Path(folder) / SUBSPACES_FILE, map_location="cpu", weights_only=True)
    spectra = json.loads((Path(folder) / SPECTRA_FILE).read_text())
    pairs = [PairSpec.from_dict(layer["pair"]) for layer in spectra["layers"]]
    return pairs, [{key: tensors[f"{i}.{key}"] for key in ("basis", "mean", "alpha")} for i in range(len(pairs))]
