"""Brand's online eigen-update (B-KFAC) and its refreshes against explicit dense averages and eigh."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import rkfac
from rkfac.brand import batch_columns, brand_refresh, brand_update, reproject_subset
from rkfac.kfac.statistics import StatisticSums
from rkfac.layers import kind_for
from rkfac.lowrank import Eigenpairs

DTYPE = torch.float64


def assert_orthonormal(vectors: Tensor, atol: float = 1e-12) -> None:
    gram = vectors.T @ vectors
    torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=gram.dtype), atol=atol, rtol=0)


def assert_well_formed(pairs: Eigenpairs) -> None:
    assert_orthonormal(pairs.vectors)
    assert bool((pairs.values >= 0).all())
    assert bool((pairs.values[:-1] >= pairs.values[1:]).all()), "values must be sorted descending"
    assert pairs.top == (float(pairs.values[0]) if pairs.rank else 0.0)


def descending_eigenvalues(matrix: Tensor) -> Tensor:
    return torch.linalg.eigvalsh(matrix).flip(0)


def spectral_norm(matrix: Tensor) -> float:
    return float(torch.linalg.eigvalsh(matrix).abs().max())


def random_orthonormal(dim: int, count: int, generator: torch.Generator) -> Tensor:
    return torch.linalg.qr(torch.randn(dim, count, generator=generator, dtype=DTYPE)).Q


def planted_columns(dim: int, count: int, decay: float, generator: torch.Generator, basis: Tensor) -> Tensor:
    """Random columns whose covariance has eigenvalues decay^(2i) along the fixed ``basis``."""
    scales = decay ** torch.arange(dim, dtype=DTYPE)
    return basis @ (scales[:, None] * torch.randn(dim, count, generator=generator, dtype=DTYPE))


def test_without_truncation_updates_equal_the_explicit_average() -> None:
    generator = torch.Generator().manual_seed(0)
    dim, count, decay = 40, 3, 0.9
    pairs, explicit = None, torch.zeros(dim, dim, dtype=DTYPE)
    for step in range(10):
        columns = torch.randn(dim, count, generator=generator, dtype=DTYPE)
        statistic = columns @ columns.T
        explicit = statistic if step == 0 else decay * explicit + (1 - decay) * statistic
        pairs = brand_update(pairs, columns, decay, rank=dim)
        assert pairs.rank == min(dim, count * (step + 1))
        assert_well_formed(pairs)
        torch.testing.assert_close(pairs.dense(), explicit, atol=1e-10, rtol=0)
        expected = descending_eigenvalues(explicit)
        torch.testing.assert_close(pairs.values, expected[: pairs.rank], atol=1e-10, rtol=0)
        torch.testing.assert_close(expected[pairs.rank :], torch.zeros(dim - pairs.rank, dtype=DTYPE), atol=1e-10, rtol=0)
        assert pairs.trace == pytest.approx(float(explicit.trace()), rel=1e-12)


@pytest.mark.parametrize("spectrum_decay", [1.0, 0.3])
def test_truncation_error_is_bounded_by_the_dropped_eigenvalues(spectrum_decay: float) -> None:
    """‖F_k − X_k‖₂ ≤ Σ_j ρ^{k−j} δ_j ≤ Σ_j δ_j, E_k ≽ 0, and each step is the exact top-r of its input."""
    generator = torch.Generator().manual_seed(1)
    dim, count, decay, rank = 40, 3, 0.9, 8
    basis = random_orthonormal(dim, dim, generator)
    pairs, explicit = None, torch.zeros(dim, dim, dtype=DTYPE)
    faded_bound, summed_bound = 0.0, 0.0
    for step in range(10):
        columns = planted_columns(dim, count, spectrum_decay, generator, basis)
        statistic = columns @ columns.T
        # The test's own record of the dropped eigenvalue: λ_{r+1} of what this step truncates.
        untruncated = statistic if pairs is None else decay * pairs.dense() + (1 - decay) * statistic
        dropped = float(descending_eigenvalues(untruncated)[rank])
        faded_bound = decay * faded_bound + dropped
        summed_bound += dropped
        explicit = statistic if step == 0 else decay * explicit + (1 - decay) * statistic

        pairs = brand_update(pairs, columns, decay, rank=rank)
        assert_well_formed(pairs)
        assert pairs.rank == min(rank, count * (step + 1))
        top_values, top_vectors = torch.linalg.eigh(untruncated)
        best = (top_vectors[:, -rank:] * top_values[-rank:]) @ top_vectors[:, -rank:].T
        torch.testing.assert_close(pairs.dense(), best, atol=1e-10, rtol=0)

        error = explicit - pairs.dense()
        assert spectral_norm(error) <= faded_bound + 1e-12 <= summed_bound + 1e-12
        assert float(torch.linalg.eigvalsh(error).min()) >= -1e-12, "the estimate must not exceed the average"
        assert pairs.trace == pytest.approx(float(explicit.trace()), rel=1e-12)
        assert pairs.trace - float(pairs.values.sum()) == pytest.approx(float(error.trace()), abs=1e-10)
    if spectrum_decay < 1:
        assert spectral_norm(error) <= 1e-6 * spectral_norm(explicit)
    else:
        assert faded_bound > 0.1 * spectral_norm(explicit)  # a flat spectrum: the bound is doing work


def test_orthonormality_survives_many_truncated_updates() -> None:
    generator = torch.Generator().manual_seed(2)
    pairs = None
    for _ in range(100):
        pairs = brand_update(pairs, torch.randn(30, 4, generator=generator, dtype=DTYPE), 0.95, rank=10)
    assert pairs is not None
    assert_orthonormal(pairs.vectors, atol=1e-12)


def test_float32_update_matches_float64() -> None:
    generator = torch.Generator().manual_seed(3)
    pairs64 = pairs32 = None
    for _ in range(10):
        columns = torch.randn(64, 8, generator=generator, dtype=DTYPE)
        pairs64 = brand_update(pairs64, columns, 0.9, rank=16)
        pairs32 = brand_update(pairs32, columns.float(), 0.9, rank=16)
    assert pairs32 is not None and pairs64 is not None
    assert_orthonormal(pairs32.vectors.double(), atol=1e-5)
    torch.testing.assert_close(pairs32.values.double(), pairs64.values, atol=1e-4 * pairs64.top, rtol=0)


def test_first_statistic_equals_eigh_of_c_ct() -> None:
    generator = torch.Generator().manual_seed(4)
    columns = torch.randn(25, 6, generator=generator, dtype=DTYPE)
    explicit = columns @ columns.T
    pairs = brand_update(None, columns, 0.95, rank=4)
    assert_well_formed(pairs)
    assert pairs.rank == 4
    torch.testing.assert_close(pairs.values, descending_eigenvalues(explicit)[:4], atol=1e-12, rtol=0)
    values, vectors = torch.linalg.eigh(explicit)
    torch.testing.assert_close(pairs.dense(), (vectors[:, -4:] * values[-4:]) @ vectors[:, -4:].T, atol=1e-12, rtol=0)
    assert pairs.trace == pytest.approx(float(explicit.trace()), rel=1e-12)


def test_rank_deficient_columns_give_orthonormal_exact_pairs() -> None:
    """Duplicate and zero columns, then columns inside span U (a zero residual)."""
    generator = torch.Generator().manual_seed(5)
    dim, decay = 20, 0.8
    x, y = torch.randn(dim, 1, generator=generator, dtype=DTYPE), torch.randn(dim, 1, generator=generator, dtype=DTYPE)
    columns = torch.cat([x, x, torch.zeros(dim, 1, dtype=DTYPE), 2 * x, y, y - x], dim=1)  # rank 2
    explicit = columns @ columns.T
    pairs = brand_update(None, columns, decay, rank=10)
    assert pairs.rank == 2
    assert_well_formed(pairs)
    torch.testing.assert_close(pairs.dense(), explicit, atol=1e-12, rtol=0)

    inside = pairs.vectors @ torch.randn(2, 5, generator=generator, dtype=DTYPE)
    explicit = decay * explicit + (1 - decay) * inside @ inside.T
    pairs = brand_update(pairs, inside, decay, rank=10)
    assert pairs.rank == 2
    assert_well_formed(pairs)
    torch.testing.assert_close(pairs.dense(), explicit, atol=1e-12, rtol=0)

    z = torch.randn(dim, 1, generator=generator, dtype=DTYPE)
    mixed = torch.cat([inside, torch.zeros(dim, 2, dtype=DTYPE), x + z, x + z], dim=1)  # one new direction, z
    explicit = decay * explicit + (1 - decay) * mixed @ mixed.T
    pairs = brand_update(pairs, mixed, decay, rank=10)
    assert pairs.rank == 3
    assert_well_formed(pairs)
    torch.testing.assert_close(pairs.dense(), explicit, atol=1e-12, rtol=0)


def test_zero_columns_and_no_columns() -> None:
    zeros = torch.zeros(7, 3, dtype=DTYPE)
    empty = brand_update(None, zeros, 0.9, rank=4)
    assert empty.rank == 0 and empty.vectors.shape == (7, 0) and empty.top == 0.0 and empty.trace == 0.0

    generator = torch.Generator().manual_seed(6)
    pairs = brand_update(None, torch.randn(7, 3, generator=generator, dtype=DTYPE), 0.9, rank=4)
    for columns in (zeros, torch.zeros(7, 0, dtype=DTYPE)):
        decayed = brand_update(pairs, columns, 0.9, rank=4)
        torch.testing.assert_close(decayed.dense(), 0.9 * pairs.dense(), atol=1e-12, rtol=0)
        assert decayed.trace == pytest.approx(0.9 * pairs.trace)


def test_more_columns_than_dimensions() -> None:
    generator = torch.Generator().manual_seed(7)
    dim, decay = 6, 0.9
    pairs, explicit = None, torch.zeros(dim, dim, dtype=DTYPE)
    for step in range(3):
        columns = torch.randn(dim, 15, generator=generator, dtype=DTYPE)
        explicit = columns @ columns.T if step == 0 else decay * explicit + (1 - decay) * columns @ columns.T
        pairs = brand_update(pairs, columns, decay, rank=50)
        assert pairs.rank == dim
        assert_well_formed(pairs)
        torch.testing.assert_close(pairs.dense(), explicit, atol=1e-12, rtol=0)
    truncated = brand_update(pairs, torch.randn(dim, 15, generator=generator, dtype=DTYPE), decay, rank=2)
    assert truncated.rank == 2
    assert_well_formed(truncated)


def test_bias_corner_is_one_and_bias_column_the_mean_input() -> None:
    """C = aᵀ/√N scales the bias row like every other entry: S_A[-1, -1] = 1, S_A[:-1, -1] = mean input."""
    generator = torch.Generator().manual_seed(8)
    layer = nn.Linear(5, 3).to(DTYPE)
    decay, pairs, mean = 0.9, None, torch.zeros(5, dtype=DTYPE)
    for step in range(4):
        inputs = torch.randn(7, 5, generator=generator, dtype=DTYPE) + 1.0
        columns = batch_columns(kind_for(layer).input_rows(inputs), "A", samples=7, loss_reduction="mean")
        pairs = brand_update(pairs, columns, decay, rank=6)
        mean = inputs.mean(0) if step == 0 else decay * mean + (1 - decay) * inputs.mean(0)
        factor = pairs.dense()
        assert float(factor[-1, -1]) == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(factor[:-1, -1], mean, atol=1e-12, rtol=0)
        torch.testing.assert_close(factor[-1, :-1], mean, atol=1e-12, rtol=0)


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
@pytest.mark.parametrize("conv", [False, True])
def test_batch_columns_reproduce_statistic_sums(loss_reduction: str, conv: bool) -> None:
    torch.manual_seed(9)
    layer: nn.Linear | nn.Conv2d = nn.Conv2d(2, 3, 3, padding=1) if conv else nn.Linear(6, 4)
    layer = layer.to(DTYPE)
    inputs = torch.randn(5, 2, 4, 4, dtype=DTYPE) if conv else torch.randn(5, 6, dtype=DTYPE)
    output = layer(inputs)
    a_rows = kind_for(layer).input_rows(inputs)
    g_rows = kind_for(layer).output_grad_rows(torch.randn_like(output))
    sums = StatisticSums()
    sums.add_inputs(a_rows)
    sums.add_output_grads(g_rows, samples=5, group=0)
    s_a, s_g = sums.averages(loss_reduction)
    a_columns = batch_columns(a_rows, "A", samples=5, loss_reduction=loss_reduction)
    g_columns = batch_columns(g_rows, "G", samples=5, loss_reduction=loss_reduction)
    assert a_columns.shape == (a_rows.shape[1], a_rows.shape[0])
    torch.testing.assert_close(a_columns @ a_columns.T, s_a, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g_columns @ g_columns.T, s_g, atol=1e-12, rtol=1e-12)


def test_invalid_arguments_are_refused() -> None:
    columns = torch.randn(4, 2, dtype=DTYPE)
    pairs = brand_update(None, columns, 0.9, rank=2)
    with pytest.raises(ValueError, match="decay must be < 1"):
        brand_update(pairs, columns, 1.0, rank=2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        brand_update(pairs, columns, 0.9, rank=0)
    with pytest.raises(ValueError, match="columns have 5 rows but the eigenpairs have dimension 4"):
        brand_update(pairs, torch.randn(5, 2, dtype=DTYPE), 0.9, rank=2)
    with pytest.raises(ValueError, match="columns must be a"):
        brand_update(None, torch.randn(4, dtype=DTYPE), 0.9, rank=2)
    with pytest.raises(ValueError, match="kind must be one of"):
        batch_columns(columns.T, "B", samples=2, loss_reduction="mean")
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        batch_columns(columns.T, "G", samples=2, loss_reduction="none")
    with pytest.raises(ValueError, match="rows must be a non-empty"):
        batch_columns(torch.zeros(0, 4), "A", samples=2, loss_reduction="mean")
    with pytest.raises(ValueError, match="factor must be 4 × 4"):
        reproject_subset(pairs, torch.eye(3, dtype=DTYPE), 1, torch.Generator())


def known_factor(dim: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(F, its eigenvalues descending, its eigenvectors) with a well separated planted spectrum."""
    vectors = random_orthonormal(dim, dim, generator)
    values = 0.7 ** torch.arange(dim, dtype=DTYPE)
    return (vectors * values) @ vectors.T, values, vectors


