"""``nn.Linear``: rows are the inputs with every leading dimension flattened.

An input of shape (n, ..., d_in) is applied at T = the product of the dimensions between the
batch and the features (tokens): those are the shared positions of :mod:`rkfac.layers.base`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rkfac.layers.base import LayerKind, append_ones


class LinearKind(LayerKind):
    label = "Linear"
    online_updates = True

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def batch_first(self, tensor: Tensor, batch_dim: int) -> Tensor:
        """Inputs with shared dimensions (n, ..., d_in) may hold the samples elsewhere, e.g.
        (seq, n, d_in); the rows are the same set either way, only n and the per-sample grouping
        depend on it."""
        return tensor.movedim(batch_dim, 0) if batch_dim and tensor.dim() > 2 else tensor

    def position_shape(self, inputs: Tensor) -> torch.Size | None:
        return inputs.shape[:-1]

    def input_rows(self, inputs: Tensor) -> Tensor:
        rows = inputs.reshape(-1, inputs.shape[-1])
        return append_ones(rows) if self.has_bias else rows

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])

    def input_columns(self, inputs: Tensor) -> Tensor:
        batched = inputs if inputs.dim() > 1 else inputs.unsqueeze(0)
        columns = batched.reshape(batched.shape[0], -1, batched.shape[-1]).transpose(1, 2)
        if self.has_bias:
            columns = torch.cat([columns, columns.new_ones(columns.shape[0], 1, columns.shape[2])], dim=1)
        return columns

    def output_grad_columns(self, grad_output: Tensor) -> Tensor:
        batched = grad_output if grad_output.dim() > 1 else grad_output.unsqueeze(0)
        return batched.reshape(batched.shape[0], -1, batched.shape[-1]).transpose(1, 2)
