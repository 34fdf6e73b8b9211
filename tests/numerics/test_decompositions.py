"""Decompositions: properties, exactness when the sketch covers the matrix, near-optimal truncation."""

from __future__ import annotations

import pytest
import torch

import rkfac
from rkfac.decompositions import Decomposition
from tests.oracles import planted

RANDOMIZED = [rkfac.RandomizedSVD, rkfac.SymmetricRandomizedEVD]


def averaged_factor(dim: int, batch: int = 16, steps: int = 30, decay: float = 0.95, seed: int = 0) -> torch.Tensor:
    """An exponential average of low-rank batch statistics, like a real K-FAC factor."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, dim, dtype=torch.float64)
    factor = None
    for _ in range(steps):
        rows = torch.randn(batch, dim, generator=generator, dtype=torch.float64) * scales
        statistic = rows.T @ rows / batch
        factor = statistic if factor is None else decay * factor + (1 - decay) * statistic
    assert factor is not None
    return factor


ALL = [
    rkfac.ExactEigh(),
    rkfac.ExactEigh(rank=7),
    rkfac.RandomizedSVD(rank=7, oversample=5, power_iters=2),
    rkfac.SymmetricRandomizedEVD(rank=7, oversample=5, power_iters=2),
    rkfac.SymmetricRandomizedEVD(rank=7, oversample=0, power_iters=0),
]


@pytest.mark.parametrize("method", ALL, ids=repr)
def test_properties_orthonormal_nonnegative_sorted(method: Decomposition) -> None:
    factor = averaged_factor(40)
    pairs = method.decompose(factor, torch.Generator().manual_seed(0))
    k = pairs.rank
    assert pairs.vectors.shape == (40, k) and pairs.values.shape == (k,)
    torch.testing.assert_close(pairs.vectors.T @ pairs.vectors, torch.eye(k, dtype=factor.dtype))
    assert bool((pairs.values >= 0).all())
    assert bool((pairs.values[:-1] >= pairs.values[1:]).all())
    assert pairs.trace == pytest.approx(float(factor.trace()))
    assert pairs.top == pytest.approx(float(pairs.values[0]))
    if getattr(method, "power_iters", 1) > 0:  # q = 0 is a plain random subspace: no accuracy claim
        # Each returned pair is an eigenpair of the factor (up to the method's accuracy).
        residual = factor @ pairs.vectors - pairs.vectors * pairs.values
        assert float(residual.norm() / factor.norm()) < (1e-10 if isinstance(method, rkfac.ExactEigh) else 0.05)


def test_negative_rounding_eigenvalues_are_clamped_and_input_symmetrized() -> None:
    values = torch.tensor([3.0, 1.0, 0.0, -1e-9])
    factor = planted(values)
    factor[0, 1] += 1e-3  # asymmetry from accumulated rounding
    pairs = rkfac.ExactEigh().decompose(factor)
    assert bool((pairs.values >= 0).all())
    values, vectors = torch.linalg.eigh((factor + factor.T) / 2)
    expected = (vectors * values.clamp_min(0)) @ vectors.T
    torch.testing.assert_close(pairs.dense(), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls", RANDOMIZED)
@pytest.mark.parametrize("rank", [30, 100])
def test_rank_at_least_dim_reproduces_exact(cls: type, rank: int) -> None:
    factor = averaged_factor(30)
    exact = rkfac.ExactEigh().decompose(factor)
    pairs = cls(rank=rank, oversample=10, power_iters=1).decompose(factor, torch.Generator().manual_seed(1))
    torch.testing.assert_close(pairs.values, exact.values)
    torch.testing.assert_close(pairs.dense(), factor, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls", RANDOMIZED)
def test_sketch_as_wide_as_matrix_is_exact_truncation(cls: type) -> None:
    """rank < d ≤ rank + oversample: the exact top-r pairs."""
    factor = averaged_factor(30)
    pairs = cls(rank=25, oversample=10, power_iters=0).decompose(factor)
    exact = rkfac.ExactEigh(rank=25).decompose(factor)
    torch.testing.assert_close(pairs.dense(), exact.dense(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("cls", RANDOMIZED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_planted_decaying_spectrum_error_close_to_optimal(cls: type, dtype: torch.dtype) -> None:
    dim, rank = 300, 20
    values = 0.85 ** torch.arange(dim, dtype=torch.float64)
    factor = planted(values, seed=3, dtype=dtype)
    pairs = cls(rank=rank, oversample=10, power_iters=4).decompose(factor, torch.Generator().manual_seed(0))
    error = torch.linalg.matrix_norm(factor.double() - pairs.dense().double())
    optimal = values[rank:].pow(2).sum().sqrt()  # Eckart–Young: the best rank-r Frobenius error
    assert 0.999 * optimal <= error <= 1.05 * optimal, (float(error), float(optimal))
    torch.testing.assert_close(pairs.values.double(), values[:rank], rtol=1e-3 if dtype == torch.float32 else 1e-6, atol=1e-6)


def test_fewer_power_iterations_are_less_accurate_on_flat_spectrum() -> None:
    dim, rank = 200, 10
    values = 1.0 / (1 + torch.arange(dim, dtype=torch.float64))  # slow decay: power iterations matter
    factor = planted(values, seed=4)
    optimal = float(values[rank:].pow(2).sum().sqrt())
    errors = []
    for q in (0, 4):
        pairs = rkfac.SymmetricRandomizedEVD(rank=rank, oversample=5, power_iters=q).decompose(
            factor, torch.Generator().manual_seed(0)
        )
        errors.append(float(torch.linalg.matrix_norm(factor - pairs.dense())) / optimal)
    assert errors[1] < errors[0]
    assert errors[1] < 1.05


@pytest.mark.parametrize("cls", RANDOMIZED)
def test_same_generator_seed_same_result_bitwise(cls: type) -> None:
    factor = averaged_factor(60).float()
    method = cls(rank=5, oversample=3, power_iters=2)
    first = method.decompose(factor, torch.Generator().manual_seed(7))
    second = method.decompose(factor, torch.Generator().manual_seed(7))
    other = method.decompose(factor, torch.Generator().manual_seed(8))
    assert torch.equal(first.vectors, second.vectors) and torch.equal(first.values, second.values)
    assert not torch.equal(first.vectors, other.vectors)


def test_rank_schedule_callable() -> None:
    factor = averaged_factor(60)
    method = rkfac.SymmetricRandomizedEVD(rank=lambda step: 4 if step < 10 else 6, oversample=2, power_iters=1)
    assert method.decompose(factor, step=0).rank == 4
    assert method.decompose(factor, step=10).rank == 6
    bad = rkfac.SymmetricRandomizedEVD(rank=lambda step: 0)
    with pytest.raises(ValueError, match=r"rank \(at step 3\) must be >= 1, got 0"):
        bad.decompose(factor, step=3)


@pytest.mark.parametrize("cls", RANDOMIZED)
def test_bad_arguments_raise_value_error_naming_the_value(cls: type) -> None:
    with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
        cls(rank=0)
    with pytest.raises(ValueError, match="rank must be >= 1, got -3"):
        cls(rank=-3)
    with pytest.raises(ValueError, match="oversample must be >= 0, got -1"):
        cls(rank=5, oversample=-1)
    with pytest.raises(ValueError, match="power_iters must be >= 0, got -2"):
        cls(rank=5, power_iters=-2)
    with pytest.raises(ValueError, match=r"rank must be an integer, got 2\.5"):
        cls(rank=2.5)
    with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
        rkfac.ExactEigh(rank=0)
    with pytest.raises(ValueError, match=r"square matrix, got shape \(3, 4\)"):
        cls(rank=2).decompose(torch.zeros(3, 4))


def test_cost_model_orders_methods() -> None:
    dim = 4096
    exact = rkfac.ExactEigh().cost(dim)
    rsvd = rkfac.RandomizedSVD(rank=220, oversample=10, power_iters=4).cost(dim)
    sre = rkfac.SymmetricRandomizedEVD(rank=220, oversample=10, power_iters=4).cost(dim)
    assert rsvd == pytest.approx(2 * sre)
    assert exact > 10 * sre


@pytest.mark.parametrize("cls", RANDOMIZED)
def test_factor_of_rank_below_sketch_width_gives_finite_exact_result(cls: type) -> None:
    """An early factor of a small batch: rank 5 < k = 14. The top pairs are exact, the rest 0."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 60, generator=generator, dtype=torch.float64)
    factor = rows.T @ rows / 5
    pairs = cls(rank=10, oversample=4, power_iters=2).decompose(factor, torch.Generator().manual_seed(1))
    assert bool(torch.isfinite(pairs.vectors).all()) and bool(torch.isfinite(pairs.values).all())
    torch.testing.assert_close(pairs.dense(), factor, atol=1e-10, rtol=0)
    torch.testing.assert_close(pairs.values[5:], torch.zeros(5, dtype=torch.float64), atol=1e-10, rtol=0)


