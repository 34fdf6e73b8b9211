"""``nn.Conv1d`` with groups = 1: Conv2d with one spatial axis (spec section 7).

Rows are the input patches, one per (sample, output position): N = n·L_out, row length
c_in·k in the order of ``weight.reshape(c_out, -1)``, so that patch · W-row is the convolution at
that position; the positions are the shared dimension, as for Conv2d (KFC scaling).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from rkfac.layers.convolution import ConvolutionKind


class Conv1dKind(ConvolutionKind):
    module: nn.Conv1d
    label, module_type, spatial = "Conv1d", nn.Conv1d, 1

    def _patch_view(self, inputs: Tensor) -> Tensor:
        """The patches as a strided view (n, L_out, c_in, k) of the input padded as the layer pads it."""
        module = self.module
        x = self._padded(inputs)
        n, channels, length = x.shape
        (k,), (s,), (d,) = module.kernel_size, module.stride, module.dilation
        out = (length - d * (k - 1) - 1) // s + 1
        s_n, s_c, s_l = x.stride()
        return x.as_strided((n, out, channels, k), (s_n, s_l * s, s_c, s_l * d), x.storage_offset())

    def input_rows(self, inputs: Tensor) -> Tensor:
        patches = self._patch_view(inputs)
        rows = patches.reshape(-1, patches.shape[2] * patches.shape[3])
        if self.has_bias:
            rows = F.pad(rows, (0, 1), value=1.0)
        return rows

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        batched = grad_output.unsqueeze(0) if grad_output.dim() == 2 else grad_output
        return batched.transpose(1, 2).reshape(-1, batched.shape[1])

    def input_columns(self, inputs: Tensor) -> Tensor:
        patches = self._patch_view(inputs)
        columns = patches.reshape(patches.shape[0], patches.shape[1], -1).transpose(1, 2)
        if self.has_bias:
            columns = F.pad(columns, (0, 0, 0, 1), value=1.0)
        return columns

    def output_grad_columns(self, grad_output: Tensor) -> Tensor:
        return grad_output.unsqueeze(0) if grad_output.dim() == 2 else grad_output
