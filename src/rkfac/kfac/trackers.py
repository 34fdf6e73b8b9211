"""Factor trackers: what K-FAC keeps of one Kronecker factor, and how it is kept current.

The preconditioner's loop asks every tracker the same things (fold in this statistic; is a
decomposition due; here is the new one) and never which kind it has:

- :class:`DenseTracker`: the exponential average F₁ = S₁, F_k = ρ F_{k−1} + (1 − ρ) S_k (no
  identity start, spec section 1) and the eigenpairs of its last decomposition, recomputed on
  the inverse schedule (and whenever none exists yet).
- :class:`BrandTracker` (B-KFAC): for a factor whose batch statistic is narrower than the factor
  (a Linear layer with batch N < d, decided at its first statistic), only the eigenpairs are
  kept and every statistic S = C Cᵀ is folded in by Brand's update (:mod:`rkfac.brand`); the
  dense average is kept too only by the B-R (``refresh_every``) and B-KFAC-c
  (``reproject_every``) variants, to correct against. A factor that is not narrower behaves
  exactly like a :class:`DenseTracker` on the fallback decomposition.
- :class:`DiagonalTracker`: a diagonal factor (an embedding's A) kept as a vector; it needs no
  decomposition, its damped inverse is a scaling (:class:`rkfac.lowrank.DiagonalFactor`).

Trackers are made by the decomposition (:meth:`rkfac.Decomposition.tracker`), so a new online
method is one new tracker class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rkfac.brand import brand_update, reproject_subset
from rkfac.decompositions import BrandUpdate, Decomposition, Pairs
from rkfac.kfac.statistics import Statistic
from rkfac.lowrank import BlockEigenpairs, DiagonalFactor, Eigenpairs, FactorInverse


class FactorTracker(ABC):
    """One factor's state. ``factor`` is the dense average (None while there is none, or when the
    method keeps none); ``pairs`` the eigenpairs in use (None before the first decomposition)."""

    def __init__(self, method: Decomposition) -> None:
        self.method = method  # the decomposition applied to the dense factor
        self.factor: Tensor | None = None
        self.pairs: FactorInverse | None = None

    @property
    def eigenpairs(self) -> Pairs | None:
        """``pairs`` of a tracker that decomposes (every one but :class:`DiagonalTracker`); a
        block factor's (B, d, d) stack (a grouped convolution) has :class:`BlockEigenpairs`."""
        pairs = self.pairs
        if isinstance(pairs, DiagonalFactor):
            raise TypeError(f"{type(self).__name__} holds a diagonal factor, not eigenpairs")
        return pairs

    #: Whether this tracker wants its statistic as columns C (S = C Cᵀ) rather than S.
    takes_columns = False

    @property
    def online(self) -> bool:
        """Whether the eigenpairs are updated at every statistic rather than decomposed."""
        return False

    def from_columns(self, columns: Tensor, world_size: int) -> Statistic:
        """The statistic this tracker folds in, from this rank's columns (``takes_columns`` only)."""
        raise NotImplementedError(f"{type(self).__name__} takes dense statistics")

    @abstractmethod
    def update(self, statistic: Statistic, decay: float) -> None:
        """Fold one (finite) batch statistic in, with decay ρ."""

    @abstractmethod
    def due(self, step: int, scheduled: bool) -> bool:
        """Whether ``method`` should decompose ``factor`` at ``step`` (``scheduled``: an inverse step)."""

    def maintain(self, step: int, generator: Callable[[torch.device], torch.Generator]) -> None:  # noqa: B027
        """Work between decompositions (B-KFAC-c's reprojection); nothing by default.

        ``generator(device)`` makes the step's keyed generator when randomness is needed."""

    def factor_shape(self, dim: int) -> tuple[int, ...]:
        """The shape of ``factor`` for a factor of width ``dim``."""
        return (dim, dim)

    def _average(self, statistic: Tensor, decay: float) -> None:
        if self.factor is None:
            self.factor = statistic
        else:
            self.factor.mul_(decay).add_(statistic, alpha=1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        pairs = self.eigenpairs  # DiagonalTracker saves its own
        saved: dict[str, Any] | None = None
        if isinstance(pairs, Eigenpairs):
            saved = {"vectors": pairs.vectors, "values": pairs.values, "trace": pairs.trace, "top": pairs.top}
        elif isinstance(pairs, BlockEigenpairs):  # (B, d, k) vectors; traces and tops as (B,) tensors
            saved = {"vectors": pairs.vectors, "values": pairs.values, "trace": pairs.traces, "top": pairs.tops}
        return {"factor": self.factor, "pairs": saved, "online": self.online}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        # a copy: the running factor is updated in place and must not alias the caller's state
        factor = state.get("factor")
        self.factor = None if factor is None else factor.to(device, copy=True)
        pairs = state.get("pairs")
        if pairs is None:
            self.pairs = None
        elif pairs["vectors"].dim() == 3:  # block pairs
            traces, tops = (torch.as_tensor(pairs[key], dtype=torch.float64).cpu() for key in ("trace", "top"))
            self.pairs = BlockEigenpairs(pairs["vectors"].to(device), pairs["values"].to(device), traces, tops)
        else:
            self.pairs = Eigenpairs(
                pairs["vectors"].to(device), pairs["values"].to(device), float(pairs["trace"]), float(pairs["top"])
            )


class DiagonalTracker(FactorTracker):
    """A diagonal factor: the exponential average of diagonal statistics, used as it is."""

    def __init__(self, method: Decomposition) -> None:
        super().__init__(method)  # kept for the cost model only: nothing is ever decomposed

    def factor_shape(self, dim: int) -> tuple[int, ...]:
        return (dim,)

    def update(self, statistic: Statistic, decay: float) -> None:
        self._average(statistic.value, decay)
        assert self.factor is not None
        self.pairs = DiagonalFactor.of(self.factor.clone())

    def due(self, step: int, scheduled: bool) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "pairs": None, "online": False}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        factor = state.get("factor")
        self.factor = None if factor is None else factor.to(device, copy=True)
        self.pairs = None if self.factor is None else DiagonalFactor.of(self.factor.clone())


