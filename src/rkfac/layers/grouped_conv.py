"""Grouped and depthwise ``nn.Conv1d`` / ``nn.Conv2d`` (groups = g > 1): one K-FAC block per group.

A convolution with g groups splits its c_in input and c_out output channels into g consecutive
groups, and output channel o of group j sees only the input channels of group j. Its weight
(c_out, c_in/g, *kernel) is therefore g independent matrices, bias entries as the last column,

    W_j = [weight[j·c_out/g : (j+1)·c_out/g].reshape(c_out/g, c_in/g·K) | bias_j]   (K = kernel size),

and K-FAC treats each group as a groups=1 convolution on its own channels (spec section 7):
the Fisher block of the layer is approximated block-diagonally, A_j ⊗ G_j per group (the
cross-group blocks are dropped as the cross-layer ones are), with the KFC scaling of
:mod:`rkfac.layers.base`, positions summed:

    S_A[j] = Σ_rows a_j a_jᵀ / N,    S_G[j] = n Σ_rows g_j g_jᵀ   (mean loss; / n for a sum),

a_j the patch of group j's input channels (with a trailing 1), g_j the output gradient of group
j's channels, N = n·T rows. d_A = c_in/g·K (+1) and d_G = c_out/g per block; a depthwise
convolution (g = c_in) has d_A = K + 1 and d_G = the channel multiplier (usually 1).

The groups are a leading block dimension everywhere: ``input_rows`` (g, N, d_A),
``output_grad_rows`` (g, N, d_G), ``grad_matrix`` (g, d_G, d_A), so the statistics are batched
Gram products (g, d, d), and the decompositions (:meth:`rkfac.Decomposition.decompose_blocks`)
and the damped solve (:class:`rkfac.lowrank.BlockEigenpairs`) run batched over the blocks, with
the damping of each block from its own factors, as g separate layers would have it. The "rms"
and "kl" clips treat the module as one layer.

Left out: SENG (no per-sample columns: SENG gives grouped convolutions its plain g / (1 + λ)
step), ``apply_dtype`` (the blocks are solved in the working dtype), and data-parallel runs (the
preconditioner refuses a process group when the model has grouped convolutions).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rkfac.layers.conv1d import Conv1dKind
from rkfac.layers.conv2d import Conv2dKind
from rkfac.layers.convolution import ConvolutionKind


class GroupedConvolution(ConvolutionKind):
    """What grouped Conv1d and Conv2d share; the patch view comes from the groups=1 kind."""

    per_sample = False
    module: nn.Conv1d | nn.Conv2d

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, cls.module_type) and module.groups > 1

    @property
    def groups(self) -> int:
        return self.module.groups

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.groups,)

    @property
    def factor_dims(self) -> tuple[int, int]:
        """(d_A, d_G) of each block."""
        return self.weight[0].numel() + int(self.has_bias), self.weight.shape[0] // self.groups

    def input_rows(self, inputs: Tensor) -> Tensor:
        """(g, N, d_A): block j's rows are the patches of group j's channels, rows ordered (sample, position)."""
        patches = self._patch_view(inputs)  # (n, *positions, c_in, *kernel)
        channel_dim = 1 + self.spatial
        grouped = patches.unflatten(channel_dim, (self.groups, -1)).movedim(channel_dim, 0)
        count, width = math.prod(grouped.shape[1 : channel_dim + 1]), math.prod(grouped.shape[channel_dim + 1 :])
        rows = patches.new_empty(self.groups, count, width + int(self.has_bias))
        rows[..., :width].view(grouped.shape).copy_(grouped)
        if self.has_bias:
            rows[..., width] = 1.0
        return rows

    def output_grad_rows(self, grad_output: Tensor) -> Tensor:
        """(g, N, d_G): block j's rows are the gradients of group j's output channels."""
        batched = grad_output.unsqueeze(0) if grad_output.dim() == self.spatial + 1 else grad_output
        d_g = self.factor_dims[1]
        per_group = batched.unflatten(1, (self.groups, d_g)).flatten(3)  # (n, g, d_G, T)
        return per_group.permute(1, 0, 3, 2).reshape(self.groups, -1, d_g)

    def input_columns(self, inputs: Tensor) -> Tensor:
        raise NotImplementedError("SENG does not precondition grouped convolutions (it gives them g / (1 + λ))")

    def output_grad_columns(self, grad_output: Tensor) -> Tensor:
        raise NotImplementedError("SENG does not precondition grouped convolutions (it gives them g / (1 + λ))")

    def grad_matrix(self) -> Tensor | None:
        """∇W as (g, d_G, d_A): block j is [∇W_j | ∇b_j]; a missing bias gradient counts as zero."""
        weight_grad = self.weight.grad
        if weight_grad is None:
            return None
        d_g = self.factor_dims[1]
        matrix = weight_grad.reshape(self.groups, d_g, -1)
        bias = self.bias
        if bias is None:
            return matrix
        bias_grad = bias.grad if bias.grad is not None else bias.new_zeros(bias.shape)
        return torch.cat([matrix, bias_grad.reshape(self.groups, d_g, 1)], dim=-1)

    def set_grad_matrix(self, matrix: Tensor) -> None:
        """Write a (g, d_G, d_A) matrix back into ``.grad`` of the weight (and bias), in place."""
        weight_grad = self.weight.grad
        if weight_grad is None:
            raise RuntimeError("set_grad_matrix needs the weight's gradient (grad_matrix returned None)")
        d_in = weight_grad[0].numel()
        weight_grad.copy_(matrix[..., :d_in].reshape(weight_grad.shape))
        bias = self.bias
        if bias is not None and bias.requires_grad:
            if bias.grad is None:
                bias.grad = bias.new_zeros(bias.shape)
            bias.grad.copy_(matrix[..., d_in].reshape(-1))


class GroupedConv2dKind(GroupedConvolution, Conv2dKind):
    module: nn.Conv2d
    label = "GroupedConv2d"


class GroupedConv1dKind(GroupedConvolution, Conv1dKind):
    module: nn.Conv1d
    label = "GroupedConv1d"
