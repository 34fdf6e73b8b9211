"""Per-factor damping λ_A, λ_G from the damping δ.

- "relative" (the randomized K-FACs' choice): λ_X = δ · λ_max(X), with λ_max the largest
  eigenvalue the decomposition returned. The damping follows the factor's scale, so the
  arbitrary overall scale of A and G (loss reduction, batch size) does not change the
  preconditioned direction's shape. A factor that is exactly zero falls back to λ_X = δ.
- "pi" (Martens & Grosse, factored Tikhonov): λ_A = π√δ, λ_G = √δ/π with
  π = sqrt((tr A / d_A) / (tr G / d_G)), so that λ_A λ_G = δ. If either trace is zero,
  π = 1.

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
