"""One layer's matrix U of per-sample gradients, as SENG uses it, exact or sketched.

SENG (spec section 5) needs three products with U, whose n rows are the per-sample gradients
divided by √n (each row a flattened (d_G, d_A) gradient matrix):

    gram()      ≈ U Uᵀ        (n × n), once per curvature rebuild
    project(g)  ≈ U vec(g)    (n,),    every step
    combine(w)  =  Uᵀ w       (d_G, d_A), every step

Two storage forms:

- :class:`ExplicitGradients` keeps U itself, (n, d_G·d_A). For small convolution layers,
  where a per-sample gradient sums T position terms and the factored form would be larger.
- :class:`FactoredGradients` keeps row i as a sum of p outer products, U_i = Σ_j g_ij a_ijᵀ,
  as two (n·p)-row tensors. Exact for Linear layers (p = 1) and for convolutions compressed to
  p = rank columns by :func:`rkfac.seng.per_sample.truncate`. Then ⟨U_i, U_k⟩ = Σ_jl (g_ij·g_kl)(a_ij·a_kl),
  so UUᵀ costs O((np)²(d_G + d_A)) instead of O(n² d_G d_A).

Column sampling (SENG's sketch for large layers): keep m_G of the d_G output rows and m_A of
the d_A input rows, drawn uniformly without replacement, each scaled by √(d/m). Every inner
product between two gradient matrices restricted to the sampled m_G × m_A coordinates is then
an unbiased estimate of the full one, so gram() and project() are unbiased and exact when
m = d. (The reference code scales by d/m on each side, which inflates both by d/m; rkfac uses
the unbiased √(d/m).) combine() always uses the full U: the direction lives in the full space.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


class PerSampleGradients(ABC):
    """U for one layer; ``samples`` = n, ``shape`` = (d_G, d_A) of one gradient matrix."""

    samples: int
    shape: tuple[int, int]

    @abstractmethod
    def gram(self) -> Tensor:
        """(n, n) ≈ U Uᵀ."""

    @abstractmethod
    def project(self, grad: Tensor) -> Tensor:
        """(n,) ≈ U vec(grad) for a (d_G, d_A) gradient matrix."""

    @abstractmethod
    def combine(self, weights: Tensor) -> Tensor:
        """Uᵀ weights as a (d_G, d_A) matrix."""

    @abstractmethod
    def tensors(self) -> dict[str, Tensor | None]:
        """Everything needed to rebuild this object (for state_dict)."""


class ExplicitGradients(PerSampleGradients):
    def __init__(self, rows: Tensor, shape: tuple[int, int]) -> None:
        self.rows, self.shape, self.samples = rows, shape, rows.shape[0]

    def gram(self) -> Tensor:
        return self.rows @ self.rows.T

    def project(self, grad: Tensor) -> Tensor:
        return self.rows @ grad.reshape(-1)

    def combine(self, weights: Tensor) -> Tensor:
        return (weights @ self.rows).view(self.shape)

    def tensors(self) -> dict[str, Tensor | None]:
        return {"rows": self.rows}


def sample_rows(dim: int, size: int, generator: torch.Generator, device: torch.device) -> Tensor | None:
    """``size`` distinct indices out of ``dim``, sorted; None when size ≥ dim (keep all)."""
    if size >= dim:
        return None
    chosen = torch.randperm(dim, generator=generator, device=generator.device)[:size]
    return chosen.sort().values.to(device)


class FactoredGradients(PerSampleGradients):
    """U_i = Σ_j g_ij a_ijᵀ from grad_columns (n, d_G, p) and input_columns (n, d_A, p).

    ``grad_index``/``input_index`` are the sampled rows (None: all); products used by gram()
    and project() see only those, scaled by √(d/m).
    """

    def __init__(
        self, grad_columns: Tensor, input_columns: Tensor, grad_index: Tensor | None = None, input_index: Tensor | None = None
    ) -> None:
        n, d_g, p = grad_columns.shape
        self.samples, self.terms, self.shape = n, p, (d_g, input_columns.shape[1])
        self.grad_index, self.input_index = grad_index, input_index
        # (n·p, d) layouts, term-major within a sample, made once per rebuild.
        self.grad_flat = grad_columns.transpose(1, 2).reshape(n * p, d_g)
        self.input_flat = input_columns.transpose(1, 2).reshape(n * p, self.shape[1])
        self.grad_sampled = _sampled(self.grad_flat, grad_index)
        self.input_sampled = _sampled(self.input_flat, input_index)

    def gram(self) -> Tensor:
        g, a = self.grad_sampled, self.input_sampled
        products = (g @ g.T).mul_(a @ a.T)
        n, p = self.samples, self.terms
        return products.view(n, p, n, p).sum((1, 3)) if p > 1 else products

    def project(self, grad: Tensor) -> Tensor:
        if self.grad_index is not None:
            grad = grad.index_select(0, self.grad_index) * math.sqrt(self.shape[0] / self.grad_index.numel())
        if self.input_index is not None:
            grad = grad.index_select(1, self.input_index) * math.sqrt(self.shape[1] / self.input_index.numel())
        # (U g)_i = Σ_j g_ijᵀ grad a_ij
        per_term = ((self.grad_sampled @ grad) * self.input_sampled).sum(1)
        return per_term.view(self.samples, self.terms).sum(1) if self.terms > 1 else per_term

    def combine(self, weights: Tensor) -> Tensor:
        per_term = weights.repeat_interleave(self.terms) if self.terms > 1 else weights
        return (self.grad_flat.T * per_term) @ self.input_flat

    def tensors(self) -> dict[str, Tensor | None]:
        n, p = self.samples, self.terms
        return {
            "grad_columns": self.grad_flat.view(n, p, -1).transpose(1, 2),
            "input_columns": self.input_flat.view(n, p, -1).transpose(1, 2),
            "grad_index": self.grad_index,
            "input_index": self.input_index,
        }


def _sampled(flat: Tensor, index: Tensor | None) -> Tensor:
    if index is None:
        return flat
    return flat.index_select(1, index) * math.sqrt(flat.shape[1] / index.numel())


def from_tensors(tensors: dict[str, Tensor | None], shape: tuple[int, int]) -> PerSampleGradients:
    """Inverse of ``tensors()``."""
    rows = tensors.get("rows")
    if rows is not None:
        return ExplicitGradients(rows, shape)
    grad_columns, input_columns = tensors["grad_columns"], tensors["input_columns"]
    assert grad_columns is not None and input_columns is not None
    return FactoredGradients(grad_columns, input_columns, tensors.get("grad_index"), tensors.get("input_index"))
