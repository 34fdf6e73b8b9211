"""SENG (Yang et al. 2021), the comparison method: the preconditioner and its per-sample gradients."""

from rkfac.seng.preconditioner import SENGPreconditioner

__all__ = ["SENGPreconditioner"]
