"""Collectives of rkfac.distributed.communicator: packing, 2-process gloo runs, the single-process path."""

from __future__ import annotations

from pathlib import Path

import torch

from rkfac.distributed.communicator import Communicator, pack_upper, unpack_upper
from rkfac.lowrank import Eigenpairs
from tests.gloo import run_ranks


def symmetric(dim: int, seed: int) -> torch.Tensor:
    x = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed))
    return x @ x.T + (x @ x.T).T  # bitwise symmetric


def pair(dim: int, k: int, seed: int) -> Eigenpairs:
    q = torch.linalg.qr(torch.randn(dim, k, generator=torch.Generator().manual_seed(seed))).Q
    values = torch.linspace(3.0, 1.0, k)
    return Eigenpairs(q, values, trace=10.0 + seed, top=3.0)


def test_pack_unpack_round_trip_halves_the_numbers():
    matrix = symmetric(7, 0)
    packed = pack_upper(matrix)
    assert packed.numel() == 7 * 8 // 2
    assert torch.equal(unpack_upper(packed, 7), matrix)


def test_without_a_process_group_everything_is_local():
    comm = Communicator()
    assert not comm.active and comm.world_size == 1 and comm.rank == 0
    matrices = [symmetric(3, 1)]
    assert comm.average_symmetric(matrices)[0] is matrices[0]
    owned = {0: pair(5, 2, 0)}
    assert comm.share_eigenpairs(owned, [0], [5], torch.float32, torch.device("cpu"))[0] is owned[0]
    assert comm.traffic.statistics_bytes == comm.traffic.decomposition_bytes == 0


def _worker(rank: int, world_size: int) -> dict:
    comm = Communicator()
    averaged = comm.average_symmetric([symmetric(4, 10 + rank), symmetric(2, 20 + rank)])
    owners = [0, 1, 1]
    dims = [6, 5, 4]
    owned = {job: pair(dims[job], 2 + job, seed=job) for job, owner in enumerate(owners) if owner == rank}
    shared = comm.share_eigenpairs(owned, owners, dims, torch.float32, torch.device("cpu"))
    return {"averaged": averaged, "shared": shared, "traffic": comm.traffic, "world": comm.world_size}


def test_two_ranks_average_statistics_and_share_pairs(tmp_path: Path):
    results = run_ranks(_worker, 2, tmp_path)
    for result in results:
        assert result["world"] == 2
        torch.testing.assert_close(result["averaged"][0], (symmetric(4, 10) + symmetric(4, 11)) / 2)
        torch.testing.assert_close(result["averaged"][1], (symmetric(2, 20) + symmetric(2, 21)) / 2)
        for job, dim in enumerate([6, 5, 4]):
            expected = pair(dim, 2 + job, seed=job)
            got = result["shared"][job]
            assert torch.equal(got.vectors, expected.vectors) and torch.equal(got.values, expected.values)
            assert (got.trace, got.top) == (expected.trace, expected.top)
        assert result["traffic"].statistics_bytes == 4 * (10 + 3)
        # three pairs of d·k + k + 2 floats, plus one int64 rank per pair
        assert result["traffic"].decomposition_bytes == 4 * ((6 * 2 + 4) + (5 * 3 + 5) + (4 * 4 + 6)) + 8 * 3


def _single_worker(rank: int, world_size: int) -> dict:
    comm = Communicator()
    matrices = [symmetric(3, 1)]
    return {"active": comm.active, "same": comm.average_symmetric(matrices)[0] is matrices[0]}


def test_a_process_group_of_size_one_is_local(tmp_path: Path):
    (result,) = run_ranks(_single_worker, 1, tmp_path)
    assert result == {"active": False, "same": True}
