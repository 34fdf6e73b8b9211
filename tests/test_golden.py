"""The golden trajectories of :mod:`golden` still come out the same: the renovation's "same numbers".

Bitwise on the machine kind they were recorded on; to a relative 1e-4 (losses, parameter
norms) on another CPU capability, torch version or thread count, where BLAS may sum in a
different order (the test says which check ran).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests import golden

RECORDED = golden.load()
SAME_MACHINE = RECORDED["fingerprint"] == golden.fingerprint()


def test_every_case_has_a_record() -> None:
    assert set(RECORDED["cases"]) == set(golden.CASES)


@pytest.mark.parametrize("name", list(golden.CASES))
def test_trajectory_matches_the_record(name: str) -> None:
    expected = RECORDED["cases"][name]
    actual = golden.run(name)
    assert set(actual) == set(expected), f"{name}: recorded {sorted(expected)}, now {sorted(actual)}"
    if SAME_MACHINE:
        mismatched = [i for i, (a, e) in enumerate(zip(actual["losses"], expected["losses"], strict=True)) if a != e]
        if mismatched:
            first = mismatched[0]
            pytest.fail(f"{name}: losses differ from step {first}: {actual['losses'][first]} vs {expected['losses'][first]}")
        for key in expected:
            assert actual[key] == expected[key], f"{name}: {key} differs bitwise"
        return
    warnings.warn(f"golden {name}: another machine kind than the recording's, checked to rtol 1e-4 only", stacklevel=1)
    torch.testing.assert_close(torch.tensor(actual["losses"]), torch.tensor(expected["losses"]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(actual["norms"]), torch.tensor(expected["norms"]), rtol=1e-4, atol=1e-6)
