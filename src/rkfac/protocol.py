"""What every rkfac preconditioner offers, so that optimizers and trainers need not ask which one.

A preconditioner rewrites ``.grad`` of the parameters it handles in place on :meth:`step`,
after the user's backward and before an optimizer steps. :class:`rkfac.KFACPreconditioner`
and :class:`rkfac.SENGPreconditioner` both satisfy :class:`Preconditioner`; the optimizer
wrapper (:mod:`rkfac.optim`) and the experiment trainer use nothing else.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from rkfac.distributed.communicator import TrafficCounter
from rkfac.health import Health


@runtime_checkable
class Preconditioner(Protocol):
    """The contract of a preconditioner (K-FAC, SENG)."""

    steps: int

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the layers it preconditions, in model order."""
        ...

    @property
    def traffic(self) -> TrafficCounter:
        """Bytes this rank has put into collectives."""
        ...

    @property
    def health(self) -> Health:
        """Counts of the faults it recovered from."""
        ...

    def ranks(self) -> dict[str, tuple[int, int]]:
        """Low-rank sizes per layer, where the method has any (empty otherwise)."""
        ...

    def step(self) -> None:
        """Precondition the current gradients in place."""
        ...

    def parameters(self) -> list[Tensor]:
        """The parameters whose gradients it preconditions (the layers' weights and biases)."""
        ...

    def sample_fisher(self, outputs: Tensor, targets: Tensor | None = None, ignore_index: int = -100) -> None:
        """Capture curvature from labels sampled from ``outputs``, leaving out the positions whose
        ``targets`` are ``ignore_index`` (K-FAC with fisher="mc"; SENG refuses it)."""
        ...

    def positions(self, kept: Tensor) -> AbstractContextManager[None]:
        """Leave the positions where ``kept`` is False (padding) out of the curvature of the
        forwards inside (K-FAC; SENG's per-sample gradients need nothing left out)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def describe(self) -> str:
        """One line per preconditioned layer, then what is left out."""
        ...

    def remove(self) -> None:
        """Take the hooks off the model."""
        ...
