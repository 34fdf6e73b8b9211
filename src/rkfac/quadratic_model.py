"""The local quadratic model of the loss and its exact curvature products (spec section 8).

With Δ the step direction, δ₀ the previous update, h the loss on the current batch, g its
gradient, C the batch's generalized Gauss–Newton matrix (GGN) and λ the damping,

    M(δ) = h + gᵀδ + ½ δᵀ (C + λI) δ.

For δ = αΔ + μδ₀ the model is a quadratic in (α, μ) with

    Q = [[Δᵀ(C+λ)Δ,  Δᵀ(C+λ)δ₀],        b = [gᵀΔ, gᵀδ₀],
         [δ₀ᵀ(C+λ)Δ, δ₀ᵀ(C+λ)δ₀]]

and its minimiser solves Q [α, μ]ᵀ = −b; the predicted change there is M(δ) − M(0) = ½ bᵀ[α, μ].

Curvature: the GGN, C = Jᵀ H J with J the Jacobian of the network's outputs in the parameters
and H the Hessian of the loss in the outputs. Why the GGN and not the Hessian: it is positive
semi-definite, so Q is positive definite for λ > 0 and the 2 × 2 solve always has a minimum,
and it is the matrix K-FAC approximates (for these losses it equals the true Fisher). Why
forward mode: vᵀCw = (Jv)ᵀ H (Jw) needs only Jv and Jw, one forward pass with a tangent each
(``torch.autograd.forward_ad``), about the cost of a forward and backward; a Hessian–vector
product by double backward costs about twice that and is indefinite.

Loss kinds (``LOSS_KINDS``; "mean" averages over samples, "sum" adds them):

- "cross_entropy": outputs are logits (..., C), targets class indices (...); every leading
  position is a sample row, as in ``F.cross_entropy``. Per row H = diag(p) − ppᵀ, p = softmax.
  A row whose target is ``IGNORE_INDEX`` (−100, F.cross_entropy's default ``ignore_index``, as
  padded positions of a sequence batch are marked) is left out, as F.cross_entropy leaves it:
  its loss does not depend on the outputs, so its H is 0, and a "mean" divides by the rows kept.
- "mse": the squared error summed over each sample's outputs, ‖y − t‖², then reduced over the
  samples (the first dimension). Per sample H = 2I. (This is the loss whose Gaussian the
  "mc" Fisher samples from, :mod:`rkfac.mc_fisher`.)

Attention: PyTorch's fused CPU attention kernels (flash, the default for
``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``) have no forward-mode
derivative, so every pass here runs attention through the math kernel (softmax of QKᵀ, then V),
whose derivative forward mode knows. Both losses of ρ use the same kernel, so the measured
change is not the difference of two kernels' roundings. Models without attention are unaffected.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

LOSS_KINDS = ("cross_entropy", "mse")
#: The cross-entropy target of a row left out of the loss (F.cross_entropy's default ignore_index).
IGNORE_INDEX = -100


@contextmanager
def differentiable_attention() -> Iterator[None]:
    """Scaled dot-product attention through the math kernel, which forward mode can differentiate
    (the fused CPU kernels cannot; module docstring)."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def loss_value(kind: str, outputs: Tensor, targets: Tensor, reduction: str = "mean", weights: Tensor | None = None) -> Tensor:
    """The loss of ``kind`` (see the module docstring), as the quadratic model assumes it.
    ``weights`` (one per sample, the first dimension): Σᵢ ωᵢ cᵢ instead, cᵢ sample i's part of
    the loss (:func:`per_sample`)."""
    if weights is not None:
        rows = _loss_rows(kind, outputs, targets)
        return (weights.double() * per_sample(rows, outputs.shape[0], reduction).double()).sum()
    if kind == "cross_entropy":
        kept = kept_rows(kind, targets)
        if kept is not None and reduction == "mean":  # as F.cross_entropy, but 0 (not NaN) when no row is kept
            return _loss_rows(kind, outputs, targets).sum() / kept.sum().clamp_min(1)
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), reduction=reduction)
    if kind == "mse":
        errors = _loss_rows(kind, outputs, targets)
        return errors.mean() if reduction == "mean" else errors.sum()
    raise ValueError(f"loss must be one of {LOSS_KINDS}, got {kind!r}")