class DenseTracker(FactorTracker):
    """The dense exponential average, decomposed on the inverse schedule."""

    def update(self, statistic: Statistic, decay: float) -> None:
        self._average(statistic.value, decay)

    def due(self, step: int, scheduled: bool) -> bool:
        return self.factor is not None and (self.pairs is None or scheduled)


class BrandTracker(FactorTracker):
    """B-KFAC's online eigenpairs (see the module docstring); ``brand`` holds its settings."""

    takes_columns = True

    def __init__(self, brand: BrandUpdate) -> None:
        super().__init__(brand.fallback)
        self.brand = brand
        self._online: bool | None = None  # decided at the first statistic

    @property
    def online(self) -> bool:
        return bool(self._online)

    def from_columns(self, columns: Tensor, world_size: int) -> Statistic:
        if self._online is None:  # the global batch narrower than the factor
            self._online = columns.shape[1] * world_size < columns.shape[0]
        return Statistic(columns, columns=True) if self._online else Statistic(columns @ columns.T)

    def update(self, statistic: Statistic, decay: float) -> None:
        if not statistic.columns:
            self._average(statistic.value, decay)
            return
        self.pairs = brand_update(self._single_pairs(), statistic.value, decay, self.brand.rank)
        if self.brand.keeps_factor:
            self._average(statistic.value @ statistic.value.T, decay)

    def due(self, step: int, scheduled: bool) -> bool:
        if not self.online:
            return self.factor is not None and (self.pairs is None or scheduled)
        every = self.brand.refresh_every
        return self.factor is not None and every is not None and step > 0 and step % every == 0

    def maintain(self, step: int, generator: Callable[[torch.device], torch.Generator]) -> None:
        every = self.brand.reproject_every
        if not (self.online and every is not None and step > 0 and step % every == 0):
            return
        pairs = self._single_pairs()
        if self.factor is not None and pairs is not None:
            self.pairs = reproject_subset(pairs, self.factor, self.brand.reproject_count, generator(self.factor.device))

    def _single_pairs(self) -> Eigenpairs | None:
        pairs = self.pairs  # only layers with online_updates (Linear: one block) get a BrandTracker
        assert pairs is None or isinstance(pairs, Eigenpairs)
        return pairs

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "online": self._online}  # None: not decided yet

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        super().load_state_dict(state, device)
        self._online = state.get("online")
