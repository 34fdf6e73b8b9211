"""What K-FAC needs to know about each supported layer type, as pure tensor functions.

For a layer with weight W viewed as a (d_G, d_A) matrix (bias as the last column), K-FAC
needs, per forward/backward pass:

- ``input_rows``: the rows ``a`` whose second moment is the A statistic, (N, d_A), with a
  column of ones appended when the layer has a bias. For ``nn.Linear`` the rows are the
  inputs with every leading dimension flattened (N = product of leading dims). For
  ``nn.Conv2d`` they are the unfolded input patches, one per (sample, output position):
  N = n·T, row length c_in·kh·kw (the order of ``weight.reshape(c_out, -1)``), so that
  patch · W-row is exactly the convolution at that position.
- ``output_grad_rows``: the matching rows of dLoss/d(output), (N, d_G).
- ``samples``: n, the size of the first input dimension (the batch).

Scaling, fixed here once (KFC, Grosse & Martens 2016, positions summed):

    S_A = Σ_rows a aᵀ / N
    S_G = n · Σ_rows g gᵀ      for a loss that is a mean over the n samples ("mean")
    S_G = Σ_rows g gᵀ / n      for a loss that is a sum over the samples ("sum")

With a mean loss the per-sample output gradient is δ = n·g, so for Linear (T = 1) S_G is the
mean over samples of δδᵀ, and for Conv2d it is T times the mean over (sample, position) of
δδᵀ, so that A ⊗ G approximates the Fisher block with the T positions summed. A Linear
layer with extra leading dimensions (tokens) is treated like a convolution: the leading
dimensions after the first are positions.
"""

from __future__ import annotations

from typing import TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SupportedLayer: TypeAlias = nn.Linear | nn.Conv2d


def is_supported(module: nn.Module) -> bool:
    """Linear layers, and Conv2d layers with groups = 1."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


def has_bias(module: SupportedLayer) -> bool:
    return module.bias is not None


def factor_dims(module: SupportedLayer) -> tuple[int, int]:
    """(d_A, d_G): the widths of the input-side and output-side factors."""
    weight = module.weight
    d_in = weight[0].numel()
    return d_in + int(has_bias(module)), weight.shape[0]


def sample_count(inputs: Tensor) -> int:
    """n: the first dimension of the layer input (1 for an unbatched input)."""
    return inputs.shape[0] if inputs.dim() > 1 else 1


def _append_ones(rows: Tensor) -> Tensor:
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)


def _padded(module: nn.Conv2d, inputs: Tensor) -> Tensor:
    """The batched input padded exactly as the layer pads it.

    Padding goes through ``F.pad`` with the layer's own padding amounts so that
    ``padding='same'`` and non-zero padding modes ('reflect', 'replicate', 'circular') give
    the patches the convolution really saw.
    """
    if inputs.dim() == 3:
        inputs = inputs.unsqueeze(0)
    pad = module._reversed_padding_repeated_twice  # the amounts nn.Conv2d itself uses
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        inputs = F.pad(inputs, pad, mode=mode)
    return inputs


def conv_unfold(module: nn.Conv2d, inputs: Tensor) -> Tensor:
    """Unfolded input patches per sample, (n, c_in·kh·kw, T)."""
    return F.unfold(_padded(module, inputs), module.kernel_size, dilation=module.dilation, stride=module.stride)


def _conv_patch_view(module: nn.Conv2d, inputs: Tensor) -> Tensor:
    """The patches as a strided view (n, H_out, W_out, c_in, kh, kw) of the padded input.

    No copy: one copy of this view is the patch matrix, where ``F.unfold`` followed by the
    transpose to rows costs two (plus a third to append the bias ones); on fashion-cnn's
    second convolution that was 70 ms of a 200 ms factor step.
    """
    x = _padded(module, inputs)
    n, channels, height, width = x.shape
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    h_out, w_out = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    s_n, s_c, s_h, s_w = x.stride()
    return x.as_strided(
        (n, h_out, w_out, channels, kh, kw), (s_n, s_h * sh, s_w * sw, s_c, s_h * dh, s_w * dw), x.storage_offset()
    )


def input_rows(module: SupportedLayer, inputs: Tensor) -> Tensor:
    """The A-statistic rows ``a`` (N, d_A) for one forward input.

    For a convolution, one row per (sample, output position) holding the patch in the order
    (c_in, kh, kw) of ``weight.reshape(c_out, -1)``, written straight into the row matrix.
    """
    if not isinstance(module, nn.Conv2d):
        rows = inputs.reshape(-1, inputs.shape[-1])
        return _append_ones(rows) if has_bias(module) else rows
    patches = _conv_patch_view(module, inputs)
    count, width = patches[..., 0, 0, 0].numel(), patches[0, 0, 0].numel()
    rows = patches.new_empty(count, width + int(has_bias(module)))
    rows[:, :width].view(patches.shape).copy_(patches)
    if has_bias(module):
        rows[:, width] = 1.0
    return rows


def output_grad_rows(module: SupportedLayer, grad_output: Tensor) -> Tensor:
    """The G-statistic rows ``g`` (N, d_G) for one gradient w.r.t. the layer output."""
    if isinstance(module, nn.Conv2d):
        if grad_output.dim() == 3:
            grad_output = grad_output.unsqueeze(0)
        return grad_output.flatten(2).transpose(1, 2).reshape(-1, grad_output.shape[1])
    return grad_output.reshape(-1, grad_output.shape[-1])


def grad_matrix(module: SupportedLayer) -> Tensor | None:
    """∇W as a (d_G, d_A) matrix, bias gradient as the last column; None before any backward.

    A missing bias gradient (bias frozen or unused) counts as zero.
    """
    weight_grad = module.weight.grad
    if weight_grad is None:
        return None
    matrix = weight_grad.reshape(weight_grad.shape[0], -1)
    if module.bias is None:
        return matrix
    bias = module.bias
    bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
    return torch.cat([matrix, bias_grad.reshape(-1, 1)], dim=1)


def set_grad_matrix(module: SupportedLayer, matrix: Tensor) -> None:
    """Write a (d_G, d_A) matrix back into ``.grad`` of the weight (and bias), in place."""
    weight_grad = module.weight.grad
    assert weight_grad is not None  # grad_matrix returned a matrix for this layer
    d_in = weight_grad[0].numel()
    weight_grad.copy_(matrix[:, :d_in].reshape(weight_grad.shape))
    if module.bias is not None and module.bias.requires_grad:
        if module.bias.grad is None:
            module.bias.grad = torch.zeros_like(module.bias)
        module.bias.grad.copy_(matrix[:, d_in])