def test_sre_describes_the_symmetric_part_of_an_asymmetric_factor() -> None:
    """The Rayleigh–Ritz core is symmetrized: with a full-width subspace, SRE = eigh((X + Xᵀ)/2)."""
    factor = averaged_factor(40)
    factor[0, 1] += 1e-2
    method = rkfac.SymmetricRandomizedEVD(rank=30, oversample=0, power_iters=2)
    sketch = torch.randn(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pairs = method._sketched_top(factor, 30, sketch, method.power_iters)
    values = torch.linalg.eigvalsh((factor + factor.T) / 2).flip(0)[:30]
    torch.testing.assert_close(pairs[0], values)


# ---------------------------------------------------------------- warm start and adaptive rank (issue 8)


def slowly_changing_factors(d: int = 600) -> tuple[torch.Tensor, torch.Tensor]:
    """F₁ with eigenvalues 0.9^i, and F₂ = 0.95 F₁ + 0.05 S, S from 64 samples of N(0, F₁)."""
    g = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    lam = 0.9 ** torch.arange(d, dtype=torch.float64)
    first = (q * lam) @ q.T
    c = q @ (lam.sqrt()[:, None] * torch.randn(d, 64, generator=g, dtype=torch.float64))
    return first, 0.95 * first + 0.05 * c @ c.T / 64


@pytest.mark.parametrize("cls", [rkfac.SymmetricRandomizedEVD, rkfac.RandomizedSVD])
def test_warm_start_reaches_the_optimal_error_in_fewer_power_iterations(cls: type) -> None:
    first, second = slowly_changing_factors()
    r = 60
    optimal = float(torch.linalg.eigvalsh(second).flip(0)[r])  # λ_{r+1}: the best rank-r error

    def error(pairs: rkfac.Eigenpairs) -> float:
        return float(torch.linalg.matrix_norm(second - pairs.dense(), ord=2)) / optimal

    previous = cls(rank=r, power_iters=4).decompose(first, torch.Generator().manual_seed(5))

    def iterations_to(tolerance: float, warm: bool) -> int:
        for q in range(6):
            method = cls(rank=r, warm_start=True, warm_power_iters=q) if warm else cls(rank=r, power_iters=q)
            pairs = method.decompose(second, torch.Generator().manual_seed(3), previous=previous)
            if error(pairs) <= tolerance:
                return q
        return 6

    assert iterations_to(1.01, warm=True) < iterations_to(1.01, warm=False)
    if cls is rkfac.SymmetricRandomizedEVD:  # with no power at all SRE is a bare Rayleigh–Ritz on the sketch
        assert iterations_to(1.5, warm=True) == 0 < iterations_to(1.5, warm=False)


def test_a_cold_method_ignores_previous() -> None:
    first, second = slowly_changing_factors(200)
    previous = rkfac.ExactEigh(rank=20).decompose(first)
    method = rkfac.SymmetricRandomizedEVD(rank=20, power_iters=2)
    with_previous = method.decompose(second, torch.Generator().manual_seed(0), previous=previous)
    without = method.decompose(second, torch.Generator().manual_seed(0))
    assert torch.equal(with_previous.vectors, without.vectors) and not method.uses_previous


def planted_spectrum(d: int, above: int) -> torch.Tensor:
    """A PSD matrix with exactly ``above`` eigenvalues ≥ 10^-1.5 (of λ_max = 1), geometric decay."""
    values = torch.cat([torch.logspace(0, -1.4, above), torch.logspace(-1.6, -6, d - above)]).double()
    q = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)).Q
    return (q * values) @ q.T


