"""Which rank decomposes which factor: greedy longest-job-first over a cost model.

Decompositions are independent jobs of very different sizes (a 3137-wide A next to a 10-wide
G). Sorting them by cost, largest first, and giving each to the rank with the least work so
far (ties to the lowest rank) is Graham's LPT rule: the busiest rank ends within 4/3 of the
optimum, and in practice within one small job of it. The function is pure and
deterministic, so every rank computes the same assignment without communicating.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def assign_longest_first(costs: Sequence[float], world_size: int) -> list[int]:
    """The owning rank of each job, ``owners[i]`` for ``costs[i]``.

    Jobs of equal cost keep their input order, so the result does not depend on sort
    stability across processes.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    for index, cost in enumerate(costs):
        if not cost >= 0:
            raise ValueError(f"cost of job {index} must be a number >= 0, got {cost!r}")
    owners = [0] * len(costs)
    loads = [(0.0, rank) for rank in range(world_size)]  # a heap of (work so far, rank)
    for job in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[job] = rank
        heapq.heappush(loads, (load + costs[job], rank))
    return owners


def rank_loads(costs: Sequence[float], owners: Sequence[int], world_size: int) -> list[float]:
    """Total cost per rank under an assignment."""
    loads = [0.0] * world_size
    for cost, owner in zip(costs, owners, strict=True):
        loads[owner] += cost
    return loads
