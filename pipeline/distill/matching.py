"""SubDistill's layer loss, written for a small student on a CPU, where it costs as much as the student itself.

Two things make the straightforward version (centre, rotate, subtract, square: ~40 recorded operations per layer
pair, plus a Cayley solve per pair and step) slow, and both are fixed here without changing what is computed:
- The loss per pair is sum_p ||V (s_p - m) - t~_p||^2. As V is orthogonal this is
  ||s - m||^2 - 2 <V, sum_p (s_p - m) t~_p^T> + ||t~||^2: sums and one k x k cross product. SubspaceMatch
  evaluates that and writes its gradients in closed form, a handful of kernels instead of ~40.
- V stays orthogonal by retraction: a plain k x k parameter that the optimizer updates and `retract_` pulls back
  to the nearest orthogonal matrix after every step (Newton-Schulz polar iterations, a few small matrix
  products), instead of a Cayley parametrization that solves a linear system forward and backward every step.
"""

from __future__ import annotations

import torch
from torch import nn


def subspace_match_reference(centred: torch.Tensor, target: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """sum over images and positions of ||V c - t~||^2 for an already centred student map c, by autograd (the
    evaluation path, and what the tests hold SubspaceMatch to)."""
    return (torch.einsum("jk,nkhw->njhw", rotation, centred) - target).pow(2).sum()


def _cross(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum over images and positions of s_p t~_p^T (k x k), for (n, k, P) maps. Many positions: a batched GEMM
    per image (no copies); few positions and many channels (P < k): one GEMM on channel-major copies, since
    the batched form would materialise n k x k products."""
    n, k, positions = student.shape
    if positions >= k:
        return torch.bmm(student, target.transpose(1, 2)).sum(0)
    return student.transpose(0, 1).reshape(k, -1) @ target.transpose(0, 1).reshape(k, -1).T


def _rotate_back(matrix: torch.Tensor, target: torch.Tensor, student: torch.Tensor, beta: float) -> torch.Tensor:
    """beta s + M t~ per image and position, for (n, k, P) maps, as one batched GEMM onto s (few positions: one
    GEMM on a channel-major copy)."""
    n, k, positions = target.shape
    if positions >= k:
        return torch.baddbmm(student, matrix.expand(n, k, k), target, beta=beta)
    mixed = (matrix @ target.transpose(0, 1).reshape(k, -1)).view(k, n, positions).transpose(0, 1)
    return mixed.add(student, alpha=beta)


class SubspaceMatch(torch.autograd.Function):
    """sum_p ||V (s_p - m) - t~_p||^2 with m the batch mean of the student map s, with closed-form gradients
    d/ds_p = 2 (s_p - m) - 2 V^T (t~_p - mean t~) and d/dV = -2 (sum_p (s_p - m) t~_p^T)^T, the latter projected on
    the tangent space of the orthogonal matrices at V (`tangent`). Maps are (n, k, P); the target (the frozen
    teacher's) gets no gradient."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, target: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        positions = student.shape[0] * student.shape[2]
        mean_s, sum_t = student.sum(dim=(0, 2)) / positions, target.sum(dim=(0, 2))
        cross = _cross(student, target) - torch.outer(mean_s, sum_t)          # sum (s - m) t~^T
        flat_s, flat_t = student.reshape(-1), target.reshape(-1)
        squared = (torch.dot(flat_s, flat_s) - positions * torch.dot(mean_s, mean_s)
                   - 2 * torch.dot(rotation.reshape(-1), cross.T.reshape(-1)) + torch.dot(flat_t, flat_t))
        ctx.save_for_backward(student, target, rotation, mean_s - rotation.T @ (sum_t / positions), cross)
        ctx.mark_non_differentiable(mean_s)
        return squared, mean_s            # the batch mean too, for the running mean (no second pass over s)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_mean: torch.Tensor):
        student, target, rotation, shift, cross = ctx.saved_tensors
        grad_student = grad_rotation = None
        if ctx.needs_input_grad[0]:
            # 2 g (s - V^T t~ - (m - V^T mean t~)): the product as one GEMM added onto s, then a per-channel shift
            two_g = 2 * grad
            grad_student = _rotate_back(rotation.T * -two_g, target, student, beta=float(two_g))
            grad_student.sub_((shift * two_g).view(1, -1, 1))
        if ctx.needs_input_grad[2]:
            grad_rotation = tangent(rotation, cross.T * (-2 * grad))
        return grad_student, None, grad_rotation


def tangent(rotation: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The part of a gradient that moves V along the orthogonal matrices, G - V sym(V^T G): what a
    parametrization (Cayley) would pass to the optimizer. The rest only scales V, which the retraction undoes;
    dropping it keeps it out of the optimizer's moment estimates (and makes the gradient independent of how the
    loss is written: ||V c - t~||^2 and ||c||^2 - 2 <V, c t~^T> + ||t~||^2 agree only on the manifold)."""
    inner = rotation.T @ grad
    return grad - rotation @ (0.5 * (inner + inner.T))


def random_orthogonal(size: int) -> torch.Tensor:
    """Haar-distributed (QR of a Gaussian with the signs of R's diagonal folded in), from torch's global RNG."""
    q, r = torch.linalg.qr(torch.randn(size, size))
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


class Rotations(nn.Module):
    """One learned k x k orthogonal matrix per layer pair, kept orthogonal by retraction after each optimizer step.
    All of them are blocks of one (pairs, k_max, k_max) parameter, identity outside the blocks (their gradient is
    zero there): one tensor for the optimizer instead of one per pair."""

    def __init__(self, sizes):
        super().__init__()
        self.sizes = [int(k) for k in sizes]
        widest = max(self.sizes, default=0)
        weight = torch.eye(widest).repeat(len(self.sizes), 1, 1)
        for i, k in enumerate(self.sizes):
            weight[i, :k, :k] = random_orthogonal(k)
        self.weight = nn.Parameter(weight)

    def __getitem__(self, index: int) -> torch.Tensor:
        k = self.sizes[index]
        return self.weight[index, :k, :k]

    @torch.no_grad()
    def retract_(self, tolerance: float = 1e-5) -> None:
        """Each block back to its nearest orthogonal matrix (the polar factor) by Newton-Schulz,
        X <- X (3 I - X^T X) / 2, in the weight's precision. From an optimizer step away (||X^T X - I|| = e ~ 1e-3)
        one iteration suffices: the error falls to about 1.5 e^2, so that is not re-checked. A step that went far
        (e > 0.5, where the iteration may diverge) falls back to the SVD. Block by block: the padded batch would
        multiply 96 x 96 matrices for a 12-channel pair (0.11 vs 0.2 ms a step for the default pairs)."""
        for index, k in enumerate(self.sizes):
            block = self.weight[index, :k, :k]
            x, eye = block, torch.eye(k, dtype=block.dtype, device=block.device)
            for _ in range(10):          # from e = 0.5: 0.38, 0.21, 0.07, 7e-3, 7e-5, 7e-9
                gram = x.T @ x
                error = float((gram - eye).abs().max())
                if error < tolerance:
                    break
                if error > 0.5:
                    u, _, vh = torch.linalg.svd(x.double())
                    x = (u @ vh).to(block.dtype)
                    continue
                x = x @ (1.5 * eye - 0.5 * gram)
                if 1.5 * error ** 2 < tolerance / 10:
                    break
            if x is not block:
                block.copy_(x)