def test_reproject_all_columns_of_an_exact_span_gives_the_eigenpairs() -> None:
    generator = torch.Generator().manual_seed(10)
    factor, values, vectors = known_factor(30, generator)
    rotated = vectors[:, :8] @ random_orthonormal(8, 8, generator)  # right span, wrong basis
    pairs = Eigenpairs(rotated, torch.rand(8, generator=generator, dtype=DTYPE).sort(descending=True).values, 0.0, 0.0)
    corrected = reproject_subset(pairs, factor, 8, torch.Generator().manual_seed(0))
    assert_well_formed(corrected)
    torch.testing.assert_close(corrected.values, values[:8], atol=1e-12, rtol=0)
    torch.testing.assert_close((corrected.vectors.T @ vectors[:, :8]).abs(), torch.eye(8, dtype=DTYPE), atol=1e-10, rtol=0)
    assert corrected.trace == pytest.approx(float(factor.trace()))


def test_reproject_subset_never_increases_the_frobenius_error() -> None:
    generator = torch.Generator().manual_seed(11)
    factor, _, _ = known_factor(30, generator)
    vectors = random_orthonormal(30, 8, generator)  # not an invariant subspace
    pairs = Eigenpairs(vectors, torch.rand(8, generator=generator, dtype=DTYPE).sort(descending=True).values, 0.0, 0.0)
    error = float(torch.linalg.norm(factor - pairs.dense()))
    for seed in range(5):
        corrected = reproject_subset(pairs, factor, 3, torch.Generator().manual_seed(seed))
        assert_well_formed(corrected)
        torch.testing.assert_close(corrected.vectors @ corrected.vectors.T, vectors @ vectors.T, atol=1e-12, rtol=0)
        assert float(torch.linalg.norm(factor - corrected.dense())) <= error + 1e-12

    # All columns: the exact identity ‖F − X'‖² = ‖F − X‖² − ‖Uᵀ(F − X)U‖².
    corrected = reproject_subset(pairs, factor, 100, torch.Generator().manual_seed(0))
    gap = vectors.T @ (factor - pairs.dense()) @ vectors
    after = float(torch.linalg.norm(factor - corrected.dense())) ** 2
    assert after == pytest.approx(error**2 - float(torch.linalg.norm(gap)) ** 2, rel=1e-10)


