"""Top eigenpairs of a symmetric PSD Kronecker factor: exact, randomized SVD, symmetric randomized EVD.

Each method is a small frozen config object with one public method, :meth:`Decomposition.decompose`,
which fixes the contract for all of them:

- the result describes the symmetric part ``(X + Xᵀ)/2`` of the factor. ExactEigh forms it
  (d² work next to d³). The randomized methods do not: forming it is a transposed d × d copy
  that costs 0.10 s at d = 4096 on the 2-core CPU, 40% of SRE's whole time there, while
  rkfac's own factors (Gram products ``rowsᵀ rows`` and their averages) are symmetric to
  rounding (bitwise on CPU). SRE's Rayleigh–Ritz core ``QᵀXQ`` is symmetrized, which makes
  its result exactly that of the symmetric part on the subspace it found; RSVD decomposes X
  as given (HMT make no symmetry assumption);
- the result holds the ``rank`` largest eigenvalues, sorted descending and clamped at 0,
  with orthonormal eigenvectors, and the trace of the whole factor;
- when ``rank + oversample ≥ d`` the sketch could not be smaller than the matrix, so the
  exact ``eigh`` is used (truncated to ``rank``): rank ≥ d reproduces :class:`ExactEigh`;
- randomness comes only from the ``torch.Generator`` passed in;
- ``previous``, the factor's last decomposition, is used only by the randomized methods'
  options beyond the paper: ``warm_start`` (the range finder starts from the previous
  eigenvectors plus ``oversample`` fresh Gaussian columns, with ``warm_power_iters`` power
  iterations instead of ``power_iters``) and ``adaptive_rank`` (the number of pairs kept is
  chosen from the previous spectrum, see :meth:`_Randomized.keep_for`).

A (B, d, d) stack of factors (a grouped convolution's blocks) goes through
:meth:`Decomposition.decompose_blocks`, the same contract per block, batched, returning
:class:`rkfac.lowrank.BlockEigenpairs` with one rank for all blocks.

Costs for a d × d factor, k = rank + oversample, q = power_iters (counting d² k products):
ExactEigh O(d³); RandomizedSVD 2(q + 1) products; SymmetricRandomizedEVD q + 1 products.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from rkfac.lowrank import BlockEigenpairs, Eigenpairs
from rkfac.schedules import IntSchedule, at_step_int
from rkfac.schema import default_of, option, validate

# The paper's cut between the modes that matter and the tail: eigenvalues below 10^-1.5 λ_max.
# The adaptive rank aims at it (``_Randomized.threshold``) and the spectrum diagnostics count
# the modes above it (:data:`rkfac.spectrum.DEFAULT_THRESHOLD`).
MODE_THRESHOLD = 10**-1.5

if TYPE_CHECKING:
    from rkfac.kfac.trackers import FactorTracker

#: A decomposition's result: one factor's pairs, or a stack of blocks' (grouped convolutions).
Pairs = Eigenpairs | BlockEigenpairs


class Decomposition(ABC):
    """Strategy object: how the preconditioner turns a factor into :class:`Eigenpairs`.

    :meth:`decompose_blocks` does the same for a stack of B factors (a grouped convolution's
    blocks) in one batched call: ``_top`` of the shipped methods is written for any leading
    batch dimensions (``.mT``, ``[..., :k]``, batched ``eigh`` / ``qr`` / ``svd``), and
    ``batched`` says so. A subclass whose ``_top`` takes matrices only (``batched = False``, the
    default) gets a loop over the blocks instead.
    """

    #: Whether ``_top`` accepts a (B, d, d) stack (then :meth:`decompose_blocks` is one batched call).
    batched: ClassVar[bool] = False

    def decompose(
        self, factor: Tensor, generator: torch.Generator | None = None, step: int = 0, previous: Eigenpairs | None = None
    ) -> Eigenpairs:
        """Top eigenpairs of the symmetric PSD ``factor`` (d × d). See the module docstring."""
        if factor.dim() != 2 or factor.shape[0] != factor.shape[1]:
            raise ValueError(f"factor must be a square matrix, got shape {tuple(factor.shape)}")
        trace = float(factor.diagonal().sum())
        dim = factor.shape[0]
        if previous is not None and previous.dim != dim:
            previous = None  # a different factor (e.g. a resized layer): start cold
        keep = min(self.keep_for(step, previous), dim)
        if generator is None:
            generator = torch.Generator(device=factor.device)
            generator.manual_seed(0)
        values, vectors = self._top(factor, keep, generator, previous)
        values = values.clamp_min(0).contiguous()
        top = float(values[0]) if values.numel() else 0.0
        return Eigenpairs(vectors.contiguous(), values, trace, top)

    def decompose_blocks(
        self, factors: Tensor, generator: torch.Generator | None = None, step: int = 0, previous: Pairs | None = None
    ) -> BlockEigenpairs:
        """Top eigenpairs of each block of ``factors`` (B, d, d), batched: block b's result is
        what :meth:`decompose` gives for ``factors[b]`` (up to the sketch drawn), with one rank for
        every block (an adaptive rank follows the block that needs the most modes)."""
        if factors.dim() != 3 or factors.shape[1] != factors.shape[2]:
            raise ValueError(f"factors must be a (blocks, d, d) stack, got shape {tuple(factors.shape)}")
        if not self.batched:
            return _stacked([self.decompose(block, generator, step) for block in factors])
        traces = factors.diagonal(dim1=1, dim2=2).sum(1)
        dim = factors.shape[2]
        if not isinstance(previous, BlockEigenpairs) or previous.dim != dim or previous.blocks != factors.shape[0]:
            previous = None  # a different stack: start cold
        keep = min(self.keep_for(step, previous), dim)
        if generator is None:
            generator = torch.Generator(device=factors.device)
            generator.manual_seed(0)
        values, vectors = self._top(factors, keep, generator, previous)
        values = values.clamp_min(0).contiguous()
        tops = values[:, 0] if keep else values.new_zeros(factors.shape[0])
        cpu = torch.stack([traces, tops]).to("cpu", torch.float64)  # one sync for both
        return BlockEigenpairs(vectors.contiguous(), values, cpu[0], cpu[1])

    @abstractmethod
    def rank_at(self, step: int) -> int:
        """How many eigenpairs to keep at ``step`` (the most, with an adaptive rank)."""

    @property
    def uses_previous(self) -> bool:
        """Whether :meth:`decompose` reads the factor's previous decomposition."""
        return False

    def keep_for(self, step: int, previous: Pairs | None) -> int:
        """How many eigenpairs this decomposition keeps (before capping at d)."""
        return self.rank_at(step)

    @abstractmethod
    def _top(self, factor: Tensor, keep: int, generator: torch.Generator, previous: Pairs | None) -> tuple[Tensor, Tensor]:
        """(values descending, vectors) of the ``keep`` largest eigenpairs of the factor's symmetric part
        (for ``batched`` methods, of each matrix of a (B, d, d) stack: values (B, k), vectors (B, d, k))."""

    @abstractmethod
    def cost(self, dim: int, step: int = 0) -> float:
        """Approximate floating-point work to decompose a dim × dim factor (a cost model)."""

    def tracker(self, online_capable: bool) -> FactorTracker:
        """The state K-FAC keeps for one factor decomposed by this method (:mod:`rkfac.kfac.trackers`).

        ``online_capable``: the layer's statistics have at most as many columns as batch rows
        (:attr:`rkfac.layers.LayerKind.online_updates`), so an online method may fold them in.
        """
        from rkfac.kfac.trackers import DenseTracker

        return DenseTracker(self)


