"""Per-factor damping λ_A, λ_G from the damping δ.

- "relative" (the randomized K-FACs' choice): λ_X = δ · λ_max(X), with λ_max the largest
  eigenvalue the decomposition returned. The damping follows the factor's scale, so the
  arbitrary overall scale of A and G (loss reduction, batch size) does not change the
  preconditioned direction's shape. A factor that is exactly zero falls back to λ_X = δ.
- "pi" (Martens & Grosse, factored Tikhonov): λ_A = π√δ, λ_G = √δ/π with
  π = sqrt((tr A / d_A) / (tr G / d_G)), so that λ_A λ_G = δ. If either trace is zero,
  π = 1.

With ``damping_scale="tikhonov"`` (the adaptive step, :mod:`rkfac.adaptive`) δ is instead the
Tikhonov term λ of the damped curvature A ⊗ G + λI, and both modes split it so that
λ_A λ_G = λ (the I ⊗ I coefficient of (A + λ_A I) ⊗ (G + λ_G I), Martens & Grosse section 6.3):
"pi" as above (it already does), "relative" with π = sqrt(λ_max(A) / λ_max(G)), i.e. the
relative rule with δ_rel = sqrt(λ / (λ_max(A) λ_max(G))) per layer, so the damping keeps
following each factor's scale.

Block factors (:class:`rkfac.lowrank.BlockEigenpairs`, a grouped convolution's groups) get the
same rule per block, from each block's own λ_max or traces, as B separate layers would: the
dampings are then (B,) float64 tensors, computed on the CPU from the values read back at the
decomposition (no device sync).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rkfac.lowrank import BlockEigenpairs, Damping, FactorInverse

DAMPING_MODES = ("relative", "pi")
DAMPING_SCALES = ("factor", "tikhonov")


def factor_dampings(mode: str, damping: float, a_pairs: FactorInverse, g_pairs: FactorInverse) -> tuple[Damping, Damping]:
    """(λ_A, λ_G) for damping δ = ``damping`` > 0: floats, or (B,) tensors for block factors."""
    if isinstance(a_pairs, BlockEigenpairs) and isinstance(g_pairs, BlockEigenpairs):
        return _block_dampings(mode, damping, a_pairs, g_pairs)
    if isinstance(a_pairs, BlockEigenpairs) or isinstance(g_pairs, BlockEigenpairs):
        raise ValueError("block factors need block factors on the other side too")
    if mode == "relative":
        return _relative(damping, a_pairs.top), _relative(damping, g_pairs.top)
    if mode == "pi":
        a_mean, g_mean = a_pairs.trace / a_pairs.dim, g_pairs.trace / g_pairs.dim
        pi = math.sqrt(a_mean / g_mean) if a_mean > 0 and g_mean > 0 else 1.0
        root = math.sqrt(damping)
        return pi * root, root / pi
    raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {mode!r}")


def tikhonov_dampings(
    mode: str, damping: float, a_pairs: FactorInverse, g_pairs: FactorInverse, floor: float = 0.0
) -> tuple[Damping, Damping]:
    """(λ_A, λ_G) with λ_A λ_G = ``damping`` (the Tikhonov λ), split as ``mode`` says, each then
    raised to at least ``floor`` · λ_max of its factor (see :func:`floored`)."""
    a_damping, g_damping = _tikhonov_split(mode, damping, a_pairs, g_pairs)
    if floor <= 0:
        return a_damping, g_damping
    return floored(a_damping, floor, a_pairs), floored(g_damping, floor, g_pairs)


def floored(damping: Damping, floor: float, pairs: FactorInverse) -> Damping:
    """``damping`` raised to ``floor`` · λ_max(X) (per block for block factors).

    Why a floor: a truncated decomposition treats the discarded modes as 0, so they see only the
    damping, and the solve scales them by 1/λ_X. With λ adapted by Levenberg–Marquardt alone, λ
    keeps shrinking while the quadratic model predicts well (ρ ≈ 1); on fashion-autoencoder it
    reached its minimum (10⁻⁸) by epoch 2, the direction became the discarded modes amplified
    10⁸-fold, α fell to 10⁻⁸ and the loss jumped from 10 to 38 (BENCHMARKS.md, issue 20).
    """
    if isinstance(pairs, BlockEigenpairs):
        tops = pairs.tops
        return torch.maximum(torch.as_tensor(damping, dtype=tops.dtype), floor * tops)
    return max(float(damping), floor * pairs.top)


def _tikhonov_split(mode: str, damping: float, a_pairs: FactorInverse, g_pairs: FactorInverse) -> tuple[Damping, Damping]:
    if mode == "pi":
        return factor_dampings(mode, damping, a_pairs, g_pairs)
    if mode != "relative":
        raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {mode!r}")
    if isinstance(a_pairs, BlockEigenpairs) and isinstance(g_pairs, BlockEigenpairs):
        products = a_pairs.tops * g_pairs.tops
        shares = torch.where(products > 0, (damping / torch.where(products > 0, products, 1.0)).sqrt(), math.sqrt(damping))
        return _relative_blocks_by(shares, a_pairs.tops), _relative_blocks_by(shares, g_pairs.tops)
    if isinstance(a_pairs, BlockEigenpairs) or isinstance(g_pairs, BlockEigenpairs):
        raise ValueError("block factors need block factors on the other side too")
    product = a_pairs.top * g_pairs.top
    share = math.sqrt(damping / product) if product > 0 else math.sqrt(damping)
    return _relative(share, a_pairs.top), _relative(share, g_pairs.top)


def _relative_blocks_by(shares: Tensor, tops: Tensor) -> Tensor:
    return torch.where(tops > 0, shares * tops, shares)


def _relative(damping: float, top: float) -> float:
    return damping * top if top > 0 else damping


def _block_dampings(mode: str, damping: float, a_pairs: BlockEigenpairs, g_pairs: BlockEigenpairs) -> tuple[Tensor, Tensor]:
    """The rules above, per block, on the blocks' (B,) float64 ``tops`` and ``traces``."""
    if mode == "relative":
        return _relative_blocks(damping, a_pairs.tops), _relative_blocks(damping, g_pairs.tops)
    if mode == "pi":
        a_mean, g_mean = a_pairs.traces / a_pairs.dim, g_pairs.traces / g_pairs.dim
        both = (a_mean > 0) & (g_mean > 0)
        pi = torch.where(both, (a_mean / torch.where(both, g_mean, 1.0)).sqrt(), 1.0)
        root = math.sqrt(damping)
        return pi * root, root / pi
    raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {mode!r}")


def _relative_blocks(damping: float, tops: Tensor) -> Tensor:
    return torch.where(tops > 0, damping * tops, torch.full_like(tops, damping))
