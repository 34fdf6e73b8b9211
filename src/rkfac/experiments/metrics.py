"""What a training run records: the time split of each step, collective traffic, health, summary.

The trainer (:mod:`rkfac.experiments.train`) runs the loop; the pieces here turn what it
measured into the records of ``metrics.jsonl`` and ``summary.json``, whose field names the
plots, the bench tables and ``benchmarks/targets.py`` read.

Time split (``metrics.jsonl``, the ``time`` of each step record, seconds, see :class:`StepClock`):

- ``data``: indexing the batch and augmenting it;
- ``forward_backward``: forward, loss and backward, minus the hooks' statistics;
- ``statistics``: the K-FAC hooks' Gram products (measured inside the hooks);
- ``decomposition``: factor averaging and eigendecompositions (``pre.step``);
- ``precondition``: the damped solve, clipping and writing ``.grad``;
- ``optimizer``: the rest of ``optimizer.step()`` (the SGD/Adam update).

Training time is the sum of these; evaluation and the ``after_backward`` callback are never
counted. On CUDA every boundary synchronises with the device so that the split is real.

Traffic (the ``bytes`` of each step record, see :class:`TrafficLedger`): the bytes this rank
put into collectives during the step: factor ``statistics`` and ``decomposition`` pairs (from
the preconditioner's counter) and the ``gradients`` DDP all-reduces (0 in a single process).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rkfac.experiments.tasks import Target
from rkfac.protocol import Preconditioner

PHASES = ("data", "forward_backward", "statistics", "decomposition", "precondition", "adaptive", "optimizer")
TRAFFIC_KINDS = ("statistics", "decomposition")  # the preconditioner's collectives


def preconditioner_of(optimizer: object) -> Preconditioner | None:
    """The preconditioner of ``rkfac.KFAC`` / ``rkfac.SENG`` (``opt.preconditioner``); None for SGD, Adam."""
    preconditioner: Preconditioner | None = getattr(optimizer, "preconditioner", None)
    return preconditioner


@dataclass
class Progress:
    """The run's counters, saved in checkpoints. ``epoch`` and ``batch`` point at the next batch.

    - ``train_time``: training seconds so far (the sum of every step's time split);
    - ``epoch_loss_sum`` / ``epoch_loss_count`` / ``epoch_time``: the current epoch's so far;
    - ``reached``: ``{target: {"time": train_time, "epoch": epoch}}`` at the first evaluation
      whose test accuracy met the target (see :meth:`note_targets`);
    - ``phase_totals``: seconds per phase of the time split, summed over the run;
    - ``traffic``: bytes through the preconditioner's collectives, summed per kind, and
      ``{kind}_steps``: the number of steps that sent any (see :class:`TrafficLedger`).
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    train_time: float = 0.0
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    epoch_time: float = 0.0
    reached: dict[str, dict[str, float]] = field(default_factory=dict)
    phase_totals: dict[str, float] = field(default_factory=dict)
    traffic: dict[str, int] = field(default_factory=dict)

    def add_step(self, loss: float, times: Mapping[str, float], elapsed: float) -> None:
        """Count one step's loss and time (the loop advances ``step`` and ``batch`` itself)."""
        self.train_time += elapsed
        self.epoch_time += elapsed
        self.epoch_loss_sum += loss
        self.epoch_loss_count += 1
        for name, seconds in times.items():
            self.phase_totals[name] = self.phase_totals.get(name, 0.0) + seconds

    @property
    def epoch_loss(self) -> float:
        """Mean training loss over the current epoch's steps so far."""
        return self.epoch_loss_sum / max(self.epoch_loss_count, 1)

    def start_epoch(self, epoch: int) -> None:
        """Point at the first batch of ``epoch`` (counted from 0) and clear the epoch's counters."""
        self.epoch, self.batch = epoch, 0
        self.epoch_loss_sum, self.epoch_loss_count, self.epoch_time = 0.0, 0, 0.0

    def note_targets(self, targets: Sequence[Target], evaluation: Mapping[str, float], epoch: float) -> None:
        """Record the training time and (fractional) epoch at which each target is first met.

        A target is timed at the first evaluation that reaches it, so finer evaluation
        (``evals_per_epoch``) gives finer times to target. ``evaluation``: the evaluation's
        values by name (``test_acc``, ``train_eval_loss``, …; see :mod:`rkfac.experiments.tasks`).
        """
        for target in targets:
            value = evaluation.get(target.metric)
            if target.key not in self.reached and value is not None and target.met(value):
                self.reached[target.key] = {"time": self.train_time, "epoch": epoch}


@dataclass
class StepClock:
    """The instants (``time.perf_counter``) that bound the phases of one training step.

    ``start`` → ``data_done``: the batch; ``data_done`` → ``backward_done``: forward, loss and
    backward; ``optimizer_start`` → ``step_done``: ``optimizer.step()``. Between
    ``backward_done`` and ``optimizer_start`` runs the trainer's ``after_backward`` callback,
    which is not training. The statistics, decomposition and precondition phases happen inside
    these spans and are measured apart by the preconditioner's :class:`rkfac.timing.PhaseTimer`.
    """

    device: torch.device
    start: float = 0.0
    data_done: float = 0.0
    backward_done: float = 0.0
    optimizer_start: float = 0.0
    step_done: float = 0.0

    def now(self, *, synchronize: bool = True) -> float:
        """The current instant, after waiting for the device's queued work (on CUDA)."""
        if synchronize and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def split(self, inside: Mapping[str, float]) -> dict[str, float]:
        """Seconds per phase of :data:`PHASES`; ``inside``: the PhaseTimer's seconds ({} without one).

        The hooks' statistics ran inside the backward and the decomposition and the solve inside
        ``optimizer.step()``, so each is taken out of the span that contains it.
        """
        statistics, decomposition, precondition, adaptive = (
            inside.get(k, 0.0) for k in ("statistics", "decomposition", "precondition", "adaptive")
        )
        return {
            "data": self.data_done - self.start,
            "forward_backward": self.backward_done - self.data_done - statistics,
            "statistics": statistics,
            "decomposition": decomposition,
            "precondition": precondition,
            "adaptive": adaptive,
            "optimizer": self.step_done - self.optimizer_start - decomposition - precondition - adaptive,
        }

    def elapsed(self) -> float:
        """Training seconds of the step: everything but the ``after_backward`` callback."""
        return (self.backward_done - self.start) + (self.step_done - self.optimizer_start)


class TrafficLedger:
    """Bytes one rank puts into collectives per step, and the run's totals.

    The preconditioner counts cumulative bytes (:class:`rkfac.distributed.TrafficCounter`);
    :meth:`begin` reads the counter before a step and :meth:`end` returns the difference per
    kind, plus the bytes of the gradients DDP all-reduces every step (``gradient_bytes``,
    given as 0 in a single process).
    """

    def __init__(self, preconditioner: Preconditioner | None, gradient_bytes: int) -> None:
        self.preconditioner = preconditioner
        self.gradient_bytes = gradient_bytes
        self._before = (0, 0)

    def _counters(self) -> tuple[int, int]:
        if self.preconditioner is None:
            return (0, 0)
        counter = self.preconditioner.traffic
        return (counter.statistics_bytes, counter.decomposition_bytes)

    def begin(self) -> None:
        """Note the counters before a step."""
        self._before = self._counters()

    def end(self, totals: dict[str, int]) -> dict[str, int]:
        """This step's bytes per collective (the ``bytes`` record); also added to ``totals``.

        ``totals`` (``Progress.traffic``) gains each kind's bytes and, under ``{kind}_steps``,
        counts the steps that sent any: factor steps for statistics, inverse steps for
        decompositions.
        """
        now = self._counters()
        step_bytes = {
            "statistics": now[0] - self._before[0],
            "decomposition": now[1] - self._before[1],
            "gradients": self.gradient_bytes,
        }
        for kind in TRAFFIC_KINDS:
            if step_bytes[kind]:
                totals[kind] = totals.get(kind, 0) + step_bytes[kind]
                totals[f"{kind}_steps"] = totals.get(f"{kind}_steps", 0) + 1
        return step_bytes


def bytes_per_step(totals: Mapping[str, int], kind: str) -> float | None:
    """Mean bytes of ``kind`` over the steps that sent any; None if none did."""
    steps = totals.get(f"{kind}_steps", 0)
    return totals[kind] / steps if steps else None


def health_record(preconditioner: Preconditioner | None) -> dict[str, int] | None:
    """The preconditioner's fault counts (skipped statistics, failed decompositions, …); None
    without one (SGD, Adam). SENG skips nothing, so its counts are all 0."""
    return None if preconditioner is None else preconditioner.health.as_dict()


def ranks_record(preconditioner: Preconditioner | None) -> dict[str, list[int]] | None:
    """Eigenpairs kept per K-FAC layer, ``{layer: [k_A, k_G]}`` (they move with --adaptive-rank);
    None without a preconditioner, empty for SENG (which keeps no decompositions)."""
    return None if preconditioner is None else {name: list(pair) for name, pair in preconditioner.ranks().items()}


def step_record(
    step: int, epoch: int, loss: float, lr: float, damping: float | None, times: dict[str, float], traffic: dict[str, int]
) -> dict[str, Any]:
    """A ``kind: "step"`` record: the global batch's ``loss``, the ``lr`` and ``damping`` (None
    without a preconditioner) in use, the time split and the bytes (see the module docstring)."""
    return {
        "kind": "step",
        "step": step,
        "epoch": epoch,
        "loss": loss,
        "lr": lr,
        "damping": damping,
        "time": times,
        "bytes": traffic,
    }


def eval_record(progress: Progress, epoch: float, evaluation: Mapping[str, float]) -> dict[str, Any]:
    """A ``kind: "eval"`` record: an evaluation inside an epoch, at fractional ``epoch``; its
    values (``test_loss`` and ``test_acc`` or ``train_eval_loss``) by name."""
    return {"kind": "eval", "epoch": epoch, "step": progress.step, **evaluation, "train_time": progress.train_time}


def epoch_record(progress: Progress, epoch: int, evaluation: Mapping[str, float], pre: Preconditioner | None) -> dict[str, Any]:
    """A ``kind: "epoch"`` record at the end of ``epoch`` (from 1): mean ``train_loss`` of its
    steps, the evaluation's values (test loss and accuracy, or training-subset loss), its
    ``epoch_time`` and the run's ``train_time`` (seconds), and the preconditioner's
    :func:`health_record` and :func:`ranks_record`."""
    return {
        "kind": "epoch",
        "epoch": epoch,
        "step": progress.step,
        "train_loss": progress.epoch_loss,
        **evaluation,
        "epoch_time": progress.epoch_time,
        "train_time": progress.train_time,
        "health": health_record(pre),
        "ranks": ranks_record(pre),
    }


def build_summary(
    progress: Progress,
    *,
    optimizer: str,
    preset: str | None,
    status: str,
    targets: Sequence[Target],
    epochs: list[dict[str, Any]],
    final: Mapping[str, float],
    steps_per_epoch: int,
    world_size: int,
    pre: Preconditioner | None,
    objective: float | None,
) -> dict[str, Any]:
    """``summary.json``: how the run ended and what it cost.

    ``status`` is "completed", "max_steps" or "diverged"; ``epochs`` is the run's epoch
    records and ``final`` the evaluation where it stopped. ``epochs`` in the summary counts
    steps in epochs (fractional after max_steps); ``seconds_per_epoch`` is training time over
    that; ``final_test_acc`` and ``best_test_acc`` (the best epoch's, the final one without
    any) are None for a task without accuracy, ``final_train_eval_loss`` None when the
    training subset was not evaluated; ``objective`` is what tuning minimises (the task's, see
    :mod:`rkfac.experiments.tasks`; None for a diverged run); ``targets`` maps each target's key to its
    ``{"time", "epoch"}`` or None if never met;
    ``phase_seconds`` is the run's time split; ``bytes_per_factor_step`` and
    ``bytes_per_inverse_step`` are the mean bytes of statistics and decompositions over the
    steps that sent any (None if none did).
    """
    final_acc = final.get("test_acc")
    accuracies = [record["test_acc"] for record in epochs if "test_acc" in record]
    epochs_run = progress.step / steps_per_epoch
    return {
        "optimizer": optimizer,
        "preset": preset,
        "status": status,
        "steps": progress.step,
        "epochs": epochs_run,
        "train_time": progress.train_time,
        "seconds_per_epoch": progress.train_time / epochs_run if epochs_run else None,
        "epoch_times": [record["epoch_time"] for record in epochs],
        "final_test_loss": final["test_loss"],
        "final_test_acc": final_acc,
        "best_test_acc": max(accuracies, default=final_acc),
        "final_train_eval_loss": final.get("train_eval_loss"),
        "objective": objective,
        "targets": {target.key: progress.reached.get(target.key) for target in targets},
        "phase_seconds": progress.phase_totals,
        "world_size": world_size,
        "health": health_record(pre),
        "bytes_per_factor_step": bytes_per_step(progress.traffic, "statistics"),
        "bytes_per_inverse_step": bytes_per_step(progress.traffic, "decomposition"),
    }
