"""One harness for the multi-process tests: ranks on CPU in one gloo process group.

:func:`run_ranks` spawns ``world_size`` processes (``torch.multiprocessing``, so the start
method is spawn and each rank imports the test module afresh), joins them into a gloo group
through a file store under the test's ``tmp_path``, and calls ``worker(rank, world_size,
*args)`` in each. What a worker returns is saved by its rank and handed back to the test, in
rank order, so that the assertions run in the test process where pytest sees them.

Each rank runs on one thread: two ranks on a small CPU machine would otherwise oversubscribe
it, and ranks that must agree bit for bit should not depend on how many cores each one got.
Before the group is destroyed all ranks meet at a barrier, so that no rank tears gloo down
while another may still talk to it. If a worker raises, ``torch.multiprocessing.spawn`` stops
the other ranks and raises in the test with the worker's traceback.

The worker must be a module-level function (the spawned processes import it by name).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, worker: Callable[..., Any], world_size: int, folder: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size)
    try:
        result = worker(rank, world_size, *args)
        torch.save(result, f"{folder}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(worker: Callable[..., Any], world_size: int, tmp_path: Path, *args: Any) -> list[Any]:
    """``[worker(rank, world_size, *args) for rank in range(world_size)]``, each rank in its own
    process of one gloo group of ``world_size``."""
    folder = Path(tempfile.mkdtemp(prefix="gloo-", dir=tmp_path))  # a fresh store for every call
    mp.spawn(_rank_main, args=(worker, world_size, str(folder), args), nprocs=world_size)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
