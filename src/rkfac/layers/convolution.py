"""What Conv1d and Conv2d share (groups = 1, and grouped in :mod:`.grouped_conv`): acceptance,
unbatched inputs, the layer's own padding, the patch view."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from rkfac.layers.base import LayerKind


class ConvolutionKind(LayerKind):
    """A convolution with ``spatial`` axes; subclasses give the patch layout."""

    module_type: ClassVar[type[nn.modules.conv._ConvNd]]
    spatial: ClassVar[int]

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, cls.module_type) and module.groups == 1

    def _patch_view(self, inputs: Tensor) -> Tensor:
        """The patches as a strided view (n, *output positions, c_in, *kernel) of the padded input."""
        raise NotImplementedError

    def samples(self, inputs: Tensor, batch_dim: int) -> int:
        """n: an unbatched input (c_in, *spatial) is one sample; convolutions lead with the batch."""
        return 1 if inputs.dim() == self.spatial + 1 else inputs.shape[0]

    def _padded(self, inputs: Tensor) -> Tensor:
        """The batched input padded exactly as the layer pads it.

        Padding goes through ``F.pad`` with the layer's own padding amounts so that
        ``padding='same'`` and non-zero padding modes ('reflect', 'replicate', 'circular') give
        the patches the convolution really saw.
        """
        module = self.module
        assert isinstance(module, nn.modules.conv._ConvNd)
        if inputs.dim() == self.spatial + 1:
            inputs = inputs.unsqueeze(0)
        pad = module._reversed_padding_repeated_twice  # the amounts the layer itself uses
        if any(pad):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            inputs = F.pad(inputs, pad, mode=mode)
        return inputs
