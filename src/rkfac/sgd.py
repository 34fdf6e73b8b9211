"""The SGD update that follows a preconditioner, shared by :class:`rkfac.KFAC` and :class:`rkfac.SENG`.

For every parameter p with gradient (already preconditioned)::

    d ← grad + weight_decay · p           (when decay is on)
    b ← momentum · b + d;  d ← b          (if momentum > 0; b starts as the first d)
    p ← p − lr · d

Weight decay is added after preconditioning, as in both papers' code: the preconditioner
never sees it.
"""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def sgd_update(param_groups: list[dict[str, Any]], state: dict[Any, Any], decay_on: bool = True) -> None:
    for group in param_groups:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        for param in group["params"]:
            if param.grad is None:
                continue
            direction = param.grad
            if weight_decay and decay_on:
                direction = direction.add(param, alpha=weight_decay)
            if momentum:
                param_state = state[param]
                if "momentum_buffer" not in param_state:
                    param_state["momentum_buffer"] = direction.clone()
                else:
                    param_state["momentum_buffer"].mul_(momentum).add_(direction)
                direction = param_state["momentum_buffer"]
            param.add_(direction, alpha=-lr)
