"""Per-factor damping λ_A, λ_G from the damping δ.

- "relative" (the randomized K-FACs' choice): λ_X = δ · λ_max(X), with λ_max the largest
  eigenvalue the decomposition returned. The damping follows the factor's scale, so the
  arbitrary overall scale of A and G (loss reduction, batch size) does not change the
  preconditioned direction's shape. A factor that is exactly zero falls back to λ_X = δ.
- "pi" (Martens & Grosse, factored Tikhonov): λ_A = π√δ, λ_G = √δ/π with
  π = sqrt((tr A / d_A) / (tr G / d_G)), so that λ_A λ_G = δ. If either trace is zero,
  π = 1.
"""

from __future__ import annotations

import math

from rkfac.lowrank import FactorInverse

DAMPING_MODES = ("relative", "pi")


def factor_dampings(mode: str, damping: float, a_pairs: FactorInverse, g_pairs: FactorInverse) -> tuple[float, float]:
    """(λ_A, λ_G) for damping δ = ``damping`` > 0."""
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
