"""SubDistill's layer loss, written for a small student on a CPU, where it costs as much as the student itself.

Two things make the straightforward version (centre, rotate, subtract, square: ~40 recorded operations per layer
pair, plus a Cayley solve per pair and step) slow, and both are fixed here without changing what is computed:
- The loss per pair is sum_p ||V (s_p - m) - t~_p||^2. As V is orthogonal this is
  ||s - m||^2 - 2 <V, sum_p (s_p - m) t~_p^T> + ||t~||^2: sums and one k x k cross product. SubspaceMatch
  evaluates that for all pairs in one autograd node and writes its gradients in closed form. The targets carry a
  channel of ones (PairTarget), so the one GEMM of the cross product also gives the student's sums and the one
  GEMM of the backward pass also adds the centring shift; ||t~||^2 and sum t~ come with the cached targets.
- V stays orthogonal by retraction: a plain k x k parameter that the optimizer updates and `retract_` pulls back
  to the nearest orthogonal matrix after every step (Newton-Schulz polar iterations, a few small matrix
  products), instead of a Cayley parametrization that solves a linear system forward and backward every step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


def subspace_match_reference(centred: torch.Tensor, target: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """sum over images and positions of ||V c - t~||^2 for an already centred student map c, by autograd (the
    evaluation path, and what the tests hold SubspaceMatch to)."""
    return (torch.einsum("jk,nkhw->njhw", rotation, centred) - target).pow(2).sum()


def _cross(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum over images and positions of s_p t_p^T (k x c), for (n, k, P) and (n, c, P) maps. Many positions: a
    batched GEMM per image (no copies); few positions and many channels (P < k): one GEMM on channel-major copies,
    since the batched form would materialise n k x c products."""
    n, k, positions = student.shape
    if positions >= k:
        return torch.bmm(student, target.transpose(1, 2)).sum(0)
    channels = target.shape[1]
    return student.transpose(0, 1).reshape(k, -1) @ target.transpose(0, 1).reshape(channels, -1).T


def _rotate_back(matrix: torch.Tensor, target: torch.Tensor, student: torch.Tensor, beta: float) -> torch.Tensor:
    """beta s + M t per image and position, for (n, k, P) s, (n, c, P) t and a k x c M, as one batched GEMM onto s
    (few positions: one GEMM on a channel-major copy)."""
    n, k, positions = student.shape
    channels = target.shape[1]
    if positions >= k:
        return torch.baddbmm(student, matrix.expand(n, k, channels), target, beta=beta)
    mixed = (matrix @ target.transpose(0, 1).reshape(channels, -1)).view(k, n, positions).transpose(0, 1)
    return mixed.add(student, alpha=beta)


class PairTarget(NamedTuple):
    """A batch's target for one layer pair in the form the fused loss reads: the maps (n, k + 1, P) with a last
    channel of ones (so that one GEMM with the student's map also gives the student's per-channel sums, and one
    GEMM in the backward pass also adds the centring shift), and the batch's sum of ||t~||^2 (a 0-d tensor) and of
    t~ per channel (k,)."""

    maps: torch.Tensor
    squares: torch.Tensor
    sums: torch.Tensor

    @property
    def plain(self) -> torch.Tensor:
        """The (n, k, P) target without the ones channel."""
        return self.maps[:, :-1]


def pair_target(target: torch.Tensor | PairTarget) -> PairTarget:
    """PairTarget of an (n, k, h, w) or (n, k, P) target map (the teacher's, live: the cache builds its own, which
    passes through)."""
    if isinstance(target, PairTarget):
        return target
    flat = target.reshape(target.shape[0], target.shape[1], -1)
    maps = torch.cat([flat, flat.new_ones(flat.shape[0], 1, flat.shape[2])], dim=1)
    return PairTarget(maps, flat.pow(2).sum(), flat.sum(dim=(0, 2)))


