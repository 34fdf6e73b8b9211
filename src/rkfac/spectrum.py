"""Spectra of the Kronecker factors: why truncating them to rank r is safe (spec section 4).

All quantities come from an exact float64 eigendecomposition of the factors (analysis, not
the training hot path):

- the eigenvalues normalised by λ_max, sorted descending;
- the number of modes above a threshold (default 10^−1.5 λ_max, the paper's cut);
- the relative error of the rank-r truncation, ‖X − X_r‖_F / ‖X‖_F = sqrt(Σ_{i>r} λ_i²) / sqrt(Σ λ_i²);
- the relative error of the preconditioned gradient when both factors are truncated to rank r,
  ‖V_r − V‖_F / ‖V‖_F, with V = (G + λ_G I)⁻¹ ∇W (A + λ_A I)⁻¹ and the same dampings for both
  (relative damping uses λ_max, which truncation keeps).

:func:`weyl_bound` evaluates the bound that makes the decay plausible: an exponential average
F_k of statistics S_j of rank ≤ m satisfies λ_{s·m+1}(F_k) ≤ ρ^s · max_j ‖S_j‖₂, because the
newest s terms have rank ≤ s·m and the older ones weigh ρ^s in total (Weyl's inequality).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rkfac.damping import factor_dampings
from rkfac.decompositions import MODE_THRESHOLD
from rkfac.kfac import KFACPreconditioner
from rkfac.lowrank import Eigenpairs, kronecker_solve

DEFAULT_THRESHOLD = MODE_THRESHOLD  # the paper's cut, shared with the adaptive rank


@dataclass(frozen=True)
class FactorSpectrum:
    dim: int
    normalized: Tensor  # eigenvalues / λ_max, descending (float64)
    modes_above: int
    truncation_error: dict[int, float]  # rank -> relative Frobenius error of the rank-r truncation


@dataclass(frozen=True)
class LayerSpectrum:
    a: FactorSpectrum
    g: FactorSpectrum
    gradient_error: dict[int, float]  # rank -> relative error of the preconditioned gradient


def _exact_pairs(factor: Tensor, rank: int | None = None) -> Eigenpairs:
    symmetric = (factor.double() + factor.double().T) / 2
    values, vectors = torch.linalg.eigh(symmetric)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    if rank is not None:
        values, vectors = values[:rank], vectors[:, :rank]
    return Eigenpairs(vectors, values, float(symmetric.trace()), float(values[0]) if values.numel() else 0.0)


def factor_spectrum(factor: Tensor, ranks: Sequence[int] = (), threshold: float = DEFAULT_THRESHOLD) -> FactorSpectrum:
    """Normalised spectrum, modes above ``threshold``·λ_max, and rank-r truncation errors."""
    return _spectrum_of(_exact_pairs(factor).values, ranks, threshold)


def _spectrum_of(values: Tensor, ranks: Sequence[int], threshold: float) -> FactorSpectrum:
    top = float(values[0])
    normalized = values / top if top > 0 else values
    squares = values.pow(2)
    total = float(squares.sum())
    errors = {r: (float(squares[r:].sum()) / total) ** 0.5 if total > 0 else 0.0 for r in ranks}
    return FactorSpectrum(len(values), normalized, int((normalized > threshold).sum()), errors)


def _truncated(pairs: Eigenpairs, rank: int) -> Eigenpairs:
    return Eigenpairs(pairs.vectors[:, :rank], pairs.values[:rank], pairs.trace, pairs.top)


def layer_spectra(
    pre: KFACPreconditioner, ranks: Sequence[int] = (), threshold: float = DEFAULT_THRESHOLD, damping: float = 0.1
) -> dict[str, LayerSpectrum]:
    """Per preconditioned layer with factors: both factor spectra and the gradient error per rank.

    The gradient is the layer's current ``.grad`` (call it after a backward, before ``pre.step()``
    rewrites it); layers without a gradient get an empty ``gradient_error``. ``damping`` is δ,
    applied with the preconditioner's damping mode. Each factor is decomposed once (float64
    ``eigh``, the dominant cost: about a minute at d = 6000 on 2 cores) and truncated by slicing.
    """
    report = {}
    kinds = {layer.name: layer.kind for layer in pre.layers}
    for name, (a, g) in pre.factors().items():
        if a.dim() != 2:  # a diagonal factor (an embedding's A: its spectrum is its values) or blocks
            continue
        a_full, g_full = _exact_pairs(a), _exact_pairs(g)
        grad = kinds[name].grad_matrix()
        errors: dict[int, float] = {}
        if grad is not None:
            grad = grad.double()
            a_damping, g_damping = factor_dampings(pre.options.damping_mode, damping, a_full, g_full)
            exact = kronecker_solve(grad, g_full, g_damping, a_full, a_damping)
            for r in ranks:
                truncated = kronecker_solve(grad, _truncated(g_full, r), g_damping, _truncated(a_full, r), a_damping)
                errors[r] = float((truncated - exact).norm() / exact.norm())
        report[name] = LayerSpectrum(
            _spectrum_of(a_full.values, ranks, threshold), _spectrum_of(g_full.values, ranks, threshold), errors
        )
    return report


def exponential_average(statistics: Sequence[Tensor], decay: float) -> Tensor:
    """F₁ = S₁, F_k = ρ F_{k−1} + (1 − ρ) S_k (rkfac's convention: no identity start)."""
    average = statistics[0].double().clone()
    for statistic in statistics[1:]:
        average = decay * average + (1 - decay) * statistic.double()
    return average


def weyl_bound(statistics: Sequence[Tensor], decay: float, rank_per_step: int | None = None) -> Tensor:
    """Upper bounds on every eigenvalue of the exponential average of ``statistics``.

    Entry i (0-based) bounds λ_{i+1}(F_k): with s = ⌊i / m⌋ ≤ k − 1, λ_{s·m+1} ≤ ρ^s max_j ‖S_j‖₂
    (and eigenvalues only decrease with the index); past k·m modes (s = k) the bound is 0,
    since F_k has rank ≤ k·m. ``m`` is the largest rank among the statistics unless given.
    """
    if not statistics:
        raise ValueError("weyl_bound needs at least one statistic")
    dim = statistics[0].shape[0]
    m = rank_per_step or max(int(torch.linalg.matrix_rank(s.double(), hermitian=True)) for s in statistics)
    largest = max(float(torch.linalg.matrix_norm(s.double(), ord=2)) for s in statistics)
    blocks = torch.arange(dim, dtype=torch.float64).div(max(m, 1), rounding_mode="floor")
    bound = largest * decay**blocks
    bound[blocks >= len(statistics)] = 0.0
    return bound
