"""Positions left out of K-FAC's statistics: a sequence batch's padding.

A token model's layers see every position of the batch, padding included, but the loss leaves
the padded positions out (``ignore_index``), so their output gradients are zero (or, with the
MC Fisher, their sampled labels are left out by ``sample_fisher(targets=)``). Their inputs would
still enter S_A: the average would run over the padding's activations as well as the real
tokens'. With a position mask (``kept``: True where a position counts, shaped like the batch's
positions, samples first), the rows of the left-out positions are dropped from both sides of
every call whose rows are those positions:

    S_A = Σ_{kept rows} a aᵀ / N_kept,    S_G = c_G Σ_{kept rows} g gᵀ,

N_kept the kept rows of the calls, c_G as without the mask (n samples: the loss's mean over the
kept positions already carries the 1/N_kept, as F.cross_entropy's with ``ignore_index``). A
mask that keeps everything gives the unmasked statistics bitwise. An embedding counts only
the kept tokens (and still leaves out its ``padding_idx``).

Which calls: a layer's rows are matched by :meth:`~rkfac.layers.LayerKind.position_shape`, the
shape of its rows' positions in its batch-first input:

- equal to the mask's shape: masked (a Linear's (n, T, d) input, an attention projection's, an
  embedding's (n, T) indices);
- samples only, (n,): left as they are, one row per sample (a head after pooling);
- any other shape: refused, naming the layer and both shapes (rkfac cannot tell which rows
  are padding);
- none (a convolution, whose rows are its output positions): left as they are, with a warning
  naming the layer once.

With ``statistics_samples`` = m the mask is cut to the first m samples, as the rows are.
K-FAC-reduce (``kfac_approx="reduce"``) averages each sample's rows before the products, so the
mask would have to weight that average: not implemented, refused.

The mask is for positions that do not reach the loss: ignored targets, and keys an attention
mask hides. A padded position that other positions attend to carries real gradient, and
leaving it out would drop a real part of the curvature.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from rkfac.layers import LayerKind


def check_mask(kept: Tensor) -> Tensor:
    """``kept`` as a position mask: a bool tensor of at least two dimensions (samples, positions)."""
    if not isinstance(kept, Tensor) or kept.dtype != torch.bool:
        what = type(kept).__name__ if not isinstance(kept, Tensor) else f"a {kept.dtype} tensor"
        raise ValueError(f"positions() needs a bool tensor (True where a position counts); got {what}")
    if kept.dim() < 2:
        raise ValueError(
            f"positions() needs a mask of shape (samples, positions, ...); got shape {tuple(kept.shape)}: "
            "a batch with one row per sample has no positions to leave out"
        )
    return kept


class PositionMask:
    """The mask in force (None: none) and the layers already warned about."""

    def __init__(self) -> None:
        self.kept: Tensor | None = None
        self._warned: set[str] = set()

    def rows(self, name: str, layer: LayerKind, inputs: Tensor, samples: int) -> Tensor | None:
        """The flat mask of the rows of one call of ``samples`` samples (``inputs`` batch first,
        possibly cut to its first m by ``statistics_samples``), or None where every row counts
        (no mask, one row per sample, or rows that are not the input's positions)."""
        if self.kept is None:
            return None
        shape = layer.position_shape(inputs)
        if shape is None:
            if name not in self._warned:
                self._warned.add(name)
                warnings.warn(
                    f"positions(): layer {name!r} ({layer.label}) keeps every row in its statistics: its rows are its "
                    "output positions, not the mask's",
                    UserWarning,
                    stacklevel=2,
                )
            return None
        if len(shape) <= 1:  # one row per sample (or an unbatched call): nothing to leave out
            return None
        full = (samples, *shape[1:])
        if torch.Size(full) != self.kept.shape:
            raise ValueError(
                f"positions(): layer {name!r} ({layer.label}) has rows at positions of shape {full} "
                f"(samples first) but the mask has shape {tuple(self.kept.shape)}; give a mask shaped like the "
                "batch's positions, or leave this layer's forward outside positions()"
            )
        return self.kept[: shape[0]].to(inputs.device).reshape(-1)  # the first m under statistics_samples


__all__ = ["PositionMask", "check_mask"]
