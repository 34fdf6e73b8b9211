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