def test_reproject_subset_is_reproducible_and_count_zero_keeps_the_pairs() -> None:
    generator = torch.Generator().manual_seed(12)
    factor, _, _ = known_factor(20, generator)
    pairs = brand_update(None, torch.randn(20, 6, generator=generator, dtype=DTYPE), 0.9, rank=6)
    first = reproject_subset(pairs, factor, 2, torch.Generator().manual_seed(3))
    second = reproject_subset(pairs, factor, 2, torch.Generator().manual_seed(3))
    assert torch.equal(first.vectors, second.vectors) and torch.equal(first.values, second.values)
    unchanged = reproject_subset(pairs, factor, 0, torch.Generator())
    assert torch.equal(unchanged.vectors, pairs.vectors) and torch.equal(unchanged.values, pairs.values)


def test_refresh_after_truncated_updates_restores_the_best_rank_r_pairs() -> None:
    """B-R-KFAC: the stored dense factor's decomposition replaces the drifted B-KFAC pairs."""
    generator = torch.Generator().manual_seed(13)
    dim, decay, rank = 30, 0.9, 5
    pairs, explicit = None, torch.zeros(dim, dim, dtype=DTYPE)
    for step in range(8):
        columns = torch.randn(dim, 3, generator=generator, dtype=DTYPE)
        explicit = columns @ columns.T if step == 0 else decay * explicit + (1 - decay) * columns @ columns.T
        pairs = brand_update(pairs, columns, decay, rank=rank)
    assert pairs is not None
    refreshed = brand_refresh(explicit, rkfac.ExactEigh(rank=rank), torch.Generator().manual_seed(0), step=8)
    values, vectors = torch.linalg.eigh(explicit)
    best = (vectors[:, -rank:] * values[-rank:]) @ vectors[:, -rank:].T
    torch.testing.assert_close(refreshed.dense(), best, atol=1e-12, rtol=0)
    assert torch.linalg.matrix_norm(explicit - refreshed.dense(), 2) <= torch.linalg.matrix_norm(explicit - pairs.dense(), 2)
    assert refreshed.trace == pytest.approx(pairs.trace, rel=1e-12)  # both the trace of the true average

    randomized = rkfac.SymmetricRandomizedEVD(rank=rank, oversample=4, power_iters=2)
    direct = randomized.decompose(explicit, torch.Generator().manual_seed(1), 8)
    via_refresh = brand_refresh(explicit, randomized, torch.Generator().manual_seed(1), 8)
    assert torch.equal(direct.vectors, via_refresh.vectors) and torch.equal(direct.values, via_refresh.values)