class SubspaceMatch(torch.autograd.Function):
    """For each layer pair, the mean over images and positions of ||V (s_p - m) - t~_p||^2, m the batch mean of
    the student map s, all pairs in one autograd node. Closed-form gradients: d/ds_p = 2 (s_p - m) -
    2 V^T (t~_p - mean t~), and d/dV = -2 (sum_p (s_p - m) t~_p^T)^T projected on the tangent space of the
    orthogonal matrices at V (`tangent`), written into the blocks of the Rotations weight. Student maps are
    (n, k, P); the targets (PairTarget, the frozen teacher's) get no gradient.

    apply(weight, groups, s_0, t_0, t2_0, tsum_0, s_1, ...): the maps of the pairs of `groups` (Rotations.groups_of)
    in order; returns (the per-pair losses (L,), then each pair's batch mean, for the running means)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, groups: tuple[tuple[int, int, int], ...], *flat: torch.Tensor):
        terms, counts, means, saved = [], [], [], []
        for j, index in enumerate(_pairs_of(groups)):
            student, maps, squares, sums = flat[4 * j:4 * j + 4]
            n, k, positions = student.shape
            count = n * positions
            rotation = weight[index, :k, :k]
            both = _cross(student, maps)                           # [sum s t~^T | sum s] (k x k+1)
            mean = both[:, k] / count
            cross = torch.addr(both[:, :k], mean, sums, alpha=-1)  # sum (s - m) t~^T
            flat_s = student.reshape(-1)
            terms.append(torch.stack([torch.dot(flat_s, flat_s), torch.dot(mean, mean), torch.sum(rotation * cross.T),
                                      squares]))
            counts.append(count)
            means.append(mean)
            saved += [student, maps, torch.addmv(mean, rotation.T, sums, alpha=-1 / count), cross]
        ss, mm, inner, tt = torch.stack(terms).unbind(1)
        ctx.save_for_backward(weight, *saved)
        ctx.groups = groups
        ctx.mark_non_differentiable(*means)
        # per position: ||s - m||^2 - 2 <V, sum (s - m) t~^T> + ||t~||^2, with ||s - m||^2 = ||s||^2 - count ||m||^2
        count = torch.tensor(counts, dtype=ss.dtype, device=ss.device)
        return ((ss + tt - 2 * inner) / count - mm, *means)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *_grad_means: torch.Tensor):
        weight, *saved = ctx.saved_tensors
        scales = (2 * grad).tolist()                 # one host sync for all pairs
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[0] else None
        grads = []
        for j, index in enumerate(_pairs_of(ctx.groups)):
            student, maps, shift, cross = saved[4 * j:4 * j + 4]
            n, k, positions = student.shape
            two_g = scales[j] / (n * positions)
            grad_student = None
            if ctx.needs_input_grad[2 + 4 * j]:
                # 2 g (s - V^T t~ - (m - V^T mean t~)): one GEMM onto s, the shift riding on the ones channel
                matrix = torch.cat([weight[index, :k, :k].T, shift.view(-1, 1)], dim=1).mul_(-two_g)
                grad_student = _rotate_back(matrix, maps, student, beta=two_g)
            if grad_weight is not None:
                grad_weight[index, :k, :k] = cross.T * -two_g
            grads += [grad_student, None, None, None]
        if grad_weight is not None:
            for start, stop, width in ctx.groups:      # zero outside the blocks in, zero outside the blocks out
                block = grad_weight[start:stop, :width, :width]
                block.copy_(tangent(weight[start:stop, :width, :width], block))
        return (grad_weight, None, *grads)


def _pairs_of(groups) -> list[int]:
    return [index for start, stop, _ in groups for index in range(start, stop)]


def tangent(rotation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The part of a gradient that moves V along the orthogonal matrices, G - V sym(V^T G): what a
    parametrization (Cayley) would pass to the optimizer. The rest only scales V, which the retraction undoes;
    dropping it keeps it out of the optimizer's moment estimates (and makes the gradient independent of how the
    loss is written: ||V c - t~||^2 and ||c||^2 - 2 <V, c t~^T> + ||t~||^2 agree only on the manifold).
    Also for a batch of (V, G) as (b, k, k)."""
    inner = rotation.transpose(-1, -2) @ grad
    return grad - rotation @ (0.5 * (inner + inner.transpose(-1, -2)))


