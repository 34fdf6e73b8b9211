"""``nn.Conv2d`` with groups = 1 (any stride, padding, dilation, padding mode).

Rows are the unfolded input patches, one per (sample, output position): N = n·T, row length
c_in·kh·kw in the order of ``weight.reshape(c_out, -1)``, so that patch · W-row is exactly the
convolution at that position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rkfac.layers.convolution import ConvolutionKind


class Conv2dKind(ConvolutionKind):
    module: nn.Conv2d
    label, module_type, spatial = "Conv2d", nn.Conv2d, 2

    def _patch_view(self, inputs: Tensor) -> Tensor:
        """The patches as a strided view (n, H_out, W_out, c_in, kh, kw) of the padded input.

        No copy: one copy of this view is the patch matrix, where ``F.unfold`` followed by the
        transpose to rows costs two (plus a third to append the bias ones); on fashion-cnn's
        second convolution that was 70 ms of a 200 ms factor step.
        """
        x = self._padded(inputs)
        n, channels, height, width = x.shape
        module = self.module
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        h_out, w_out = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
        s_n, s_c, s_h, s_w = x.stride()
        return x.as_strided(
            (n, h_out, w_out, channels, kh, kw), (s_n, s_h * sh, s_w * sw, s_c, s_h * dh, s_w * dw), x.storage_offset()
        )

    def input_rows(self, inputs: Tensor) -> Tensor:
        """One row per (sample, output position), written straight into the row matrix."""
        patches = self._patch_view(inputs)
        count, width = patches[..., 0, 0, 0].numel(), patches[0, 0, 0].numel()
        rows = patches.new_empty(count, width + int(self.has_bias))
        rows[:, :width].view(patches.shape).copy_(patches)
        if self.has_bias:
            rows[:, width] = 1.0
        return rows

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        if grad_output.dim() == 3:
            grad_output = grad_output.unsqueeze(0)
        return grad_output.flatten(2).transpose(1, 2).reshape(-1, grad_output.shape[1])

    def unfold(self, inputs: Tensor) -> Tensor:
        """Unfolded input patches per sample, (n, c_in·kh·kw, T)."""
        module = self.module
        return F.unfold(self._padded(inputs), module.kernel_size, dilation=module.dilation, stride=module.stride)

    def input_columns(self, inputs: Tensor) -> Tensor:
        columns = self.unfold(inputs)
        if self.has_bias:
            columns = torch.cat([columns, columns.new_ones(columns.shape[0], 1, columns.shape[2])], dim=1)
        return columns

    def output_grad_columns(self, grad_output: Tensor) -> Tensor:
        batched = grad_output if grad_output.dim() == 4 else grad_output.unsqueeze(0)
        return batched.flatten(2)