def per_sample(rows: Tensor, samples: int, reduction: str) -> Tensor:
    """Each sample's part cᵢ of a value given per row (a row per leading position of the outputs,
    as the loss kinds count them): the batch's value is the mean of the cᵢ ("mean") or their sum
    ("sum"). Under "mean" a sample's rows are averaged (F.cross_entropy averages every row, and
    each sample has as many), under "sum" added."""
    grouped = rows.reshape(samples, -1)
    return grouped.mean(1) if reduction == "mean" else grouped.sum(1)


def kept_rows(kind: str, targets: Tensor | None) -> Tensor | None:
    """Which rows the loss keeps (a bool per row), None when it keeps every one: the
    cross-entropy leaves out the rows whose target is ``IGNORE_INDEX``."""
    if kind != "cross_entropy" or targets is None:
        return None
    kept = targets.reshape(-1) != IGNORE_INDEX
    return None if bool(kept.all()) else kept


def _loss_rows(kind: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """The loss per row: a cross-entropy per leading position (0 on a row left out), a squared
    error per sample."""
    if kind == "cross_entropy":
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), reduction="none")
    if kind == "mse":
        return (outputs - targets).pow(2).reshape(outputs.shape[0], -1).sum(1)
    raise ValueError(f"loss must be one of {LOSS_KINDS}, got {kind!r}")


def ggn_inner(
    kind: str,
    outputs: Tensor,
    left: Tensor,
    right: Tensor,
    reduction: str = "mean",
    weights: Tensor | None = None,
    targets: Tensor | None = None,
) -> Tensor:
    """vᵀ C w from the output tangents ``left`` = Jv and ``right`` = Jw (shaped like ``outputs``);
    with ``weights`` (one per sample) Σᵢ ωᵢ cᵢ, cᵢ sample i's part (:func:`per_sample`).
    ``targets`` (cross-entropy): the rows they mark ``IGNORE_INDEX`` are left out (H = 0 there)."""
    dtype = torch.promote_types(outputs.dtype, torch.float32)  # half precision outputs: in float32
    if kind == "cross_entropy":
        width = outputs.shape[-1]
        probs = F.softmax(outputs.reshape(-1, width).to(dtype), dim=-1)
        a, b = left.reshape(-1, width).to(dtype), right.reshape(-1, width).to(dtype)
        rows = (probs * a * b).sum(1) - (probs * a).sum(1) * (probs * b).sum(1)
    elif kind == "mse":
        rows = 2.0 * (left.to(dtype) * right.to(dtype)).reshape(outputs.shape[0], -1).sum(1)
    else:
        raise ValueError(f"loss must be one of {LOSS_KINDS}, got {kind!r}")
    kept = kept_rows(kind, targets)
    if kept is not None:
        rows = rows * kept.to(rows.device, rows.dtype)
    if weights is not None:
        return (weights.double() * per_sample(rows, outputs.shape[0], reduction).double()).sum()
    if reduction == "sum":
        return rows.sum()
    return rows.mean() if kept is None else rows.sum() / kept.sum().clamp_min(1)


def ggn_weights(outputs: Tensor, targets: Tensor | None = None) -> Tensor:
    """Per sample (the first dimension of ``outputs``, logits), the cross-entropy's trace of H
    summed over its rows, Σ_rows (1 − Σ_c p_c²): near 0 for a confidently classified sample,
    whose GGN part JᵀHJ is then near 0 too. (The squared error's H = 2I weighs every sample alike.)
    Rows that ``targets`` marks ``IGNORE_INDEX`` count 0 (their H is 0)."""
    dtype = torch.promote_types(outputs.dtype, torch.float32)
    probs = F.softmax(outputs.reshape(-1, outputs.shape[-1]).to(dtype), dim=-1)
    rows = 1.0 - probs.pow(2).sum(1)
    kept = kept_rows("cross_entropy", targets)
    if kept is not None:
        rows = rows * kept.to(rows.device, rows.dtype)
    return rows.reshape(outputs.shape[0], -1).sum(1)