def test_adaptive_rank_shrinks_to_the_planted_count_and_grows_when_cut_short() -> None:
    method = rkfac.SymmetricRandomizedEVD(rank=200, adaptive_rank=True, min_rank=16)
    factor = planted_spectrum(500, above=40)
    first = method.decompose(factor, torch.Generator().manual_seed(0))
    assert first.rank == 200  # no previous spectrum: the configured rank
    second = method.decompose(factor, torch.Generator().manual_seed(1), previous=first)
    assert second.rank == int(1.1 * 40) + 1  # smallest kept value just below 10^-1.5 λ_max
    assert second.values[39] >= 10**-1.5 * second.top > second.values[-1]
    assert method.decompose(factor, torch.Generator().manual_seed(2), previous=second).rank == second.rank  # stable

    wide = planted_spectrum(500, above=150)
    ranks = [16]
    previous = rkfac.ExactEigh(rank=16).decompose(wide)
    for seed in range(4):  # every kept value above the cut: grow by half each time, up to the count
        previous = method.decompose(wide, torch.Generator().manual_seed(seed), previous=previous)
        ranks.append(previous.rank)
    assert ranks == [16, 24, 36, 54, 81]
    small = planted_spectrum(500, above=3)
    previous = rkfac.ExactEigh(rank=200).decompose(small)
    assert method.decompose(small, torch.Generator().manual_seed(0), previous=previous).rank == 16  # floor: min_rank


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"warm_power_iters": -1}, "warm_power_iters must be >= 0"),
        ({"min_rank": 0}, "min_rank must be >= 1"),
        ({"threshold": 1.5}, "threshold must be < 1.0"),
        ({"warm_start": "yes"}, "warm_start must be True or False"),
    ],
)
def test_bad_options_beyond_the_paper_are_named(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rkfac.SymmetricRandomizedEVD(**options)
