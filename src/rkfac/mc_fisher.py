"""Labels sampled from the model's own predictive distribution, for the "mc" Fisher.

The true Fisher is E_{y ~ p(y|x)}[∇log p ∇log pᵀ]; one sampled label per input gives an
unbiased estimate of it, unlike the empirical Fisher, which uses the data labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MC_LOSSES = ("cross_entropy", "mse")


def sampled_targets(outputs: Tensor, loss: str, generator: torch.Generator) -> Tensor:
    """A target drawn from the predictive distribution the loss defines.

    - "cross_entropy": outputs are logits (..., C); y ~ Categorical(softmax(logits)),
      returned as class indices of shape (...).
    - "mse": outputs are means; y ~ N(outputs, I/2), the Gaussian whose negative
      log-likelihood is the squared error (up to a constant).
    """
    outputs = outputs.detach()
    if loss == "cross_entropy":
        probs = F.softmax(outputs.reshape(-1, outputs.shape[-1]).float(), dim=-1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return labels.reshape(outputs.shape[:-1])
    if loss == "mse":
        noise = torch.randn(outputs.shape, generator=generator, device=outputs.device, dtype=outputs.dtype)
        return outputs + noise * 0.5**0.5
    raise ValueError(f"loss must be one of {MC_LOSSES}, got {loss!r}")


def sampled_loss(outputs: Tensor, loss: str, reduction: str, generator: torch.Generator, kept: Tensor | None = None) -> Tensor:
    """The training loss evaluated at sampled targets; its gradient feeds the G statistic.

    ``kept`` (cross-entropy; a bool per position, shaped like the targets): the positions the
    training loss keeps. The others (a sequence's padding, which the data's ignore_index leaves
    out) get the ignore mark −100 instead of their draw, so, as in the training loss, they add
    nothing and a mean divides by the positions kept. Every position is drawn either way, so
    the generator moves alike with and without ``kept``."""
    targets = sampled_targets(outputs, loss, generator)
    if loss == "cross_entropy":
        if kept is not None:
            targets = targets.masked_fill(~kept.reshape(targets.shape).to(targets.device), -100)
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), reduction=reduction)
    per_sample = (outputs - targets).pow(2).flatten(1).sum(1) if outputs.dim() > 1 else (outputs - targets).pow(2)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()
