"""Per-sample gradients of a layer from one forward input and one output gradient (SENG's U).

For a layer whose weight is viewed as a (d_G, d_A) matrix (bias as the last column, the same
view as :mod:`rkfac.layers.base`), the gradient that sample i contributes is a sum over the T
positions at which the weight is applied (T = 1 for a Linear layer on a matrix input, the
output pixels for a convolution):

    ∇W_i = Σ_t g_{i,t} a_{i,t}ᵀ = Gy_i X_iᵀ,   Gy_i ∈ R^{d_G × T},  X_i ∈ R^{d_A × T}

where a_{i,t} is the input row (a patch for a convolution, with a trailing 1 for the bias)
and g_{i,t} the gradient of the loss with respect to the output at that position. The
layer's kind gives the pair (Gy, X) as batched tensors, (n, d_G, T) and (n, d_A, T): the
"factored" form, never looping over samples. ``explicit`` multiplies the pair out into the
(n, d_G·d_A) matrix of flattened per-sample gradients; ``truncate`` keeps the top ``rank``
singular directions of each Gy_i (SENG's compression of convolution output-gradient maps).

Scaling: with a loss that is a mean over the n samples, the output gradient autograd gives is
1/n of the per-sample loss gradient, so ``scale`` = n recovers per-sample gradients of each
sample's own loss; with a sum loss, ``scale`` = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rkfac.layers import LayerKind


def per_sample_factors(layer: LayerKind, inputs: Tensor, grad_output: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(scale · Gy, X) with ∇W_i = scale · Gy_i X_iᵀ; see the module docstring."""
    return layer.output_grad_columns(grad_output) * scale, layer.input_columns(inputs)


def explicit(grad_columns: Tensor, input_cols: Tensor) -> Tensor:
    """The flattened per-sample gradients, (n, d_G·d_A), row i = vec(Gy_i X_iᵀ) (row-major)."""
    return torch.bmm(grad_columns, input_cols.transpose(1, 2)).flatten(1)


def truncate(grad_columns: Tensor, input_cols: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Replace each Gy_i by its best rank-``rank`` approximation, in factored form.

    Gy_i ≈ P_i S_i Q_iᵀ (top singular triplets), so Gy_i X_iᵀ ≈ (P_i S_i)(X_i Q_i)ᵀ: the pair
    shrinks from T columns to ``rank``. Pairs with T ≤ rank are returned unchanged (exact).
    """
    if grad_columns.shape[2] <= rank:
        return grad_columns, input_cols
    left, singular, right_t = torch.linalg.svd(grad_columns, full_matrices=False)
    kept_grad = left[:, :, :rank] * singular[:, None, :rank]
    kept_input = input_cols @ right_t[:, :rank, :].transpose(1, 2)
    return kept_grad, kept_input
