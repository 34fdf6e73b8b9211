"""Spectrum analysis on matrices with known spectra, and the Weyl bound on synthetic averages."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rkfac
from rkfac.spectrum import exponential_average, factor_spectrum, layer_spectra, weyl_bound
from tests.oracles import grad_matrix, planted


def test_factor_spectrum_counts_and_errors_on_a_planted_spectrum() -> None:
    values = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05], dtype=torch.float64)
    spectrum = factor_spectrum(planted(values), ranks=(1, 3, 8), threshold=0.1)
    torch.testing.assert_close(spectrum.normalized, values / 8)
    assert spectrum.modes_above == 4  # 1, 0.5, 0.25, 0.125 > 0.1; 0.0625 is not
    total = float(values.pow(2).sum())
    assert spectrum.truncation_error[1] == pytest.approx(math.sqrt(total - 64) / math.sqrt(total))
    assert spectrum.truncation_error[3] == pytest.approx(math.sqrt(float(values[3:].pow(2).sum()) / total))
    assert spectrum.truncation_error[8] == pytest.approx(0.0, abs=1e-12)


def test_gradient_error_matches_dense_truncated_solve() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    pre = rkfac.KFACPreconditioner(model, factor_every=1)
    x, y = torch.randn(40, 10, dtype=torch.float64), torch.randint(0, 3, (40,))
    F.cross_entropy(model(x), y).backward()
    pre.step()  # factors now exist
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    report = layer_spectra(pre, ranks=(2, 11), damping=0.1)
    a, g = pre.factors()["0"]
    grad = grad_matrix(model[0])

    def dense(factor: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, float]:
        values, vectors = torch.linalg.eigh(factor)
        values, vectors = values.flip(0), vectors.flip(1)
        lam = 0.1 * float(values[0])
        keep = len(values) if rank is None else rank
        return vectors[:, :keep] @ torch.diag(values[:keep]) @ vectors[:, :keep].T + lam * torch.eye(
            len(values), dtype=torch.float64
        ), lam

    def direction(rank: int | None) -> torch.Tensor:
        (a_d, _), (g_d, _) = dense(a, rank), dense(g, rank)
        return torch.linalg.solve(a_d, torch.linalg.solve(g_d, grad).T).T

    exact = direction(None)
    for rank in (2, 11):
        expected = float((direction(rank) - exact).norm() / exact.norm())
        assert report["0"].gradient_error[rank] == pytest.approx(expected, rel=1e-6)
    assert report["0"].gradient_error[11] < report["0"].gradient_error[2]


def test_weyl_bound_holds_on_exponentially_averaged_low_rank_statistics() -> None:
    generator = torch.Generator().manual_seed(1)
    dim, rank, steps, decay = 80, 4, 25, 0.8
    scales = torch.logspace(0, -1, dim, dtype=torch.float64)
    statistics = []
    for _ in range(steps):
        rows = torch.randn(rank, dim, generator=generator, dtype=torch.float64) * scales
        statistics.append(rows.T @ rows / rank)
    average = exponential_average(statistics, decay)
    eigenvalues = torch.linalg.eigvalsh(average).flip(0).clamp_min(0)
    bound = weyl_bound(statistics, decay)
    assert bool((eigenvalues <= bound * (1 + 1e-9) + 1e-12).all())
    # The bound is loose: at the 10^-1.5 cut, the true spectrum sits far below it.
    looseness = bound[: steps * rank] / eigenvalues[: steps * rank].clamp_min(1e-300)
    assert float(looseness.min()) >= 1.0 - 1e-9
    assert float(looseness[rank * 5 :].median()) > 2.0


def test_weyl_bound_needs_statistics() -> None:
    with pytest.raises(ValueError, match="at least one statistic"):
        weyl_bound([], 0.9)