def random_orthogonal(size: int) -> torch.Tensor:
    """Haar-distributed (QR of a Gaussian with the signs of R's diagonal folded in), from torch's global RNG."""
    q, r = torch.linalg.qr(torch.randn(size, size))
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


class Rotations(nn.Module):
    """One learned k x k orthogonal matrix per layer pair, kept orthogonal by retraction after each optimizer step.
    All of them are blocks of one (pairs, k_max, k_max) parameter, identity outside the blocks (their gradient is
    zero there): one tensor for the optimizer instead of one per pair. Neighbouring blocks of similar size are
    retracted (and their gradients projected) together, as one batch padded to the group's widest block: `groups`,
    (first pair, last pair + 1, width), merged while the padded products cost at most twice the blocks' own."""

    def __init__(self, sizes):
        super().__init__()
        self.sizes = [int(k) for k in sizes]
        widest = max(self.sizes, default=0)
        weight = torch.eye(widest).repeat(len(self.sizes), 1, 1)
        for i, k in enumerate(self.sizes):
            weight[i, :k, :k] = random_orthogonal(k)
        self.weight = nn.Parameter(weight)
        self.groups = self.groups_of(range(len(self.sizes)))

    def __getitem__(self, index: int) -> torch.Tensor:
        k = self.sizes[index]
        return self.weight[index, :k, :k]

    def groups_of(self, indices) -> tuple[tuple[int, int, int], ...]:
        """The given (increasing) pair indices as groups of consecutive pairs (see the class docstring)."""
        groups: list[list[int]] = []
        for index in indices:
            last = groups[-1] if groups else None
            if last is not None and last[1] == index:
                members = self.sizes[last[0]:index + 1]
                if len(members) * max(members) ** 3 <= 2 * sum(k ** 3 for k in members):
                    last[1], last[2] = index + 1, max(members)
                    continue
            groups.append([index, index + 1, self.sizes[index]])
        return tuple(tuple(g) for g in groups)

    @torch.no_grad()
    def retract_(self, tolerance: float = 1e-5) -> None:
        """Each block back to its nearest orthogonal matrix (the polar factor) by Newton-Schulz,
        X <- X (3 I - X^T X) / 2 = 1.5 X - 0.5 X (X^T X), in the weight's precision, a group of blocks at a time
        (the identity padding stays exactly the identity). From an optimizer step away (||X^T X - I|| = e ~ 1e-3)
        one iteration suffices: the error falls to about 1.5 e^2, so that is not re-checked. A step that went far
        (e > 0.5, where the iteration may diverge) falls back to the SVD. One host sync per iteration."""
        blocks = [self.weight[start:stop, :width, :width] for start, stop, width in self.groups]
        for _ in range(10):          # from e = 0.5: 0.38, 0.21, 0.07, 7e-3, 7e-5, 7e-9
            grams = [torch.bmm(x.transpose(1, 2), x) for x in blocks]
            eyes = [torch.eye(x.shape[1], dtype=x.dtype, device=x.device) for x in blocks]
            error = float(torch.stack([(g - eye).abs().amax() for g, eye in zip(grams, eyes)]).max())
            if error < tolerance:
                return
            if error > 0.5:
                self._polar_by_svd_()
                continue
            for x, gram in zip(blocks, grams):
                x.copy_(torch.baddbmm(x, x, gram, beta=1.5, alpha=-0.5))
            if 1.5 * error ** 2 < tolerance / 10:
                return

    def _polar_by_svd_(self) -> None:
        for index, k in enumerate(self.sizes):
            block = self.weight[index, :k, :k]
            u, _, vh = torch.linalg.svd(block.double())
            block.copy_(u @ vh)