def output_tangents(
    model: nn.Module, params: dict[str, Tensor], inputs: Sequence[Tensor], tangents: Sequence[dict[str, Tensor]]
) -> tuple[Tensor, list[Tensor]]:
    """The model's outputs at ``params`` and their directional derivatives J·t for each tangent.

    One forward-mode pass per tangent, in the module's current mode (train mode: batch norms
    use the batch's statistics). Buffers are passed as copies, so running statistics are not
    updated; run it under ``torch.no_grad()`` so that rkfac's capture hooks record nothing.
    Parameters missing from a tangent get a zero tangent.
    """
    outputs: Tensor | None = None
    derivatives = []
    for tangent in tangents:
        buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
        with forward_ad.dual_level():
            duals = {
                name: forward_ad.make_dual(value, tangent[name]) if name in tangent else value for name, value in params.items()
            }
            with differentiable_attention():
                result = functional_call(model, {**duals, **buffers}, tuple(inputs))
            primal, derivative = forward_ad.unpack_dual(result)
        outputs = primal if outputs is None else outputs
        derivatives.append(torch.zeros_like(primal) if derivative is None else derivative)
    if outputs is None:
        raise ValueError("output_tangents needs at least one tangent")
    return outputs, derivatives


def forward(model: nn.Module, params: dict[str, Tensor], inputs: Sequence[Tensor]) -> Tensor:
    """The model's outputs at ``params``, with copies of its buffers (running statistics stay put),
    attention through the same kernel as :func:`output_tangents`."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    with differentiable_attention():  # the kernel of output_tangents' primal, for ρ's two losses
        return functional_call(model, {**params, **buffers}, tuple(inputs))


@dataclass(frozen=True)
class QuadraticModel:
    """Q (``matrix``, k × k, k = 1 or 2) and b (``vector``, k) of M over the step's coefficients; float64."""

    matrix: Tensor
    vector: Tensor

    def minimiser(self, second_range: tuple[float, float] = (-math.inf, math.inf)) -> Tensor | None:
        """The coefficients minimising M, the second one (μ) kept in ``second_range``; None when
        Q is not positive definite or a value is not finite (the step is then skipped).

        M is convex, so when the free minimum has μ outside the range the constrained one lies
        on the nearest bound: μ there, and α = −(b₀ + Q₀₁ μ) / Q₀₀. A 2 × 2 system that is nearly
        singular (Δ and δ₀ nearly parallel) takes μ = 0 (or the bound nearest 0)."""
        q, b = self.matrix, self.vector
        if not (torch.isfinite(q).all() and torch.isfinite(b).all()) or q[0, 0] <= 0:
            return None
        if q.shape[0] == 1:
            return -b / q[0, 0]
        low, high = second_range
        determinant = q[0, 0] * q[1, 1] - q[0, 1] * q[1, 0]
        if q[1, 1] > 0 and determinant > 1e-10 * q[0, 0] * q[1, 1]:
            mu = float(torch.linalg.solve(q, -b)[1])
        else:
            mu = 0.0
        mu = min(max(mu, low), high)
        alpha = -(b[0] + q[0, 1] * mu) / q[0, 0]
        return torch.stack([alpha, torch.tensor(mu, dtype=q.dtype)])

    def change(self, coefficients: Tensor) -> float:
        """M(δ) − M(0) at ``coefficients``: bᵀc + ½ cᵀQc."""
        c = coefficients
        return float(self.vector @ c + 0.5 * c @ self.matrix @ c)


__all__ = [
    "IGNORE_INDEX",
    "LOSS_KINDS",
    "QuadraticModel",
    "forward",
    "ggn_inner",
    "ggn_weights",
    "kept_rows",
    "loss_value",
    "output_tangents",
    "per_sample",
]
