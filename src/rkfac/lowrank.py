"""Low-rank eigenpairs of a Kronecker factor and the damped inverse applied through them.

Shape convention (used throughout rkfac): a layer's gradient in matrix form is
``M`` of shape ``(d_G, d_A)``: rows index the layer outputs, columns its inputs, with the
bias gradient as the last column. The G factor acts on the left, the A factor on the right.

A decomposition returns ``X ≈ U diag(D) Uᵀ`` with ``U`` (d × k) orthonormal and ``D ≥ 0``
sorted descending. The discarded part of the spectrum is treated as zero, so with damping λ

    (U D Uᵀ + λI)⁻¹ M = U [(D + λ)⁻¹ − λ⁻¹] Uᵀ M + λ⁻¹ M.

This costs O(d k m) for a d × m matrix ``M`` and never forms a d × d matrix. The exact
eigendecomposition is the case k = d of the same formula, so every method shares this code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Eigenpairs:
    """``X ≈ vectors @ diag(values) @ vectors.T`` for a symmetric PSD factor ``X``.

    ``values`` are sorted descending and clamped at zero; ``vectors`` has orthonormal
    columns. ``trace`` is the trace of the full factor that was decomposed (not of the
    truncation): "pi" damping needs it. ``top`` is the largest eigenvalue as a Python float
    (read once when decomposing, so that relative damping costs no device sync per step).
    """

    vectors: Tensor
    values: Tensor
    trace: float
    top: float

    @property
    def dim(self) -> int:
        return self.vectors.shape[0]

    @property
    def rank(self) -> int:
        return self.values.shape[0]

    def to(self, device: torch.device | str | None = None) -> Eigenpairs:
        return Eigenpairs(self.vectors.to(device), self.values.to(device), self.trace, self.top)

    def dense(self) -> Tensor:
        """The d × d matrix the pairs represent (for tests and analysis, never on the hot path)."""
        return (self.vectors * self.values) @ self.vectors.T


def _inverse_correction(values: Tensor, damping: float) -> Tensor:
    """``(D + λ)⁻¹ − λ⁻¹``, written as ``−D / (λ (D + λ))`` to avoid cancellation."""
    return -values / (damping * (values + damping))


def damped_inverse_left(pairs: Eigenpairs, damping: float, matrix: Tensor) -> Tensor:
    """``(U D Uᵀ + λI)⁻¹ @ matrix`` for ``matrix`` of shape (d, m)."""
    projected = pairs.vectors.T @ matrix
    projected *= _inverse_correction(pairs.values, damping).unsqueeze(1)
    return torch.addmm(matrix, pairs.vectors, projected, beta=1.0 / damping)


def damped_inverse_right(pairs: Eigenpairs, damping: float, matrix: Tensor) -> Tensor:
    """``matrix @ (U D Uᵀ + λI)⁻¹`` for ``matrix`` of shape (m, d)."""
    projected = matrix @ pairs.vectors
    projected *= _inverse_correction(pairs.values, damping).unsqueeze(0)
    return torch.addmm(matrix, projected, pairs.vectors.T, beta=1.0 / damping)


def kronecker_solve(grad: Tensor, g_pairs: Eigenpairs, g_damping: float, a_pairs: Eigenpairs, a_damping: float) -> Tensor:
    """``V = (G + λ_G I)⁻¹ ∇W (A + λ_A I)⁻¹`` for ``grad`` = ∇W of shape (d_G, d_A).

    Cost O(d_G d_A (k_G + k_A)); memory O(d_G d_A + d k) beyond the inputs.
    """
    return damped_inverse_right(a_pairs, a_damping, damped_inverse_left(g_pairs, g_damping, grad))
