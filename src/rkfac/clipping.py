"""Scaling of the preconditioned directions after the solve (``clip``), as device tensors.

- "rms" (the paper's code): per layer ν = min(1, κ / RMS(V)), RMS over the layer's weight
  and bias entries. It bounds each layer's update independently.
- "kl" (standard K-FAC, Ba et al. 2017): one global ν = min(1, sqrt(κ / Σ_layers lr² ⟨V, ∇W⟩)),
  bounding the predicted KL change of the step; ν = 1 when the sum is not positive.
- None: ν = 1.

The scales stay tensors so that on a GPU no value is read back to the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

CLIP_MODES = ("rms", "kl", None)


def rms_scale(direction: Tensor, clip_value: float) -> Tensor:
    rms = torch.linalg.vector_norm(direction) / direction.numel() ** 0.5
    return (clip_value / rms).clamp(max=1.0)


def kl_scale(directions: list[Tensor], grads: list[Tensor], lr: float, clip_value: float) -> Tensor:
    inner = sum((direction * grad).sum() for direction, grad in zip(directions, grads, strict=True))
    quadratic = torch.as_tensor(inner, dtype=directions[0].dtype, device=directions[0].device) * lr**2
    scale = (clip_value / quadratic).sqrt().clamp(max=1.0)
    return torch.where(quadratic > 0, scale, torch.ones_like(scale))


def clip_directions(mode: str | None, clip_value: float, directions: list[Tensor], grads: list[Tensor], lr: float) -> None:
    """Scale ``directions`` in place according to ``mode``."""
    if not directions or mode is None:
        return
    if mode == "rms":
        for direction in directions:
            direction.mul_(rms_scale(direction, clip_value))
    elif mode == "kl":
        scale = kl_scale(directions, grads, lr, clip_value)
        for direction in directions:
            direction.mul_(scale)
    else:
        raise ValueError(f"clip must be one of {CLIP_MODES}, got {mode!r}")
