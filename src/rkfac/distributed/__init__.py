"""Data parallelism: who decomposes what (:mod:`.assignment`), the collectives (:mod:`.communicator`,
no-ops without a process group) and K-FAC's sharded statistics and decompositions (:mod:`.sharded`)."""

from rkfac.distributed.assignment import assign_longest_first, rank_loads
from rkfac.distributed.communicator import Communicator, TrafficCounter

__all__ = ["Communicator", "TrafficCounter", "assign_longest_first", "rank_loads"]
