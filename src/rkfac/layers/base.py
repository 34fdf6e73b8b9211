"""What the curvature methods need to know about one layer type: :class:`LayerKind`.

A layer with weight W, viewed as a (d_G, d_A) matrix (rows: outputs; columns: the inputs the
weight multiplies, bias as the last column), is applied at T "shared" positions per sample
(T = 1 for a Linear layer on a matrix input; the tokens of a sequence; the output pixels of a
convolution). Every kind turns one forward input and one output gradient into the same two
shapes, fixed here once:

- rows (K-FAC, :mod:`rkfac.kfac`): ``input_rows`` (N, d_A), ``output_grad_rows`` (N, d_G),
  N = n·T, one row per (sample, position), a trailing 1 in each input row for the bias;
- per-sample columns (SENG, :mod:`rkfac.seng`): ``input_columns`` (n, d_A, T) and
  ``output_grad_columns`` (n, d_G, T), so that sample i's gradient is Gy_i X_iᵀ.

K-FAC's scaling of the statistics built from the rows (KFC, Grosse & Martens 2016, positions
summed): S_A = Σ_rows a aᵀ / N and S_G = n · Σ_rows g gᵀ for a loss that is a mean over the n
samples, Σ_rows g gᵀ / n for a sum. With a mean loss the per-sample output gradient is n·g,
so for Linear (T = 1) S_G is the mean over samples of δδᵀ, and for a convolution T times the
mean over (sample, position), so that A ⊗ G approximates the Fisher block with the positions
summed.

A layer of B independent blocks (a grouped convolution's groups, :mod:`.grouped_conv`) has
``block_shape`` (B,): its rows are (B, N, d_A) and (B, N, d_G), its gradient matrix
(B, d_G, d_A), ``factor_dims`` those of each block, and K-FAC keeps one (A, G) pair per block,
batched (statistics (B, d, d), :class:`rkfac.lowrank.BlockEigenpairs`).

A new layer type is one subclass (and its tests against an explicit computation): say which
modules it ``accepts``, and give the four row/column maps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn


class LayerKind(ABC):
    """One layer type's rows, columns and gradient matrix; instances wrap one module."""

    #: Short name shown by ``describe()``.
    label: ClassVar[str]
    #: Whether a batch statistic has at most one column per batch row (no shared positions in
    #: the usual case), so that B-KFAC may fold it in online (Linear: yes; convolutions: no).
    online_updates: ClassVar[bool] = False
    #: Whether the A factor is diagonal (one-hot input rows, an embedding): statistics come from
    #: :meth:`input_diagonal` and A is kept as a vector.
    diagonal_input: ClassVar[bool] = False
    #: Whether per-sample gradients (SENG's columns) are available at a reasonable size.
    per_sample: ClassVar[bool] = True

    def __init__(self, module: nn.Module) -> None:
        if not self.accepts(module):
            raise ValueError(f"{type(self).__name__} does not handle {module!r}")
        self.module = module

    @classmethod
    @abstractmethod
    def accepts(cls, module: nn.Module) -> bool:
        """Whether this kind handles ``module``."""

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight  # type: ignore[return-value]

    @property
    def bias(self) -> nn.Parameter | None:
        return getattr(self.module, "bias", None)  # an embedding has none

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def block_shape(self) -> tuple[int, ...]:
        """() for one Kronecker block; (B,) for a layer of B independent blocks (a grouped
        convolution's groups), whose rows, factors and gradient matrix then lead with B."""
        return ()

    @property
    def factor_dims(self) -> tuple[int, int]:
        """(d_A, d_G): the widths of the input-side and output-side factors (of each block)."""
        d_in = self.weight[0].numel()
        return d_in + int(self.has_bias), self.weight.shape[0]

    @property
    def statistics_dtype(self) -> torch.dtype:
        """float64 for a float64 layer, else float32 (autocast must not degrade statistics)."""
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    @staticmethod
    def sample_count(inputs: Tensor) -> int:
        """n: the first dimension of the layer input (1 for an unbatched input)."""
        return inputs.shape[0] if inputs.dim() > 1 else 1

    def batch_first(self, tensor: Tensor, batch_dim: int) -> Tensor:
        """``tensor`` (an input or output gradient) with its sample dimension first.

        ``batch_dim`` says where the samples are in inputs with shared dimensions (1 for the
        sequence-first layout of ``nn.Transformer*`` with ``batch_first=False``). Kinds whose
        inputs always lead with the batch (convolutions) ignore it.
        """
        return tensor

    def samples(self, inputs: Tensor, batch_dim: int) -> int:
        """n of one call: the size of the sample dimension (see :meth:`batch_first`)."""
        return self.sample_count(self.batch_first(inputs, batch_dim))

    def row_mask(self, inputs: Tensor) -> Tensor | None:
        """Which rows (in :meth:`output_grad_rows` order) depend on the weight; None: all of them."""
        return None

    def position_shape(self, inputs: Tensor) -> torch.Size | None:
        """The shape of the rows' positions in the (batch-first) ``inputs``, samples first, when
        each row is one input position (a Linear's (n, T, ..., d) input: (n, T, ...)); None when
        the rows are not the input's positions (a convolution's rows are its output positions).
        What :mod:`rkfac.kfac.positions` matches a position mask against."""
        return None

    def input_diagonal(self, inputs: Tensor, dtype: torch.dtype, keep: Tensor | None = None) -> tuple[Tensor, int]:
        """(diagonal of Σ_rows a aᵀ, the number of rows N), for kinds with ``diagonal_input``;
        ``keep``: the rows that count (flat), None: those of :meth:`row_mask`."""
        raise NotImplementedError(f"{type(self).__name__} has dense input rows")

    def input_tokens(self, inputs: Tensor, keep: Tensor | None = None) -> Tensor:
        """The index of each one-hot input row (N,), for kinds with ``diagonal_input``."""
        raise NotImplementedError(f"{type(self).__name__} has dense input rows")

    @abstractmethod
    def input_rows(self, inputs: Tensor) -> Tensor:
        """The A-statistic rows ``a`` (N, d_A) of one forward input."""

    @abstractmethod
    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        """The G-statistic rows ``g`` (N, d_G) of one gradient w.r.t. the layer output."""

    @abstractmethod
    def input_columns(self, inputs: Tensor) -> Tensor:
        """X: (n, d_A, T), each sample's input rows as columns, a row of ones for the bias."""

    @abstractmethod
    def output_grad_columns(self, grad_output: Tensor) -> Tensor:
        """Gy: (n, d_G, T), each sample's output gradient with positions as columns."""

    def parameters(self) -> list[nn.Parameter]:
        """The parameters holding this layer's weight and bias (a kind may own rows of a larger one)."""
        return [p for p in (self.weight, self.bias) if p is not None]

    def gradients(self) -> list[Tensor]:
        """This layer's present gradients (weight, bias), for the finiteness checks."""
        return [p.grad for p in self.parameters() if p.grad is not None]

    def divide_grad(self, divisor: float) -> None:
        """Divide this layer's gradients in place (SENG's damped step of a layer it has no curvature of)."""
        for grad in self.gradients():
            grad.div_(divisor)

    def install(self) -> Callable[[], None] | None:
        """Set up what the capture's hooks need beyond a forward hook on :attr:`module` (an attention
        module's routed forward); returns the undo, or None when there is nothing to set up."""
        return None

    def grad_matrix(self) -> Tensor | None:
        """∇W as a (d_G, d_A) matrix, bias gradient as the last column; None before any backward.

        A missing bias gradient (bias frozen or unused) counts as zero.
        """
        weight_grad = self.weight.grad
        if weight_grad is None:
            return None
        matrix = weight_grad.reshape(weight_grad.shape[0], -1)
        bias = self.bias
        if bias is None:
            return matrix
        bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
        return torch.cat([matrix, bias_grad.reshape(-1, 1)], dim=1)

    def set_grad_matrix(self, matrix: Tensor) -> None:
        """Write a (d_G, d_A) matrix back into ``.grad`` of the weight (and bias), in place."""
        weight_grad = self.weight.grad
        if weight_grad is None:
            raise RuntimeError("set_grad_matrix needs the weight's gradient (grad_matrix returned None)")
        d_in = weight_grad[0].numel()
        weight_grad.copy_(matrix[:, :d_in].reshape(weight_grad.shape))
        bias = self.bias
        if bias is not None and bias.requires_grad:
            if bias.grad is None:
                bias.grad = torch.zeros_like(bias)
            bias.grad.copy_(matrix[:, d_in])


def append_ones(rows: Tensor) -> Tensor:
    """``rows`` (N, d) with a column of ones appended: the bias input."""
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
