"""K-FAC over data-parallel ranks: global-batch statistics, decompositions split by owner.

On factor steps the batch statistics of every layer are averaged across ranks, so every rank
holds the global-batch factors: dense statistics S in one all-reduce of packed triangles,
B-KFAC's column statistics C by gathering every rank's columns (the mean of C_r C_rᵀ over the w
ranks is [C_1 … C_w][C_1 … C_w]ᵀ / w). On inverse steps the decompositions are split across
ranks by :func:`~rkfac.distributed.assignment.assign_longest_first` over the decomposition's
cost model; each owner decomposes (sketch keyed by seed, layer, factor and step, as in one
process) and broadcasts the low-rank pair, d·k + k numbers. Every rank then preconditions every
layer with the same numbers, so parameters stay identical. Without a process group (or with
one of size 1) both functions do the local work only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rkfac.decompositions import Pairs
from rkfac.distributed.assignment import assign_longest_first
from rkfac.distributed.communicator import Communicator
from rkfac.kfac.statistics import Statistic
from rkfac.kfac.trackers import FactorTracker
from rkfac.lowrank import BlockEigenpairs, Eigenpairs


def refuse_block_layers(comm: Communicator, names: list[str]) -> None:
    """Refuse a process group for layers of several blocks (grouped convolutions, named), whose
    (B, d, d) statistics and block eigenpairs are not averaged and shared across ranks yet."""
    if names and comm.active:
        raise ValueError(
            f"layers {names} are grouped convolutions, whose block factors rkfac does not yet share across "
            f"ranks; with a process group of {comm.world_size} ranks pass them in skip= (they then take "
            "the plain gradient step)"
        )


def average_statistics(
    comm: Communicator, statistics: dict[str, tuple[Statistic, Statistic]]
) -> dict[str, tuple[Statistic, Statistic]]:
    """Every statistic averaged over the ranks (see the module docstring); local without a group."""
    if not comm.active:
        return statistics
    dense = [(name, i) for name, pair in statistics.items() for i, s in enumerate(pair) if not (s.columns or s.diagonal)]
    diagonal = [(name, i) for name, pair in statistics.items() for i, s in enumerate(pair) if s.diagonal]
    averaged = iter(comm.average_symmetric([statistics[name][i].value for name, i in dense]))
    averaged_diagonals = iter(comm.average_flat([statistics[name][i].value for name, i in diagonal]))
    updated = {name: list(pair) for name, pair in statistics.items()}
    for name, i in dense:
        updated[name][i] = Statistic(next(averaged))
    for name, i in diagonal:
        updated[name][i] = Statistic(next(averaged_diagonals))
    for pair in updated.values():
        for i, statistic in enumerate(pair):
            if statistic.columns:
                pair[i] = Statistic(comm.gather_rows(statistic.value.T).T / comm.world_size**0.5, columns=True)
    return {name: (pair[0], pair[1]) for name, pair in updated.items()}


def decompose_across_ranks(
    comm: Communicator, trackers: Sequence[FactorTracker], step: int, decompose: Callable[[int], Pairs | None]
) -> list[Pairs | None]:
    """The new pairs of each tracker (None: keep what it has), ``decompose(job)`` run by the owner only.

    An owner whose decomposition failed sends the tracker's last good pair, or an empty one
    (which every rank reads back as None). Block factors (grouped convolutions) are not shared:
    the preconditioner refuses a process group for models that have them.
    """
    if not trackers:
        return []
    dims = [tracker.factor.shape[0] for tracker in trackers]  # type: ignore[union-attr]
    if not comm.active:
        return [decompose(job) for job in range(len(trackers))]
    owners = assign_longest_first([t.method.cost(dim, step) for t, dim in zip(trackers, dims, strict=True)], comm.world_size)
    owned: dict[int, Eigenpairs] = {}
    for job, tracker in enumerate(trackers):
        if owners[job] == comm.rank:
            pairs, last = decompose(job), tracker.eigenpairs
            if isinstance(pairs, BlockEigenpairs) or isinstance(last, BlockEigenpairs):
                raise TypeError("block eigenpairs (grouped convolutions) are not shared across ranks")
            owned[job] = pairs if pairs is not None else last or _empty_pairs(tracker)
    factor = trackers[0].factor
    assert factor is not None  # due() holds only for trackers with a dense factor
    shared = comm.share_eigenpairs(owned, owners, dims, factor.dtype, factor.device)
    return [pairs if pairs.rank > 0 else None for pairs in shared]


def _empty_pairs(tracker: FactorTracker) -> Eigenpairs:
    """No eigenpairs: what an owner shares when a decomposition failed and none was good yet."""
    factor = tracker.factor
    assert factor is not None
    nan = float("nan")
    return Eigenpairs(factor.new_zeros(factor.shape[0], 0), factor.new_zeros(0), nan, nan)
