"""``rkfac.SENG``: the SENG preconditioner followed by SGD with momentum and weight decay.

Every hyperparameter that the paper schedules can be a callable of the (0-based) step, e.g.
the reference learning rate ``lambda step: 0.05 * (1 - step / (75 * steps_per_epoch)) ** 6``.
A fixed lr lives in the param group as usual, so torch LR schedulers work; a callable lr is
written into the param group at every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rkfac.schedules import FloatSchedule, at_step_float, float_schedule
from rkfac.seng import SENGPreconditioner
from rkfac.sgd import sgd_update
from rkfac.timing import PhaseTimer

_BOUNDS: dict[str, dict[str, Any]] = {
    "lr": {"low": 0.0},
    "momentum": {"low": 0.0, "high": 1.0, "high_inclusive": False},
    "weight_decay": {"low": 0.0},
}


class SENG(torch.optim.Optimizer):
    """SENG on all parameters of ``model`` that require grad (spec section 5).

    ``damping`` may also be a callable of the step; it is read at each curvature rebuild
    (every ``update_freq`` steps). ``opt.preconditioner`` is the :class:`rkfac.SENGPreconditioner`.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: FloatSchedule,
        momentum: FloatSchedule = 0.9,
        weight_decay: FloatSchedule = 1e-2,
        damping: FloatSchedule = 2.0,
        update_freq: int = 200,
        col_sample_size: int = 128,
        sketch_threshold: float = 7e5,
        sketch_rank: int = 16,
        seed: int = 0,
        *,
        loss_reduction: str = "mean",
        grad_scaler: torch.amp.GradScaler | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        timer: PhaseTimer | None = None,
    ) -> None:
        given = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        self._schedules = {name: float_schedule(value, name, **_BOUNDS[name]) for name, value in given.items()}
        defaults = {name: self._value(name, 0) for name in given}
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        self.preconditioner = SENGPreconditioner(
            model,
            damping=damping,
            update_freq=update_freq,
            col_sample_size=col_sample_size,
            sketch_threshold=sketch_threshold,
            sketch_rank=sketch_rank,
            loss_reduction=loss_reduction,
            grad_scaler=grad_scaler,
            seed=seed,
            process_group=process_group,
            timer=timer,
        )

    def _value(self, name: str, step: int) -> float:
        return at_step_float(self._schedules[name], step, name, **_BOUNDS[name])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        step = self.preconditioner.steps
        for name, schedule in self._schedules.items():
            if callable(schedule):
                value = self._value(name, step)
                for group in self.param_groups:
                    group[name] = value
        self.preconditioner.step()
        sgd_update(self.param_groups, self.state)
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["preconditioner"] = self.preconditioner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        preconditioner_state = state_dict.pop("preconditioner", None)
        if preconditioner_state is None:
            raise ValueError("state_dict has no 'preconditioner' entry: it was not saved by rkfac.SENG")
        super().load_state_dict(state_dict)
        self.preconditioner.load_state_dict(preconditioner_state)
