"""Optional wall-clock accounting of the preconditioner's phases.

``KFACPreconditioner(..., timer=PhaseTimer())`` adds the seconds spent in each phase:

- "statistics": the hooks' Gram products (inside the user's forward and backward),
- "decomposition": eigendecompositions on inverse steps (and the factor averaging),
- "precondition": the damped low-rank solve, clipping and writing ``.grad``.

On CUDA, work is asynchronous: with ``synchronize=True`` the timer waits for the device at
each phase boundary so that the times are real (this costs a little speed; the CLI turns it
on only for timed runs). Without a timer nothing is measured and nothing is synchronised.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Accumulates seconds per named phase until :meth:`reset`."""

    def __init__(self, synchronize: bool = False) -> None:
        self.synchronize = synchronize and torch.cuda.is_available()
        self.seconds: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def _sync(self) -> None:
        if self.synchronize:
            torch.cuda.synchronize()

    def reset(self) -> dict[str, float]:
        """Return the accumulated seconds and start again from zero."""
        totals = dict(self.seconds)
        self.seconds.clear()
        return totals


@contextmanager
def maybe_phase(timer: PhaseTimer | None, name: str) -> Iterator[None]:
    """``timer.phase(name)`` when there is a timer, else nothing."""
    if timer is None:
        yield
    else:
        with timer.phase(name):
            yield
