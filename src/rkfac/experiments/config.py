"""One schema for a training run, shared by the CLI, the presets and the run directory.

A value that the paper schedules by epoch (lr, damping, rank, factor_every, inverse_every) is
either a number or an epoch schedule ``{first_epoch: value, ...}`` (epochs counted from 1,
each value holding from its epoch until the next key), written on the command line as
``1:0.3,2:0.2,3:0.1``. Settings resolve in this order, later ones winning: the defaults here,
the preset's common settings, the preset's settings for the chosen optimizer, the flags given
on the command line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from rkfac.clipping import CLIP_MODES
from rkfac.damping import DAMPING_MODES
from rkfac.experiments.datasets import DATASETS
from rkfac.experiments.models import MODELS
from rkfac.options import FISHER_TYPES
from rkfac.schedules import check_choice, check_float, check_int

APPLY_DTYPES = ("float32", "bfloat16")

EpochSchedule: TypeAlias = float | dict[int, float]

OPTIMIZERS = ("sgd", "adam", "kfac", "rs-kfac", "sre-kfac", "b-kfac", "b-r-kfac", "seng")
KFAC_OPTIMIZERS = ("kfac", "rs-kfac", "sre-kfac", "b-kfac", "b-r-kfac")
PRECONDITIONED = (*KFAC_OPTIMIZERS, "seng")  # optimizers with a preconditioner (and a phase timer)
SCHEDULED = ("lr", "damping", "rank", "factor_every", "inverse_every")


@dataclass
class RunConfig:
    """Every setting of one run; ``config.json`` in the run directory is this, resolved."""

    optimizer: str = "sre-kfac"
    model: str = "mlp"
    widths: list[int] | None = None
    width_scale: float = 1.0
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    synthetic_train: int = 512
    synthetic_test: int = 256
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 256
    lr: EpochSchedule = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    weight_decay_start: int = 0
    damping: EpochSchedule = 0.1
    damping_mode: str = "relative"
    rank: EpochSchedule = 220
    oversample: int = 10
    power_iters: int = 4
    warm_start: bool = False
    warm_power_iters: int = 1
    adaptive_rank: bool = False
    min_rank: int = 32
    refresh_every: int = 50
    factor_decay: float = 0.95
    factor_every: EpochSchedule = 10
    inverse_every: EpochSchedule = 50
    clip: str | None = "rms"
    clip_value: float = 0.07
    fisher: str = "empirical"
    update_freq: int = 200
    col_sample_size: int = 128
    sketch_threshold: float = 7e5
    sketch_rank: int = 16
    apply_dtype: str = "float32"
    skip: list[str] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"
    target_acc: list[float] = field(default_factory=list)
    evals_per_epoch: int = 1
    checkpoint_every: int = 1
    preset: str | None = None

    def validate(self) -> RunConfig:
        """Raise ValueError naming the first bad value; return self."""
        check_choice(self.optimizer, "optimizer", OPTIMIZERS)
        check_choice(self.model, "model", MODELS)
        check_choice(self.dataset, "dataset", DATASETS)
        check_choice(self.damping_mode, "damping_mode", DAMPING_MODES)
        check_choice(self.clip, "clip", CLIP_MODES)
        check_choice(self.fisher, "fisher", FISHER_TYPES)
        check_float(self.width_scale, "width_scale", low=0.0, low_inclusive=False)
        check_int(self.epochs, "epochs", low=1)
        check_int(self.batch_size, "batch_size", low=1)
        if self.max_steps is not None:
            check_int(self.max_steps, "max_steps", low=1)
        check_int(self.checkpoint_every, "checkpoint_every", low=0)
        check_int(self.evals_per_epoch, "evals_per_epoch", low=1)
        check_int(self.warm_power_iters, "warm_power_iters", low=0)
        check_int(self.min_rank, "min_rank", low=1)
        check_int(self.refresh_every, "refresh_every", low=1)
        check_int(self.update_freq, "update_freq", low=1)
        check_int(self.col_sample_size, "col_sample_size", low=1)
        check_float(self.sketch_threshold, "sketch_threshold", low=0.0)
        check_int(self.sketch_rank, "sketch_rank", low=1)
        check_choice(self.device, "device", ("auto", "cpu", "cuda"))
        check_choice(self.apply_dtype, "apply_dtype", APPLY_DTYPES)
        for target in self.target_acc:
            check_float(target, "target_acc", low=0.0, high=1.0)
        for name in SCHEDULED:
            value = getattr(self, name)
            for epoch, item in value.items() if isinstance(value, dict) else [(1, value)]:
                check_int(epoch, f"{name} schedule epoch", low=1)
                check_float(item, name, low=0.0)
        return self

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        values = dict(data)
        for name in SCHEDULED:
            if isinstance(values.get(name), dict):  # JSON keys are strings
                values[name] = {int(epoch): value for epoch, value in values[name].items()}
        return cls(**values)

    def updated(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def value_at_epoch(schedule: EpochSchedule, epoch: int) -> float:
    """The value of an epoch schedule in (1-based) ``epoch``."""
    if not isinstance(schedule, dict):
        return schedule
    current = None
    for first in sorted(schedule):
        if first <= epoch:
            current = schedule[first]
    if current is None:
        raise ValueError(f"schedule {schedule} has no value for epoch {epoch}: its first key must be 1")
    return current


def step_schedule(schedule: EpochSchedule, steps_per_epoch: int, cast: Callable[[float], Any] = float) -> Any:
    """A number, or a callable of the (0-based) optimizer step for an epoch schedule."""
    if not isinstance(schedule, dict):
        return cast(schedule)
    return lambda step: cast(value_at_epoch(schedule, step // steps_per_epoch + 1))


def parse_schedule(text: str) -> EpochSchedule:
    """``"0.1"`` → 0.1; ``"1:0.3,2:0.2"`` → {1: 0.3, 2: 0.2}; a clear error otherwise."""
    try:
        if ":" not in text:
            return float(text)
        pairs = [item.split(":") for item in text.split(",")]
        return {int(epoch): float(value) for epoch, value in pairs}
    except ValueError:
        raise ValueError(f"bad schedule {text!r}: give a number or epoch:value pairs like 1:0.3,13:0.03") from None
