"""Which samples of the batch the adaptive step's quadratic model is measured on, and how they
are weighted (:mod:`rkfac.adaptive`).

The model's curvature terms vᵢᵀCvⱼ and ρ's losses are batch means (or sums) of per-sample parts
cₛ (:func:`rkfac.quadratic_model.per_sample`); each forward-mode pass costs about a forward
and backward of the samples it sees, so they are estimated from m of the batch's n samples.

- ``"first"``: the batch's first m samples (the batch is a random draw, so they are a random
  subset), each with weight 1/m under "mean" (the subset's own mean), n/m under "sum".
- ``"importance"`` (cross-entropy): m draws with replacement, sample s with probability
  qₛ = (1 − β) wₛ / Σw + β / n, wₛ = Σ_rows (1 − Σ_c p_c²) the trace of its H
  (:func:`rkfac.quadratic_model.ggn_weights`, p from the training's own forward pass), each
  draw weighted ωₖ = 1 / (m n q_{sₖ}) under "mean" (1 / (m q_{sₖ}) under "sum"). Then
  E[Σₖ ωₖ c_{sₖ}] = Σₛ qₛ · m · cₛ / (m n qₛ) = (1/n) Σₛ cₛ: unbiased for any q with every
  qₛ > 0, which the uniform share β = ``UNIFORM_SHARE`` guarantees (so probabilities from a stale
  or mismatched forward cost variance, never bias). Why the trace: a confidently classified
  sample has H = diag(p) − ppᵀ ≈ 0, so its parts are ≈ 0, and a uniform subset spends most of its
  samples on them late in training. Measured on the quick MLP's batches
  (``benchmarks/curvature_sampling.py``, BENCHMARKS.md): the standard error of ΔᵀCΔ from 64
  importance draws is 0.95–1.31× that of 128 first samples once the loss is below 0.5 (2× at
  initialisation, where every sample is uncertain and the draws only lose the 128's share).

Rows left out of the cross-entropy (target ``IGNORE_INDEX``, a sequence's padding) have cᵣ = 0
and weigh 0 in wₛ. A "mean" then divides by the N rows kept, not by all n R of the batch (R
rows per sample), so each draw's weight is multiplied by n R / N: Σₖ ωₖ c_{sₖ} still estimates
the batch's value. The first m samples under "mean" divide by their own kept rows, as
F.cross_entropy on them would (a ratio estimate, as their plain mean is without padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rkfac.quadratic_model import ggn_weights, kept_rows

#: β: the uniform part of the importance distribution (every qₛ ≥ β / n).
UNIFORM_SHARE = 0.1

SAMPLINGS = ("first", "importance")


@dataclass(frozen=True)
class CurvatureSample:
    """The samples the model is measured on. ``weights`` (one per sample, on the samples'
    device): the estimate is Σₖ ωₖ cₖ; None: the samples' own reduction times ``scale`` (the
    batch is used whole, or its first m under "mean", where the subset's mean is the estimate)."""

    inputs: list[Tensor]
    targets: Tensor
    weights: Tensor | None = None
    scale: float = 1.0


def first_samples(inputs: Sequence[Tensor], targets: Tensor, count: int, batch_dim: int, reduction: str) -> CurvatureSample:
    """The batch's first ``count`` samples along ``batch_dim`` (all of it when it has no more).
    A summed loss is scaled by n / m: the gradient is the whole batch's sum, so its curvature
    and losses must be too."""
    n = inputs[0].shape[batch_dim]
    if count >= n:
        return CurvatureSample(list(inputs), targets)
    scale = n / count if reduction == "sum" else 1.0
    return CurvatureSample([x.narrow(batch_dim, 0, count) for x in inputs], targets.narrow(batch_dim, 0, count), scale=scale)


def importance_samples(
    inputs: Sequence[Tensor], targets: Tensor, outputs: Tensor, count: int, reduction: str, generator: torch.Generator
) -> CurvatureSample:
    """``count`` draws of the batch's samples (dimension 0) with probability q (module
    docstring) from the training forward's ``outputs`` (cross-entropy logits), and their weights ω."""
    n = inputs[0].shape[0]
    trace = ggn_weights(outputs.detach(), targets).double().cpu()
    total = float(trace.sum())
    q = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if total > 0 and torch.isfinite(trace).all():
        q = (1 - UNIFORM_SHARE) * trace / total + UNIFORM_SHARE / n
    draws = torch.multinomial(q, count, replacement=True, generator=generator)
    weights = 1.0 / (count * q[draws])
    if reduction == "mean":
        weights = weights / n
        kept = kept_rows("cross_entropy", targets)
        if kept is not None:  # the mean is over the kept rows (module docstring)
            weights = weights * (kept.numel() / max(int(kept.sum()), 1))
    device = inputs[0].device
    index = draws.to(device)
    return CurvatureSample(
        [x.index_select(0, index) for x in inputs], targets.index_select(0, index.to(targets.device)), weights.to(device)
    )


__all__ = ["SAMPLINGS", "UNIFORM_SHARE", "CurvatureSample", "first_samples", "importance_samples"]
