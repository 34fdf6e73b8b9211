"""The shared damped low-rank solve against dense float64 solves."""

from __future__ import annotations

import pytest
import torch

from rkfac.lowrank import Eigenpairs, damped_inverse_left, damped_inverse_right, kronecker_solve


def random_pairs(dim: int, rank: int, seed: int) -> Eigenpairs:
    generator = torch.Generator().manual_seed(seed)
    vectors, _ = torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=torch.float64))
    values = torch.rand(rank, generator=generator, dtype=torch.float64).sort(descending=True).values * 5
    return Eigenpairs(vectors, values, float(values.sum()), float(values[0]))


def dense_damped(pairs: Eigenpairs, damping: float) -> torch.Tensor:
    return pairs.vectors @ torch.diag(pairs.values) @ pairs.vectors.T + damping * torch.eye(pairs.dim, dtype=torch.float64)


@pytest.mark.parametrize("rank", [3, 12])
def test_one_sided_solves_match_dense_inverse(rank: int) -> None:
    pairs = random_pairs(12, rank, seed=rank)
    matrix = torch.randn(12, 5, dtype=torch.float64)
    expected = torch.linalg.solve(dense_damped(pairs, 0.3), matrix)
    torch.testing.assert_close(damped_inverse_left(pairs, 0.3, matrix), expected)
    torch.testing.assert_close(damped_inverse_right(pairs, 0.3, matrix.T), expected.T)


def test_kronecker_solve_matches_explicit_kronecker_product() -> None:
    """vec(G⁻¹ M A⁻¹) = (A⁻¹ ⊗ G⁻¹) vec(M) with column-major vec and symmetric A, G."""
    g_pairs, a_pairs = random_pairs(4, 2, seed=1), random_pairs(6, 3, seed=2)
    grad = torch.randn(4, 6, dtype=torch.float64)
    g_dense, a_dense = dense_damped(g_pairs, 0.1), dense_damped(a_pairs, 0.7)
    kron = torch.kron(a_dense, g_dense)
    expected = torch.linalg.solve(kron, grad.T.reshape(-1)).reshape(6, 4).T
    torch.testing.assert_close(kronecker_solve(grad, g_pairs, 0.1, a_pairs, 0.7), expected)


@pytest.mark.parametrize(("g_rank", "a_rank"), [(2, 3), (4, 6)])
def test_low_precision_expansion_is_the_same_solve(g_rank: int, a_rank: int) -> None:
    """The expanded form α_G α_A V + U_G X + Y U_Aᵀ, run with float64 "low" products on float32
    inputs, equals the dense solve to float32 accuracy (full rank included)."""
    g_pairs, a_pairs = random_pairs(4, g_rank, seed=3), random_pairs(6, a_rank, seed=4)
    grad = torch.randn(4, 6, dtype=torch.float64)
    expected = torch.linalg.solve(dense_damped(g_pairs, 0.2), grad) @ torch.linalg.inv(dense_damped(a_pairs, 0.4))
    g32 = Eigenpairs(g_pairs.vectors.float(), g_pairs.values.float(), g_pairs.trace, g_pairs.top)
    a32 = Eigenpairs(a_pairs.vectors.float(), a_pairs.values.float(), a_pairs.trace, a_pairs.top)
    result = kronecker_solve(grad.float(), g32, 0.2, a32, 0.4, compute_dtype=torch.float64)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_solve_is_rounded_not_wrong() -> None:
    g_pairs, a_pairs = random_pairs(64, 16, seed=5), random_pairs(48, 12, seed=6)
    grad = torch.randn(64, 48, dtype=torch.float64)
    expected = kronecker_solve(grad, g_pairs, 0.1, a_pairs, 0.3)
    g32 = Eigenpairs(g_pairs.vectors.float(), g_pairs.values.float(), g_pairs.trace, g_pairs.top)
    a32 = Eigenpairs(a_pairs.vectors.float(), a_pairs.values.float(), a_pairs.trace, a_pairs.top)
    result = kronecker_solve(grad.float(), g32, 0.1, a32, 0.3, compute_dtype=torch.bfloat16)
    error = float((result.double() - expected).norm() / expected.norm())
    assert result.dtype == torch.float32 and 1e-5 < error < 1e-2
