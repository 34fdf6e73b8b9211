"""The decomposition assignment against hand-worked and brute-force optima."""

from __future__ import annotations

import itertools
import random

import pytest

from rkfac.decompositions import ExactEigh, SymmetricRandomizedEVD
from rkfac.distributed.assignment import assign_longest_first, rank_loads


def test_hand_worked_example():
    # LPT order 7, 5, 4, 2, 1: 7→r0, 5→r1, 4→r1 (5 < 7), 2→r0 (7 < 9), 1→r0 (9 ≤ 9, lower rank)
    costs = [4.0, 7.0, 1.0, 5.0, 2.0]
    owners = assign_longest_first(costs, 2)
    assert owners == [1, 0, 0, 1, 0]
    assert rank_loads(costs, owners, 2) == [10.0, 9.0]


def test_one_rank_owns_everything_and_more_ranks_than_jobs_leave_some_idle():
    assert assign_longest_first([3.0, 1.0, 2.0], 1) == [0, 0, 0]
    owners = assign_longest_first([3.0, 1.0], 4)
    assert sorted(owners) == [0, 1]


def brute_force_best(costs: list[float], world_size: int) -> float:
    return min(max(rank_loads(costs, owners, world_size)) for owners in itertools.product(range(world_size), repeat=len(costs)))


@pytest.mark.parametrize("world_size", [2, 3])
def test_within_four_thirds_of_the_optimum_on_random_costs(world_size):
    rng = random.Random(0)
    for _ in range(30):
        costs = [rng.uniform(0.1, 10.0) for _ in range(rng.randint(1, 7))]
        owners = assign_longest_first(costs, world_size)
        assert max(rank_loads(costs, owners, world_size)) <= 4 / 3 * brute_force_best(costs, world_size) + 1e-9


def test_balances_k_fac_factors_by_the_method_cost():
    # fashion-cnn's factors: the exact method's d³ makes fc1's A (3137) outweigh all the others
    cnn = [10, 32, 289, 64, 3137, 512, 513, 10]
    owners = assign_longest_first([ExactEigh().cost(d) for d in cnn], 2)
    assert owners[4] == 0 and all(owner == 1 for i, owner in enumerate(owners) if i != 4)
    # fashion-mlp-wide's factors under SRE: LPT lands within 0.1% of the best split (brute force)
    mlp = [785, 2048, 2049, 2048, 2049, 10]
    costs = [SymmetricRandomizedEVD(rank=220).cost(d) for d in mlp]
    loads = rank_loads(costs, assign_longest_first(costs, 2), 2)
    assert max(loads) <= 1.001 * brute_force_best(costs, 2)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        assign_longest_first([1.0], 0)
    with pytest.raises(ValueError, match=r"cost of job 1 must be a number >= 0, got nan"):
        assign_longest_first([1.0, float("nan")], 2)
