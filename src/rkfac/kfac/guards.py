"""Non-finite guards of the K-FAC step: what is skipped, what is counted, what is said once.

A NaN or Inf would stay in the running factors for good, so each step checks, with one host
sync (:func:`rkfac.health.all_finite`), every captured statistic and every gradient of a
preconditioned layer:

- a layer whose S_A or S_G is not finite skips that factor update (its trackers keep their
  previous state, as if the step had not been a factor step for that layer);
- a layer whose gradient is not finite is not preconditioned: its ``.grad`` is left as the
  backward wrote it, so the caller's own divergence check sees the NaN, and it takes no part
  in the "kl" clip of the other layers;
- a decomposition that fails is retried once in float64 (:func:`rkfac.health.decompose_with_retry`);
  if that fails too, the last good decomposition stays in use.

Each case is counted in a :class:`~rkfac.health.Health`; the first one also issues a
``RuntimeWarning`` (once per preconditioner, so that a long run does not flood the log).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from enum import Enum

from torch import Tensor

from rkfac.health import Health, all_finite
from rkfac.kfac.statistics import Statistic


class Fault(Enum):
    """What was not finite in a layer at one step."""

    A_STATISTIC = "A statistic"
    G_STATISTIC = "G statistic"
    GRADIENT = "gradient"

    @staticmethod
    def bad_statistic(faults: Iterable[Fault]) -> bool:
        return any(fault is not Fault.GRADIENT for fault in faults)


Faults = dict[str, list[Fault]]  # layer name → what was not finite, in the order found


class Guard:
    """The health counts of one preconditioner and its once-only warning."""

    def __init__(self) -> None:
        self.health = Health()
        self._warned = False
        self._never_captured: set[str] = set()

    def missing_statistics(self, names: list[str], step: int) -> None:
        """Count (and say, the first time) layers with no statistics on a factor step where others had them."""
        new = [name for name in names if name not in self._never_captured]
        if not new:
            return
        first_time = not self._never_captured
        self._never_captured.update(new)
        self.health.layers_without_statistics = len(self._never_captured)
        if first_time:
            listed = ", ".join(repr(name or "<root>") for name in new)
            warnings.warn(
                f"layers {listed} are listed as preconditioned but received no statistics at factor step {step} "
                "(never called by the forward, or applied through a functional call the hooks do not see); "
                "they keep their plain gradient until they do. Counted in KFACPreconditioner.health.",
                RuntimeWarning,
                stacklevel=4,
            )

    def check(self, statistics: dict[str, tuple[Statistic, Statistic]], gradients: list[tuple[str, Tensor]], step: int) -> Faults:
        """The faults among this step's statistics and gradients, counted and (once) warned about."""
        checks: list[tuple[str, Fault, Tensor]] = []
        for name, (s_a, s_g) in statistics.items():
            checks += [(name, Fault.A_STATISTIC, s_a.value), (name, Fault.G_STATISTIC, s_g.value)]
        checks += [(name, Fault.GRADIENT, grad) for name, grad in gradients]
        faults: Faults = {}
        for (name, fault, _), finite in zip(checks, all_finite([tensor for _, _, tensor in checks]), strict=True):
            if not finite and fault not in faults.get(name, []):
                faults.setdefault(name, []).append(fault)
        for found in faults.values():
            self.health.skipped_statistics += int(Fault.bad_statistic(found))
            self.health.skipped_gradients += int(Fault.GRADIENT in found)
        if faults:
            name, found = next(iter(faults.items()))
            others = f" (and in {len(faults) - 1} more layers)" if len(faults) > 1 else ""
            consequences = ["its factor update is skipped"] if Fault.bad_statistic(found) else []
            consequences += ["its gradient is left unpreconditioned"] if Fault.GRADIENT in found else []
            what = " and ".join(fault.value for fault in found)
            self.warn_once(f"non-finite {what} in layer {name!r} at step {step}{others}: {', '.join(consequences)}")
        return faults

    def skipped_measurement(self, layer: str, step: int) -> None:
        """Count (and say, the first time) a direction rule's own statistic that was not finite."""
        self.health.skipped_statistics += 1
        self.warn_once(
            f"non-finite measured statistic of the direction rule in layer {layer!r} at step {step}: "
            "its scales keep their last values"
        )

    def decomposition(self, retried: bool, failed: bool, layer: str, factor: str, step: int, had_pairs: bool) -> None:
        """Count one decomposition's retry and failure (and say the first failure)."""
        self.health.float64_retries += int(retried)
        if failed:
            self.health.failed_decompositions += 1
            kept = "the last good one stays in use" if had_pairs else "the layer keeps its plain gradient"
            self.warn_once(f"decomposition of factor {factor} of layer {layer!r} failed at step {step}: {kept}")

    def warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{message}. Later faults are only counted, in KFACPreconditioner.health.", RuntimeWarning, stacklevel=5
            )
