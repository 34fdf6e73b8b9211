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

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

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

    low_precision: ClassVar[bool] = True  # the solve's large products may run in bfloat16

    @property
    def dim(self) -> int:
        return self.vectors.shape[0]

    @property
    def rank(self) -> int:
        """k, the number of pairs kept."""
        return self.values.shape[0]

    def count_above(self, fraction: float) -> int:
        """The number of kept modes at or above ``fraction`` · λ_max."""
        return int((self.values >= fraction * self.top).sum())

    def to(self, device: torch.device | str | None = None) -> Eigenpairs:
        return Eigenpairs(self.vectors.to(device), self.values.to(device), self.trace, self.top)

    def dense(self) -> Tensor:
        """The d × d matrix the pairs represent (for tests and analysis, never on the hot path)."""
        return (self.vectors * self.values) @ self.vectors.T

    def inverse_left(self, matrix: Tensor, damping: float) -> Tensor:
        """``(X + λI)⁻¹ @ matrix``."""
        return damped_inverse_left(self, damping, matrix)

    def inverse_right(self, matrix: Tensor, damping: float) -> Tensor:
        """``matrix @ (X + λI)⁻¹``."""
        return damped_inverse_right(self, damping, matrix)


@dataclass(frozen=True)
class DiagonalFactor:
    """A diagonal factor ``X = diag(values)`` (an embedding's A: token frequencies), never formed.

    Its eigenpairs are the unit vectors, so it needs no decomposition; ``top`` and ``trace``
    serve the damping modes as for :class:`Eigenpairs`, and the damped inverse is a scaling:
    (X + λI)⁻¹ M scales row j of M by 1/(x_j + λ), O(d m) for a d × m matrix.
    """

    values: Tensor
    trace: float
    top: float

    low_precision: ClassVar[bool] = False  # nothing large to round: the solve is a scaling

    @classmethod
    def of(cls, values: Tensor) -> DiagonalFactor:
        return cls(values, float(values.sum()), float(values.max()) if values.numel() else 0.0)

    @property
    def dim(self) -> int:
        """d; every mode is kept, so this is also the rank."""
        return self.values.shape[0]

    rank = dim

    def to(self, device: torch.device | str | None = None) -> DiagonalFactor:
        return DiagonalFactor(self.values.to(device), self.trace, self.top)

    def dense(self) -> Tensor:
        return torch.diag(self.values)

    def inverse_left(self, matrix: Tensor, damping: float) -> Tensor:
        return matrix / (self.values + damping).unsqueeze(1)

    def inverse_right(self, matrix: Tensor, damping: float) -> Tensor:
        return matrix / (self.values + damping)


