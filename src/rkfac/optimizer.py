"""``rkfac.KFAC``: the paper's optimizer, a K-FAC preconditioner followed by SGD.

Per step, for every parameter p with gradient::

    d ← preconditioned and clipped gradient          (KFACPreconditioner.step)
    d ← d + weight_decay · p     once steps ≥ weight_decay_start
    b ← momentum · b + d;  d ← b                      (if momentum > 0)
    p ← p − lr · d

Weight decay is added after preconditioning and clipping, as in the paper's code (which also
starts it at step 200: ``weight_decay_start=200``). ``lr``, ``momentum`` and ``weight_decay``
live in the param group, so torch LR schedulers work; the preconditioner's "kl" clip reads
the group's current lr.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rkfac.preconditioner import KFACPreconditioner
from rkfac.schedules import check_float, check_int
from rkfac.sgd import sgd_update


class KFAC(torch.optim.Optimizer):
    """K-FAC + SGD on all parameters of ``model`` that require grad.

    Extra keyword arguments go to :class:`rkfac.KFACPreconditioner` (decomposition, damping,
    factor_every, inverse_every, clip, fisher, skip, seed, ...). The preconditioner is
    ``opt.preconditioner``; with ``fisher="mc"`` call ``opt.preconditioner.sample_fisher(logits)``
    before the backward.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        weight_decay_start: int = 0,
        **preconditioner_options: Any,
    ) -> None:
        check_float(lr, "lr", low=0.0)
        check_float(momentum, "momentum", low=0.0, high=1.0, high_inclusive=False)
        check_float(weight_decay, "weight_decay", low=0.0)
        self.weight_decay_start = check_int(weight_decay_start, "weight_decay_start", low=0)
        if "lr" in preconditioner_options:
            raise ValueError("pass lr to KFAC itself; the preconditioner follows the optimizer's lr")
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.preconditioner = KFACPreconditioner(model, lr=lambda _step: self.param_groups[0]["lr"], **preconditioner_options)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        decay_on = self.preconditioner.steps >= self.weight_decay_start
        self.preconditioner.step()
        sgd_update(self.param_groups, self.state, decay_on)
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["preconditioner"] = self.preconditioner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        preconditioner_state = state_dict.pop("preconditioner", None)
        if preconditioner_state is None:
            raise ValueError("state_dict has no 'preconditioner' entry: it was not saved by rkfac.KFAC")
        super().load_state_dict(state_dict)
        self.preconditioner.load_state_dict(preconditioner_state)
