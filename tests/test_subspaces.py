"""Subspace estimation (SubDistill step A): streaming moments, the relevance matrix, bases, alpha, the stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import parse_config
from pipeline.distill.features import PairSpec
from pipeline.distill.subspace import (
    BASES,
    Moments,
    Subspace,
    accumulate,
    load_subspaces,
    margin,
    relevance_matrix,
    save_subspaces,
)
from pipeline.runner import Build


def correlated_rows(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations with a non-zero mean and anisotropic spread; 'gradients' that partly depend on them."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    a = a + 3.0
    c = 0.3 * a @ torch.randn(d, d, generator=g, dtype=torch.float64) + torch.randn(n, d, generator=g, dtype=torch.float64)
    return a, c


def streamed(a: torch.Tensor, c: torch.Tensor, chunk: int = 37) -> Moments:
    moments = Moments(a.shape[1])
    for start in range(0, len(a), chunk):
        moments.add(a[start:start + chunk], c[start:start + chunk])
    return moments


def reference_subdistill(a: np.ndarray, c: np.ndarray, k: int):
    """Step A written out directly in float64: centre A, covariances, M, eigenvectors, alpha."""
    mu = a.mean(0)
    ac = a - mu
    n = len(a)
    s_a, s_c, s_ac = ac.T @ ac / n, c.T @ c / n, ac.T @ c / n
    s = np.sqrt(np.trace(s_c) / np.trace(s_a))
    m = (s_ac + s_ac.T) + 2 * s * s_a + (2 / s) * s_c
    values, vectors = np.linalg.eigh(m)
    u = vectors[:, np.argsort(values)[::-1]][:, :k]
    return mu, u, float(np.trace(u.T @ s_a @ u)), s_a, s_ac


def test_streamed_covariances_equal_centring_first():
    a, c = correlated_rows(500, 12, seed=1)
    moments = streamed(a, c)
    mu, _, _, s_a, s_ac = reference_subdistill(a.numpy(), c.numpy(), k=3)
    sigma_a, sigma_c, sigma_ac = moments.covariances()
    np.testing.assert_allclose(moments.mean.numpy(), mu, rtol=1e-12)
    np.testing.assert_allclose(sigma_a.numpy(), s_a, atol=1e-9)
    np.testing.assert_allclose(sigma_ac.numpy(), s_ac, atol=1e-9)
    np.testing.assert_allclose(sigma_c.numpy(), (c.T @ c / len(c)).numpy(), atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_relevance_matrix_is_positive_semidefinite_unlike_the_cross_term(seed):
    a, c = correlated_rows(300, 16, seed)
    sigma_a, sigma_c, sigma_ac = streamed(a, c).covariances()
    m = relevance_matrix(sigma_a, sigma_c, sigma_ac)
    lowest = torch.linalg.eigvalsh(m).min()
    assert lowest > -1e-9 * torch.linalg.eigvalsh(m).max()
    assert torch.linalg.eigvalsh(sigma_ac + sigma_ac.T).min() < 0   # PRCA's cross term alone is indefinite


def test_basis_and_alpha_match_a_float64_reference():
    a, c = correlated_rows(400, 10, seed=3)
    k = 4
    sub = Subspace.from_moments(streamed(a, c), k, "subdistill", seed=0)
    mu, u, alpha, _, _ = reference_subdistill(a.numpy(), c.numpy(), k)
    # Same columns up to sign (the sign is chosen for display only).
    np.testing.assert_allclose(np.abs(np.sum(sub.basis.numpy() * u, axis=0)), np.ones(k), atol=1e-8)
    np.testing.assert_allclose(sub.mean.numpy(), mu, rtol=1e-12)
    assert sub.alpha == pytest.approx(alpha, rel=1e-10)
    # Oriented so that most centred projections are positive.
    projections = (a - torch.as_tensor(mu)) @ sub.basis
    assert ((projections > 0).double().mean(0) >= 0.5).all()


@pytest.mark.parametrize("kind", BASES)
def test_every_basis_is_orthonormal_and_alpha_is_its_energy(kind):
    a, c = correlated_rows(300, 8, seed=4)
    sub = Subspace.from_moments(streamed(a, c), 3, kind, seed=5)
    torch.testing.assert_close(sub.basis.T @ sub.basis, torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0)
    centred = a - a.mean(0)
    assert sub.alpha == pytest.approx(float((centred @ sub.basis).pow(2).sum(1).mean()), rel=1e-9)
    assert 0 < sub.spectrum["energy_fraction_in_subspace"] <= 1


def test_pca_basis_keeps_the_most_activation_energy():
    a, c = correlated_rows(300, 8, seed=6)
    moments = streamed(a, c)
    energies = {kind: Subspace.from_moments(moments, 2, kind, seed=0).alpha for kind in BASES}
    assert energies["pca"] == max(energies.values())


def test_save_and_load_round_trip_with_weights_only(tmp_path):
    a, c = correlated_rows(200, 6, seed=7)
    sub = Subspace.from_moments(streamed(a, c), 2, "subdistill", seed=0)
    pair = PairSpec("blocks.1", "features.0", 6, 2, (4, 4), (8, 8))
    save_subspaces(tmp_path, [pair], [sub], {"basis": "subdistill"})
    pairs, tensors = load_subspaces(tmp_path)
    assert pairs == [pair]
    torch.testing.assert_close(tensors[0]["basis"], sub.basis.float())
    assert float(tensors[0]["alpha"]) == pytest.approx(sub.alpha, rel=1e-6)


class TwoLayerTeacher(nn.Module):
    """logits = W mean_positions(relu(conv(x))): its margin gradient at `features` is known in closed form."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Conv2d(1, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        return self.head(self.act(self.features(x)).mean((2, 3)))