@dataclass(frozen=True)
class BlockEigenpairs:
    """B independent factors decomposed at once: ``X_b ≈ U_b diag(D_b) U_bᵀ`` for b = 1..B.

    The factors of a grouped convolution (one block per group, :mod:`rkfac.layers.grouped_conv`).
    ``vectors`` (B, d, k), ``values`` (B, k) (one rank k for every block, sorted descending and
    clamped at 0 per block), ``traces`` and ``tops`` (B,) float64 on the CPU: each block's trace
    and largest eigenvalue, read back once when decomposing so that the per-block dampings cost
    no device sync per step. The damped inverse applies block b's formula to block b of a
    (B, d, m) matrix, batched, with one λ_b per block (a (B,) tensor, or one float for all):

        (U_b D_b U_bᵀ + λ_b I)⁻¹ M_b = U_b [(D_b + λ_b)⁻¹ − λ_b⁻¹] U_bᵀ M_b + λ_b⁻¹ M_b.
    """

    vectors: Tensor
    values: Tensor
    traces: Tensor
    tops: Tensor

    low_precision: ClassVar[bool] = False  # small blocks: ``apply_dtype`` would gain nothing

    @property
    def blocks(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        """d, the width of each block."""
        return self.vectors.shape[1]

    @property
    def rank(self) -> int:
        """k, the pairs kept per block."""
        return self.values.shape[1]

    @property
    def trace(self) -> float:
        """The sum of the blocks' traces (the trace of the block-diagonal factor)."""
        return float(self.traces.sum())

    @property
    def top(self) -> float:
        """The largest eigenvalue over all blocks (NaN if any block's is)."""
        return float(self.tops.max()) if self.tops.numel() else 0.0

    def count_above(self, fraction: float) -> int:
        """The most modes any block has at or above ``fraction`` of its own λ_max."""
        if self.rank == 0:
            return 0
        tops = self.tops.to(self.values.device, self.values.dtype)
        return int((self.values >= fraction * tops.unsqueeze(1)).sum(1).max())

    def to(self, device: torch.device | str | None = None) -> BlockEigenpairs:
        return BlockEigenpairs(self.vectors.to(device), self.values.to(device), self.traces, self.tops)

    def dense(self) -> Tensor:
        """The (B, d, d) blocks the pairs represent (for tests and analysis)."""
        return (self.vectors * self.values.unsqueeze(1)) @ self.vectors.mT

    def _dampings(self, damping: Damping) -> Tensor:
        """λ as a (B, 1) column in the working dtype and device."""
        lam = torch.as_tensor(damping, dtype=torch.float64).expand(self.blocks)
        return lam.to(self.values.device, self.values.dtype).unsqueeze(1)

    def inverse_left(self, matrix: Tensor, damping: Damping) -> Tensor:
        """``(X_b + λ_b I)⁻¹ @ matrix_b`` for ``matrix`` of shape (B, d, m)."""
        lam = self._dampings(damping)
        projected = self.vectors.mT @ matrix
        projected *= _inverse_correction(self.values, lam).unsqueeze(2)
        return torch.baddbmm(matrix / lam.unsqueeze(2), self.vectors, projected)

    def inverse_right(self, matrix: Tensor, damping: Damping) -> Tensor:
        """``matrix_b @ (X_b + λ_b I)⁻¹`` for ``matrix`` of shape (B, m, d)."""
        lam = self._dampings(damping)
        projected = matrix @ self.vectors
        projected *= _inverse_correction(self.values, lam).unsqueeze(1)
        return torch.baddbmm(matrix / lam.unsqueeze(2), projected, self.vectors.mT)


#: One damping λ, or one per block (a (B,) tensor) for :class:`BlockEigenpairs`.
Damping = float | Tensor

#: What a factor's damped inverse is applied through.
FactorInverse = Eigenpairs | DiagonalFactor | BlockEigenpairs
# (λ_A, λ_G) of a layer's two decompositions, as the preconditioner damps them this step
DampingsOf = Callable[[FactorInverse, FactorInverse], tuple[Damping, Damping]]


def _inverse_correction(values: Tensor, damping: float | Tensor) -> Tensor:
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


def kronecker_solve(
    grad: Tensor,
    g_pairs: FactorInverse,
    g_damping: Damping,
    a_pairs: FactorInverse,
    a_damping: Damping,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """``V = (G + λ_G I)⁻¹ ∇W (A + λ_A I)⁻¹`` for ``grad`` = ∇W of shape (d_G, d_A).

    Cost O(d_G d_A (k_G + k_A)); memory O(d_G d_A + d k) beyond the inputs. With a
    ``compute_dtype`` narrower than ``grad``'s (bfloat16), the four d_G × d_A × k products
    run in it (see :func:`_kronecker_solve_low_precision`). Either factor may be a
    :class:`DiagonalFactor` (then the solve runs in the working dtype). With
    :class:`BlockEigenpairs` on both sides ``grad`` is (B, d_G, d_A), the dampings are per block,
    and the solve is block b's for each b, batched, in the working dtype.
    """
    if isinstance(g_pairs, BlockEigenpairs) or isinstance(a_pairs, BlockEigenpairs):
        if not (isinstance(g_pairs, BlockEigenpairs) and isinstance(a_pairs, BlockEigenpairs)):
            raise ValueError("a block Kronecker solve needs block eigenpairs on both sides")
        return a_pairs.inverse_right(g_pairs.inverse_left(grad, g_damping), a_damping)  # batched over blocks
    if isinstance(g_damping, Tensor) or isinstance(a_damping, Tensor):
        raise ValueError("per-block dampings (tensors) go with BlockEigenpairs only")
    if compute_dtype is None or compute_dtype == grad.dtype:
        return a_pairs.inverse_right(g_pairs.inverse_left(grad, g_damping), a_damping)
    if not (isinstance(g_pairs, Eigenpairs) and isinstance(a_pairs, Eigenpairs)):
        raise ValueError("a low-precision Kronecker solve needs eigenpairs on both sides, not a diagonal factor")
    return _kronecker_solve_low_precision(grad, g_pairs, g_damping, a_pairs, a_damping, compute_dtype)


def _kronecker_solve_low_precision(
    grad: Tensor, g_pairs: Eigenpairs, g_damping: float, a_pairs: Eigenpairs, a_damping: float, dtype: torch.dtype
) -> Tensor:
    """The Kronecker solve with its large products in ``dtype``, everything small in ``grad``'s.

    With α = 1/λ and E = (D + λ)⁻¹ − λ⁻¹ per factor, the solve expands to

        (α_G I + U_G E_G U_Gᵀ) V (α_A I + U_A E_A U_Aᵀ) = α_G α_A V + U_G X + Y U_Aᵀ,
        P = U_Gᵀ V,  Q = V U_A,  C = P U_A,
        X = E_G (α_A P + C E_A U_Aᵀ),  Y = α_G Q E_A.

    P and Q (two d_G d_A k products) and the rank-(k_G + k_A) product [U_G, Y] [X; U_Aᵀ] (one
    GEMM with twice the inner size) run in ``dtype``; C, X, Y (O(k² d)) and the term α_G α_A V
    stay in working precision. Rounding still enters through the correction terms: in bfloat16
    (2⁻⁹ per product) the relative error of the direction is 0.3–0.6% for a gradient spread
    over many modes, but where the gradient lies in the top modes the damped inverse cancels
    most of it, by up to (1 + λ_max/λ_G)(1 + λ_max/λ_A) = 121 at relative damping 0.1, so the
    worst case is about 121 · 2⁻⁹ ≈ 24% (a toy layer with a few dominant modes: 10%). It is an
    opt-in trade: on a CPU with AVX512-BF16 it halves the time of the step's largest phase.
    """
    work = grad.dtype
    u_g, u_a = g_pairs.vectors, a_pairs.vectors
    e_g = _inverse_correction(g_pairs.values, g_damping)
    e_a = _inverse_correction(a_pairs.values, a_damping)
    low_grad = grad.to(dtype)
    projected_left = (u_g.to(dtype).T @ low_grad).to(work)  # P
    projected_right = (low_grad @ u_a.to(dtype)).to(work)  # Q
    del low_grad
    core = projected_left @ u_a  # C
    x = (projected_left / a_damping + (core * e_a) @ u_a.T) * e_g.unsqueeze(1)
    y = projected_right * (e_a / g_damping)
    left = torch.cat([u_g, y], dim=1).to(dtype)
    right = torch.cat([x, u_a.T], dim=0).to(dtype)
    return torch.add(left @ right, grad, alpha=1.0 / (g_damping * a_damping)).to(work)
