"""Numerical health of a preconditioner: finite checks and the counters they feed.

A NaN or Inf that reaches a Kronecker factor never leaves it: the exponential average
carries it into every later factor and every decomposition, and the preconditioned
gradient of that layer is NaN from then on. The preconditioner therefore checks each
batch statistic, each gradient and each decomposition before using it, skips what is not
finite, and counts what it skipped in a :class:`Health`.

The checks are one ``torch.isfinite(t).all()`` per tensor, read back together
(:func:`all_finite`), so that a step costs one host sync per device however many layers
there are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

from rkfac.decompositions import Decomposition, Pairs
from rkfac.lowrank import Eigenpairs


@dataclass
class Health:
    """Counts of the faults a preconditioner recovered from since it was created.

    - ``skipped_statistics``: factor updates of a layer skipped because its A or G batch
      statistic was not finite (the running factors kept their previous value).
    - ``skipped_gradients``: (layer, step) pairs whose gradient was not finite; that
      layer's ``.grad`` was left as the backward wrote it, not preconditioned.
    - ``float64_retries``: factor decompositions that failed (LinAlgError or a non-finite
      result) and were retried in float64.
    - ``failed_decompositions``: those that failed in float64 too; the last good
      decomposition stayed in use.
    - ``layers_without_statistics``: preconditioned layers that had received no statistics by
      a factor step on which other layers did (a layer the forward never called, or one used
      through a functional call); they keep their plain gradient until they do.
    """

    skipped_statistics: int = 0
    skipped_gradients: int = 0
    failed_decompositions: int = 0
    float64_retries: int = 0
    layers_without_statistics: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any] | None) -> Health:
        """Counts from :meth:`as_dict` output; missing counts (an older state dict) are 0."""
        saved = saved or {}
        return cls(**{f.name: int(saved.get(f.name, 0)) for f in fields(cls)})


def all_finite(tensors: Sequence[Tensor]) -> list[bool]:
    """For each tensor, whether all its entries are finite: one host sync per device.

    Checked through the tensor's minimum and maximum (NaN propagates through both, ±inf is
    one of them): one fused pass, about 30× faster on CPU than ``isfinite(t).all()``, which
    makes four passes and was 5% of an SRE-KFAC step on fashion-mlp-wide.
    """
    flags = [_finite(tensor) for tensor in tensors]
    by_device: dict[torch.device, list[int]] = {}
    for index, flag in enumerate(flags):
        by_device.setdefault(flag.device, []).append(index)
    result = [True] * len(flags)
    for indices in by_device.values():
        for index, value in zip(indices, torch.stack([flags[i] for i in indices]).tolist(), strict=True):
            result[index] = bool(value)
    return result


def _finite(tensor: Tensor) -> Tensor:
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    low, high = torch.aminmax(tensor)
    return torch.isfinite(low) & torch.isfinite(high)


def finite_pairs(pairs: Pairs) -> bool:
    """Whether a decomposition is usable: finite trace, eigenvalues and eigenvectors."""
    if not (math.isfinite(pairs.trace) and math.isfinite(pairs.top)):
        return False
    return all(all_finite([pairs.values, pairs.vectors]))


def decompose_with_retry(
    decomposition: Decomposition,
    factor: Tensor,
    generator: Callable[[], torch.Generator],
    step: int,
    previous: Pairs | None = None,
) -> tuple[Pairs | None, bool]:
    """``(pairs, retried)``: the factor's decomposition, retried once in float64 if it fails.

    A decomposition fails when it raises ``torch.linalg.LinAlgError`` (an ``eigh``, ``qr`` or
    ``svd`` that did not converge) or returns a non-finite value. float32 eigensolvers fail
    on factors with clustered or badly scaled eigenvalues that float64 resolves, so one
    retry in float64 (result cast back to the factor's dtype) recovers most failures.
    ``pairs`` is None when the retry fails too. ``generator()`` makes a fresh generator for
    each attempt, so that the retry draws the same sketch as the first attempt. ``previous``
    (the factor's last decomposition) goes to the decomposition for warm starts and adaptive
    ranks. A (B, d, d) ``factor`` is a stack of blocks, decomposed by ``decompose_blocks``.
    """
    pairs = _attempt(decomposition, factor, generator(), step, previous)
    if pairs is not None or factor.dtype == torch.float64:
        return pairs, False  # a float64 factor has nothing to retry in
    pairs = _attempt(decomposition, factor.double(), generator(), step, previous)
    if pairs is not None:
        pairs = dataclasses.replace(pairs, vectors=pairs.vectors.to(factor.dtype), values=pairs.values.to(factor.dtype))
        if not finite_pairs(pairs):  # values beyond the range of the factor's dtype
            pairs = None
    return pairs, True


def _attempt(
    decomposition: Decomposition, factor: Tensor, generator: torch.Generator, step: int, previous: Pairs | None
) -> Pairs | None:
    try:
        pairs: Pairs
        if factor.dim() == 3:
            pairs = decomposition.decompose_blocks(factor, generator, step, previous)
        elif isinstance(previous, Eigenpairs) and decomposition.uses_previous:
            pairs = decomposition.decompose(factor, generator, step, previous)
        else:  # keeps subclasses that override decompose(factor, generator, step) working
            pairs = decomposition.decompose(factor, generator, step)
    except torch.linalg.LinAlgError:
        return None
    return pairs if finite_pairs(pairs) else None


__all__ = ["Health", "all_finite", "decompose_with_retry", "finite_pairs"]