def test_accumulated_gradients_are_the_top2_margin_gradients():
    teacher = TwoLayerTeacher().eval()
    x = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    pair = PairSpec("features", "s", 6, 3, (4, 4), (4, 4))
    class_ids = [0, 2, 4]
    moments = accumulate(teacher, [x], [pair], class_ids, positions=16, seed=0)[0]   # all 16 positions
    # Reference: rows of activations and d margin / d activation, by autograd on a plain re-computation.
    pre = teacher.features(x).detach().requires_grad_(True)
    logits = teacher.head(teacher.act(pre).mean((2, 3)))[:, class_ids]
    (grad,) = torch.autograd.grad(margin(logits).sum(), pre)
    rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, 6).double()  # noqa: E731
    a, c = rows(pre.detach()), rows(grad)
    assert moments.count == 8 * 16
    torch.testing.assert_close(moments.sum_ac, a.T @ c, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(moments.sum_cc, c.T @ c, rtol=1e-5, atol=1e-9)


def test_position_choice_is_seeded_and_capped_by_the_map_size():
    teacher = TwoLayerTeacher().eval()
    x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    pair = PairSpec("features", "s", 6, 3, (4, 4), (4, 4))
    first = accumulate(teacher, [x], [pair], [0, 1], positions=5, seed=11)[0]
    again = accumulate(teacher, [x], [pair], [0, 1], positions=5, seed=11)[0]
    other = accumulate(teacher, [x], [pair], [0, 1], positions=5, seed=12)[0]
    capped = accumulate(teacher, [x], [pair], [0, 1], positions=50, seed=11)[0]
    assert first.count == 6 * 5 and capped.count == 6 * 16
    assert torch.equal(first.sum_aa, again.sum_aa)
    assert not torch.equal(first.sum_aa, other.sum_aa)


def _config(method: str) -> dict:
    return {"build": {"name": "t"}, "subtask": {"classes": [0, 1]}, "teacher": {"source": "train"},
            "student": {"arch": "cnn_tiny"}, "distill": {"method": method}}


def test_subspaces_stage_is_in_the_chain_only_when_the_method_needs_it():
    def stages(method):
        return [s.name for s in Build(parse_config(_config(method))).stages()]

    assert stages("subdistill") == ["teacher", "adapt", "subspaces", "distill"]
    for method in ("kd", "fitnet", "attention", "vkd", "student_only"):
        assert "subspaces" not in stages(method)
    plan = {p.stage.name: p for p in Build(parse_config(_config("subdistill"))).plan()}
    assert plan["distill"].inputs["subspaces"] == plan["subspaces"].key
