"""Dense references the tests compare rkfac with, and the small models they run on.

Every oracle here is computed without the code under test: from what autograd writes into
``.grad``, from ``torch.func`` per-sample gradients, or from dense float64 ``torch.linalg``
solves of the matrices the method only approximates. None of them imports a ``LayerKind``, a
decomposition or a preconditioner, so a test that compares rkfac with an oracle does not
compare rkfac with itself.

Shape conventions are those of :mod:`rkfac.layers.base`: a layer's weight as a (d_G, d_A)
matrix, the bias gradient as its last column.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

DTYPE = torch.float64


# ---------------------------------------------------------------- gradients, by hand and by torch.func


def with_ones(rows: Tensor) -> Tensor:
    """``rows`` (N, d) with a column of ones appended: the bias input of K-FAC's A rows."""
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)


def grad_matrix(layer: nn.Module) -> Tensor:
    """The layer's gradient as the (d_G, d_A) matrix of :mod:`rkfac.layers.base`, read straight from
    what autograd wrote (a new tensor, not a view): for a Linear or a convolution [∇W | ∇b],
    ``weight.grad`` as (c_out, rest) and ``bias.grad`` as the last column; for an Embedding, whose
    output is ``weight.T @ onehot(index)``, ``weight.grad.T``."""
    weight_grad = layer.weight.grad
    assert weight_grad is not None, f"{layer} has no weight gradient"
    if isinstance(layer, nn.Embedding):
        return weight_grad.T.clone()
    matrix = weight_grad.reshape(weight_grad.shape[0], -1)
    if layer.bias is None:
        return matrix.clone()
    assert layer.bias.grad is not None, f"{layer} has no bias gradient"
    return torch.cat([matrix, layer.bias.grad[:, None]], dim=1)


def grad_matrices(model: nn.Module) -> dict[str, Tensor]:
    """:func:`grad_matrix` of every Linear and Conv2d of ``model``, by qualified name."""
    return {name: grad_matrix(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def per_sample_grad_matrices(
    model: nn.Module,
    layer: nn.Module,
    x: Tensor,
    y: Tensor,
    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> Tensor:
    """(n, d_G, d_A): ∇ of each sample's own ``loss(model(x_i), y_i)`` w.r.t. the layer's [W | b].

    By ``torch.func`` (``vmap`` of ``grad`` over one-sample batches), so it needs no hooks and no
    knowledge of how a layer type lays out its rows: the definition of a per-sample gradient.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    prefix = next(name for name, module in model.named_modules() if module is layer)
    dot = f"{prefix}." if prefix else ""

    def loss_of_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    was_training = model.training
    model.eval()  # keeps the preconditioner's hooks out of the vmapped forward (no layer here depends on the mode)
    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, x, y)
    model.train(was_training)
    weight = grads[f"{dot}weight"].flatten(2)
    bias = grads.get(f"{dot}bias")
    return weight if bias is None else torch.cat([weight, bias.unsqueeze(2)], dim=2)


# ---------------------------------------------------------------- preconditioned directions, densely


def dense_kfac_direction(a: Tensor, g: Tensor, grad: Tensor, damping: float, mode: str = "relative") -> Tensor:
    """(G + λ_G I)⁻¹ ∇W (A + λ_A I)⁻¹ by dense float64 solves (no eigendecomposition, no low rank).

    ``mode="relative"``: λ = damping · the factor's largest eigenvalue, per factor;
    ``mode="pi"``: λ_A = π√damping, λ_G = √damping/π with π² = (tr A / d_A) / (tr G / d_G)
    (Martens & Grosse 2015, §6.3).
    """
    a, g, grad = a.double(), g.double(), grad.double()
    if mode == "relative":
        lam_a, lam_g = damping * float(torch.linalg.eigvalsh(a)[-1]), damping * float(torch.linalg.eigvalsh(g)[-1])
    else:
        pi = math.sqrt((float(a.trace()) / a.shape[0]) / (float(g.trace()) / g.shape[0]))
        lam_a, lam_g = pi * math.sqrt(damping), math.sqrt(damping) / pi
    left = torch.linalg.solve(g + lam_g * torch.eye(g.shape[0], dtype=DTYPE), grad)
    return torch.linalg.solve(a + lam_a * torch.eye(a.shape[0], dtype=DTYPE), left.T).T


def dense_seng_direction(u_rows: Tensor, g: Tensor, damping: float) -> Tensor:
    """(UᵀU + λI)⁻¹ vec(g), U = rows/√n (one row per sample's flattened gradient), solved densely in
    float64: SENG's damped empirical Fisher without the Woodbury identity or any sketch."""
    u = u_rows.double() / u_rows.shape[0] ** 0.5
    fisher = u.T @ u + damping * torch.eye(u.shape[1], dtype=DTYPE)
    return torch.linalg.solve(fisher, g.double().reshape(-1)).reshape(g.shape)


# ---------------------------------------------------------------- matrices with a known spectrum


def planted(values: Tensor, *, seed: int = 0, dtype: torch.dtype = DTYPE) -> Tensor:
    """Q diag(values) Qᵀ with a random orthogonal Q (QR of a seeded Gaussian): eigenvalues known."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=generator, dtype=dtype))
    return (q * values.to(dtype)) @ q.T


# ---------------------------------------------------------------- small fixtures


def mlp(seed: int = 0, dtype: torch.dtype = DTYPE, inplace: bool = False) -> nn.Sequential:
    """Linear 6→12, ReLU, Linear 12→12, ReLU, Linear 12→4 (layers "0", "2", "4"), seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 12), nn.ReLU(inplace=inplace), nn.Linear(12, 12), nn.ReLU(inplace=inplace), nn.Linear(12, 4)
    ).to(dtype)


def batch(seed: int, *, n: int = 16, dtype: torch.dtype = DTYPE) -> tuple[Tensor, Tensor]:
    """``n`` inputs of width 6 and labels in 0..3 for :func:`mlp`, from their own generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=generator, dtype=dtype), torch.randint(0, 4, (n,), generator=generator)


def saved_and_loaded(state: dict[str, object]) -> dict[str, object]:
    """``state`` through ``torch.save`` and ``torch.load(weights_only=True)``, as a checkpoint is."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def backward(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """Fresh gradients of the mean cross-entropy of ``model(x)`` against ``y``."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