def _exact_top(factor: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """The ``keep`` largest eigenpairs of ``(X + Xᵀ)/2`` from a full ``eigh``, sorted descending
    (a matrix, or batched over the leading dimensions of a stack)."""
    values, vectors = torch.linalg.eigh((factor + factor.mT) / 2)
    return values.flip(-1)[..., :keep], vectors.flip(-1)[..., :keep]


def _stacked(pairs: list[Eigenpairs]) -> BlockEigenpairs:
    """Per-block results of a method that does not batch, as one :class:`BlockEigenpairs`."""
    ranks = {p.rank for p in pairs}
    if len(ranks) != 1:
        raise ValueError(f"the blocks' decompositions kept different ranks {sorted(ranks)}; BlockEigenpairs needs one")
    traces = torch.tensor([p.trace for p in pairs], dtype=torch.float64)
    tops = torch.tensor([p.top for p in pairs], dtype=torch.float64)
    return BlockEigenpairs(torch.stack([p.vectors for p in pairs]), torch.stack([p.values for p in pairs]), traces, tops)


def _orthonormal_basis(matrix: Tensor) -> Tensor:
    return torch.linalg.qr(matrix).Q


@dataclass(frozen=True)
class ExactEigh(Decomposition):
    """Full ``torch.linalg.eigh``: the K-FAC baseline, O(d³). ``rank=None`` keeps every mode."""

    rank: int | None = option(None, "eigenpairs kept (None: all)", kind="int", low=1)
    batched: ClassVar[bool] = True

    def __post_init__(self) -> None:
        validate(self)

    def rank_at(self, step: int) -> int:
        return self.rank if self.rank is not None else 2**62

    def _top(self, factor: Tensor, keep: int, generator: torch.Generator, previous: Pairs | None) -> tuple[Tensor, Tensor]:
        return _exact_top(factor, keep)

    def cost(self, dim: int, step: int = 0) -> float:
        return 9.0 * dim**3


@dataclass(frozen=True)
class _Randomized(Decomposition):
    """Shared by RS and SRE: rank r (a number or a schedule), oversampling p, power iterations q.

    Beyond the paper (off by default):

    - ``warm_start``: when the factor has a previous decomposition, the sketch is its
      eigenvectors (up to ``keep`` of them) plus ``oversample`` fresh Gaussian columns, and
      ``warm_power_iters`` power iterations are done instead of ``power_iters``. A slowly
      changing factor (an exponential average with ρ = 0.95) has nearly the same dominant
      subspace from one inversion to the next, so the range finder starts close to it.
    - ``adaptive_rank``: the rank follows the previous spectrum so that the smallest kept
      eigenvalue sits near ``threshold`` · λ_max: it shrinks to 1.1 × (the number of previous
      eigenvalues above the threshold) + 1, or grows by half when every kept value was above
      it, within [``min_rank``, ``rank``]. The first decomposition uses ``rank``.
    """

    rank: IntSchedule = option(
        220, "target rank r (the most, with adaptive_rank); a number or a callable of the step", kind="int", low=1, schedule=True
    )
    oversample: int = option(10, "oversampling p: the sketch has r + p columns", kind="int", low=0)
    power_iters: int = option(4, "power iterations q", kind="int", low=0)
    warm_start: bool = option(False, "start the range finder from the previous eigenvectors", kind="bool")
    warm_power_iters: int = option(1, "power iterations of a warm start", kind="int", low=0)
    adaptive_rank: bool = option(False, "the rank follows the spectrum (smallest kept ≈ threshold·λ_max)", kind="bool")
    min_rank: int = option(32, "the smallest adaptive rank (rank is the largest)", kind="int", low=1)
    threshold: float = option(
        MODE_THRESHOLD,
        "the adaptive rank keeps the modes above this fraction of λ_max",
        low=0.0,
        low_inclusive=False,
        high=1.0,
        high_inclusive=False,
    )
    batched: ClassVar[bool] = True

    def __post_init__(self) -> None:
        validate(self)

    def rank_at(self, step: int) -> int:
        return at_step_int(self.rank, step, "rank", low=1)

    @property
    def uses_previous(self) -> bool:
        return self.warm_start or self.adaptive_rank

    def keep_for(self, step: int, previous: Pairs | None) -> int:
        most = self.rank_at(step)
        if not self.adaptive_rank or previous is None or previous.rank == 0 or previous.top <= 0:
            return most
        above = previous.count_above(self.threshold)
        wanted = previous.rank * 3 // 2 if above >= previous.rank else int(1.1 * above) + 1
        return max(min(wanted, most), min(self.min_rank, most))

    def _top(self, factor: Tensor, keep: int, generator: torch.Generator, previous: Pairs | None) -> tuple[Tensor, Tensor]:
        columns = keep + self.oversample
        if columns >= factor.shape[-1]:
            # The sketch would be as large as the matrix: the exact method is cheaper and exact.
            return _exact_top(factor, keep)
        *blocks, dim = factor.shape[:-1]  # blocks: () for one factor, (B,) for a stack
        dtype, device = factor.dtype, factor.device
        if self.warm_start and previous is not None:
            reused = previous.vectors[..., :keep].to(dtype)
            fresh = torch.randn(*blocks, dim, columns - reused.shape[-1], generator=generator, device=device, dtype=dtype)
            return self._sketched_top(factor, keep, torch.cat([reused, fresh], dim=-1), self.warm_power_iters)
        sketch = torch.randn(*blocks, dim, columns, generator=generator, device=device, dtype=dtype)
        return self._sketched_top(factor, keep, sketch, self.power_iters)

    @abstractmethod
    def _sketched_top(self, factor: Tensor, keep: int, sketch: Tensor, power_iters: int) -> tuple[Tensor, Tensor]:
        """Top eigenpairs from the ``sketch`` (d × k, k = keep + oversample) after ``power_iters`` powers."""


@dataclass(frozen=True)
class RandomizedSVD(_Randomized):
    """RS-KFAC: Halko–Martinsson–Tropp randomized SVD (Algorithm 4.4 with QR between products).

    ``Y = X Ω`` with k = r + p Gaussian columns, then q power iterations ``Q ← qr(X qr(Xᵀ Q))``,
    ``B = Qᵀ X`` (k × d) and a small SVD ``B = Ũ S Vᵀ``. For PSD X the singular values are
    the eigenvalues and the right singular vectors the eigenvectors. 2(q + 1) products of
    X with a d × k matrix; the method does not exploit symmetry, which is why it costs about
    twice :class:`SymmetricRandomizedEVD`.
    """

    def _sketched_top(self, factor: Tensor, keep: int, sketch: Tensor, power_iters: int) -> tuple[Tensor, Tensor]:
        basis = _orthonormal_basis(factor @ sketch)
        for _ in range(power_iters):
            basis = _orthonormal_basis(factor.mT @ basis)
            basis = _orthonormal_basis(factor @ basis)
        projected = basis.mT @ factor
        _, singular_values, right_t = torch.linalg.svd(projected, full_matrices=False)
        return singular_values[..., :keep], right_t[..., :keep, :].mT

    def cost(self, dim: int, step: int = 0) -> float:
        columns = self.rank_at(step) + self.oversample
        return 2.0 * 2 * (self.power_iters + 1) * dim**2 * columns


@dataclass(frozen=True)
class SymmetricRandomizedEVD(_Randomized):
    """SRE-KFAC: symmetric randomized eigendecomposition.

    ``Y = X^q Ω`` (re-orthonormalised by Householder QR after every product: O(d k²), small
    against the O(d² k) product, and without it the small modes sink below float32 resolution
    after a few powers; pivoted-LU normalisation would be 4 ms cheaper per product at d = 4096
    but divides by zero pivots when the factor has rank < k, as early factors of a small batch
    do), ``Q = qr(Y)``, ``C = Qᵀ X Q`` (k × k, symmetrized), ``C = W Λ Wᵀ``, ``U = Q W``; keep
    the top r. q + 1 products of X with a d × k matrix.
    """

    def _sketched_top(self, factor: Tensor, keep: int, sketch: Tensor, power_iters: int) -> tuple[Tensor, Tensor]:
        basis = sketch
        for _ in range(power_iters):
            basis = _orthonormal_basis(factor @ basis)
        if power_iters == 0:
            basis = _orthonormal_basis(basis)
        core = basis.mT @ (factor @ basis)
        values, core_vectors = torch.linalg.eigh((core + core.mT) / 2)
        top = core_vectors.flip(-1)[..., :keep]
        return values.flip(-1)[..., :keep], basis @ top

    def cost(self, dim: int, step: int = 0) -> float:
        columns = self.rank_at(step) + self.oversample
        return 2.0 * (self.power_iters + 1) * dim**2 * columns


@dataclass(frozen=True)
class BrandUpdate(Decomposition):
    """B-KFAC: keep only (U, D) of rank r and fold every new statistic in with Brand's update.

    For a factor whose batch statistic has fewer columns than the factor is wide (a Linear
    layer with batch N < d), the preconditioner passes the statistic's columns C (S = C Cᵀ)
    to :func:`rkfac.brand.brand_update` at every factor step: O(d (r + N)²), linear in d, and
    the d × d factor is not kept. Every other factor (convolutions, narrow layers) falls back
    to ``fallback`` on the dense factor, on the usual inverse schedule. Which path a factor
    takes is decided at its first statistic.

    Variants (both keep the dense factor of the online factors as well, to correct against):

    - B-R-KFAC: ``refresh_every=k`` overwrites (U, D) by ``fallback`` on the dense factor
      every k steps (the truncation error of the online updates only fades at rate ρ);
    - B-KFAC-c: ``reproject_every=k`` corrects ``reproject_count`` random eigenvectors by a
      Rayleigh–Ritz step on the dense factor every k steps (:func:`rkfac.brand.reproject_subset`).

    ``decompose`` on a dense factor is the fallback's.

    ``refresh_every=None``, the default, is plain B-KFAC: it needs no period and keeps no
    dense factor for its online factors. B-R-KFAC is this class given a period; no period is
    right for every model, so the caller chooses it.
    """

    rank: int = option(default_of(SymmetricRandomizedEVD, "rank"), "rank r of the online (U, D)", kind="int", low=1)
    fallback: Decomposition = option(
        SymmetricRandomizedEVD(), "the dense method for the factors that are not updated online", kind="any"
    )
    refresh_every: int | None = option(
        None, "B-R-KFAC: steps between refreshes of (U, D) from the dense factor (None: never)", kind="int", low=1
    )
    reproject_every: int | None = option(
        None, "B-KFAC-c: steps between Rayleigh–Ritz corrections (None: never)", kind="int", low=1
    )
    reproject_count: int = option(16, "B-KFAC-c: eigenvectors corrected each time", kind="int", low=1)

    def __post_init__(self) -> None:
        validate(self)
        if not isinstance(self.fallback, Decomposition) or isinstance(self.fallback, BrandUpdate):
            raise ValueError(f"fallback must be a dense rkfac Decomposition, got {self.fallback!r}")

    @property
    def keeps_factor(self) -> bool:
        """Whether online factors also keep their dense average (the B-R and B-KFAC-c variants)."""
        return self.refresh_every is not None or self.reproject_every is not None

    def rank_at(self, step: int) -> int:
        return self.rank

    def tracker(self, online_capable: bool) -> FactorTracker:
        """Online eigenpairs for the factors of layers whose statistics are low-rank (Linear), the
        fallback's dense tracker for the others."""
        from rkfac.kfac.trackers import BrandTracker

        return BrandTracker(self) if online_capable else self.fallback.tracker(False)

    def decompose(
        self, factor: Tensor, generator: torch.Generator | None = None, step: int = 0, previous: Eigenpairs | None = None
    ) -> Eigenpairs:
        return self.fallback.decompose(factor, generator, step, previous)

    def decompose_blocks(
        self, factors: Tensor, generator: torch.Generator | None = None, step: int = 0, previous: Pairs | None = None
    ) -> BlockEigenpairs:
        return self.fallback.decompose_blocks(factors, generator, step, previous)

    @property
    def uses_previous(self) -> bool:
        return self.fallback.uses_previous

    def _top(self, factor: Tensor, keep: int, generator: torch.Generator, previous: Pairs | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError  # decompose() delegates to the fallback

    def cost(self, dim: int, step: int = 0) -> float:
        return self.fallback.cost(dim, step)
