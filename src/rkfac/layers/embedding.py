"""``nn.Embedding``: A is diagonal (token frequencies), G dense (spec section 7).

In the matrix convention of :mod:`rkfac.layers.base` a lookup is ``W_mat @ onehot(index)`` with
W_mat = ``weight.T`` (d_G = embedding_dim, d_A = num_embeddings): each looked-up token is one row,
and its input row is the one-hot vector e_index. So

    S_A = Σ_rows e eᵀ / N = diag(count_j / N),      S_G = n Σ_rows g gᵀ   (mean loss),

and A is kept and applied as a vector (:class:`rkfac.lowrank.DiagonalFactor`): the solve
(G + λ_G I)⁻¹ ∇W (A + λ_A I)⁻¹ scales column j of ∇W by 1/(count_j/N + λ_A), O(vocab · d) per
step, never vocab². The tokens of a sample are its shared positions (K-FAC-expand); embeddings
use expand under ``kfac_approx="reduce"`` too, which keeps A diagonal.

``padding_idx``: its gradient column is zero, so its direction column stays zero, and its rows
(whose output does not depend on the weight) are left out of both statistics: A counts the other
tokens over their number, G sums the other rows' gradients (:meth:`EmbeddingKind.row_mask`), so
that heavy padding neither sets the relative damping δ·max A nor dilutes the factors.
``scale_grad_by_freq=True`` is not accepted either (the
gradient is rescaled per token after the backward our G statistics see, so the factors would not
match it). ``sparse=True`` embeddings are not accepted (their gradient is a sparse tensor; they are named as
unsupported), and SENG leaves embeddings to its plain g / (1 + λ) step (a per-sample gradient is
d × vocab).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rkfac.layers.base import LayerKind


class EmbeddingKind(LayerKind):
    label = "Embedding"
    diagonal_input = True
    per_sample = False
    module: nn.Embedding

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding) and not module.sparse and not module.scale_grad_by_freq

    @property
    def factor_dims(self) -> tuple[int, int]:
        return self.module.num_embeddings, self.module.embedding_dim

    def batch_first(self, tensor: Tensor, batch_dim: int) -> Tensor:
        """Indices (n, T, ...) or output gradients (n, T, ..., d) with the samples moved first."""
        token_dims = tensor.dim() - int(tensor.is_floating_point())  # gradients carry a feature dim
        return tensor.movedim(batch_dim, 0) if batch_dim and token_dims > 1 else tensor

    def samples(self, inputs: Tensor, batch_dim: int) -> int:
        """n: the first index dimension; a 1-D index tensor is n samples of one token each."""
        return self.batch_first(inputs, batch_dim).shape[0] if inputs.dim() else 1

    def row_mask(self, inputs: Tensor) -> Tensor | None:
        """The looked-up rows that depend on the weight: all but the ``padding_idx`` ones."""
        padding = self.module.padding_idx
        return None if padding is None else inputs.reshape(-1) != padding

    def position_shape(self, inputs: Tensor) -> torch.Size | None:
        return inputs.shape

    def input_tokens(self, inputs: Tensor, keep: Tensor | None = None) -> Tensor:
        """The looked-up tokens, one per row (the index of its one-hot input row), padding left
        out: in the order of :meth:`output_grad_rows` after :meth:`row_mask`. ``keep`` (flat,
        one per token) leaves out more rows: positions a mask left out, already combined with
        :meth:`row_mask`."""
        flat = inputs.reshape(-1)
        mask = self.row_mask(inputs) if keep is None else keep
        return flat if mask is None else flat[mask]

    def input_diagonal(self, inputs: Tensor, dtype: torch.dtype, keep: Tensor | None = None) -> tuple[Tensor, int]:
        """(Σ_rows e eᵀ as its diagonal, the number of rows N): token counts, padding (and the
        rows ``keep`` leaves out) left out."""
        flat = self.input_tokens(inputs, keep)
        return torch.bincount(flat, minlength=self.module.num_embeddings).to(dtype), flat.numel()

    def input_rows(self, inputs: Tensor) -> Tensor:
        raise NotImplementedError("an embedding's input rows are one-hot: use input_diagonal")

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])

    def input_columns(self, inputs: Tensor) -> Tensor:
        raise NotImplementedError("per-sample embedding gradients are d × vocab: SENG does not precondition embeddings")

    def output_grad_columns(self, grad_output: Tensor) -> Tensor:
        raise NotImplementedError("per-sample embedding gradients are d × vocab: SENG does not precondition embeddings")

    def grad_matrix(self) -> Tensor | None:
        """∇W_mat = ``weight.grad.T`` (embedding_dim × num_embeddings), a view."""
        grad = self.weight.grad
        return None if grad is None else grad.T

    def set_grad_matrix(self, matrix: Tensor) -> None:
        grad = self.weight.grad
        if grad is None:
            raise RuntimeError("set_grad_matrix needs the weight's gradient (grad_matrix returned None)")
        grad.copy_(matrix.T)
