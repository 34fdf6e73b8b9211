"""What the preconditioner sends between data-parallel ranks, over torch.distributed.

Two collectives, both counted in bytes so that runs can report them:

- on factor steps, the batch statistics of every layer are averaged across ranks with one
  all-reduce of one flat buffer: each d × d symmetric matrix packed as its d(d+1)/2 upper
  triangle, so every rank sees the statistics of the global batch;
- on inverse steps, each decomposition is computed by one rank only (see
  :mod:`rkfac.distributed.assignment`) and its low-rank pair (U, D) — d·k + k numbers, plus the trace and
  λ_max — is broadcast from there. A dense inverse would be d² numbers: at d = 4096, k = 230
  the pair is 17.8× smaller. Every rank, the owner included, then reads the pair back from
  the same buffer, so all ranks precondition with bitwise identical numbers.

SENG instead gathers its per-sample gradients (:meth:`Communicator.gather_rows`) on rebuilds.

Without an initialised process group (or with a group of size 1) every method is a local
no-op: single-process code needs no change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from rkfac.lowrank import Eigenpairs


def pack_upper(matrix: Tensor) -> Tensor:
    """The d(d+1)/2 entries of the upper triangle, row by row."""
    rows, cols = torch.triu_indices(matrix.shape[0], matrix.shape[0], device=matrix.device)
    return matrix[rows, cols]


def unpack_upper(packed: Tensor, dim: int) -> Tensor:
    """The symmetric matrix whose upper triangle is ``packed``."""
    rows, cols = torch.triu_indices(dim, dim, device=packed.device)
    matrix = packed.new_empty(dim, dim)
    matrix[rows, cols] = packed
    matrix[cols, rows] = packed
    return matrix


@dataclass
class TrafficCounter:
    """Bytes this rank put into collectives: all-reduced statistics and broadcast pairs."""

    statistics_bytes: int = 0
    decomposition_bytes: int = 0


class Communicator:
    """torch.distributed collectives for the preconditioner, or no-ops for one process."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.rank = dist.get_rank(group) if self.active else 0
        self.traffic = TrafficCounter()

    def average_symmetric(self, matrices: Sequence[Tensor]) -> list[Tensor]:
        """The mean over ranks of each symmetric matrix, in one all-reduce of packed triangles."""
        if not self.active or not matrices:
            return list(matrices)
        packed = torch.cat([pack_upper(matrix) for matrix in matrices])
        dist.all_reduce(packed, group=self.group)
        packed /= self.world_size
        self.traffic.statistics_bytes += packed.numel() * packed.element_size()
        out, start = [], 0
        for matrix in matrices:
            size = matrix.shape[0] * (matrix.shape[0] + 1) // 2
            out.append(unpack_upper(packed[start : start + size], matrix.shape[0]))
            start += size
        return out

    def average_flat(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The mean over ranks of each tensor (diagonal factors' statistics), in one all-reduce."""
        if not self.active or not tensors:
            return list(tensors)
        flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
        dist.all_reduce(flat, group=self.group)
        flat /= self.world_size
        self.traffic.statistics_bytes += flat.numel() * flat.element_size()
        return [part.view_as(tensor) for part, tensor in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` concatenated along dim 0, in rank order (equal shapes).

        SENG gathers its per-sample gradients with this on curvature rebuilds, so that every
        rank builds the same U from the global batch.
        """
        if not self.active:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        self.traffic.statistics_bytes += tensor.numel() * tensor.element_size()
        return torch.cat(parts)

    def share_eigenpairs(
        self, owned: dict[int, Eigenpairs], owners: Sequence[int], dims: Sequence[int], dtype: torch.dtype, device: torch.device
    ) -> list[Eigenpairs]:
        """Every job's pair on every rank; ``owned`` holds this rank's jobs (index → pair).

        Per source rank: one broadcast of the ranks k of its pairs, then one of all its pairs
        packed as [U (d·k), D (k), trace, λ_max] each.
        """
        if not self.active:
            return [owned[job] for job in range(len(owners))]
        shared: list[Eigenpairs | None] = [None] * len(owners)
        for source in range(self.world_size):
            jobs = [job for job, owner in enumerate(owners) if owner == source]
            if not jobs:
                continue
            mine = source == self.rank
            ranks = torch.tensor([owned[job].rank for job in jobs] if mine else [0] * len(jobs), dtype=torch.int64, device=device)
            dist.broadcast(ranks, src=self._global(source), group=self.group)
            sizes = [dims[job] * k + k + 2 for job, k in zip(jobs, ranks.tolist(), strict=True)]
            if mine:
                buffer = torch.cat([_pack_pair(owned[job], dtype, device) for job in jobs])
            else:
                buffer = torch.empty(sum(sizes), dtype=dtype, device=device)
            dist.broadcast(buffer, src=self._global(source), group=self.group)
            self.traffic.decomposition_bytes += buffer.numel() * buffer.element_size() + ranks.numel() * 8
            for job, piece in zip(jobs, buffer.split(sizes), strict=True):
                shared[job] = _unpack_pair(piece, dims[job])
        return shared  # type: ignore[return-value]

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)


def _pack_pair(pair: Eigenpairs, dtype: torch.dtype, device: torch.device) -> Tensor:
    extras = torch.tensor([pair.trace, pair.top], dtype=dtype, device=device)
    return torch.cat([pair.vectors.reshape(-1).to(dtype), pair.values.to(dtype), extras])


def _unpack_pair(piece: Tensor, dim: int) -> Eigenpairs:
    k = (piece.numel() - 2) // (dim + 1)
    vectors = piece[: dim * k].view(dim, k)
    values = piece[dim * k : dim * k + k]
    trace, top = piece[-2:].tolist()
    return Eigenpairs(vectors, values, float(trace), float(top))
