"""Hyperparameters given as a number or as a callable of the step, validated with clear errors.

A fixed value is checked when it is given (in the constructor), a callable each time it is
evaluated, so a bad schedule fails on the step that produced the bad value, naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

FloatSchedule: TypeAlias = float | Callable[[int], float]
IntSchedule: TypeAlias = int | Callable[[int], int]


def check_float(
    value: object,
    name: str,
    *,
    low: float | None = None,
    low_inclusive: bool = True,
    high: float | None = None,
    high_inclusive: bool = True,
) -> float:
    """Return ``value`` as a float if it is a real number within the bounds, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if number != number:
        raise ValueError(f"{name} must not be NaN, got {value!r}")
    if low is not None and (number < low or (number == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value!r}")
    if high is not None and (number > high or (number == high and not high_inclusive)):
        raise ValueError(f"{name} must be {'<=' if high_inclusive else '<'} {high}, got {value!r}")
    return number


def check_int(value: object, name: str, *, low: int | None) -> int:
    """Return ``value`` if it is an integer ≥ ``low`` (any integer when ``low`` is None), else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return value


def check_choice(value: object, name: str, choices: tuple[object, ...]) -> object:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def float_schedule(value: FloatSchedule, name: str, **bounds: float | bool | None) -> FloatSchedule:
    """Validate a fixed value now; a callable is validated by :func:`at_step_float`."""
    if callable(value):
        return value
    return check_float(value, name, **bounds)  # type: ignore[arg-type]


def int_schedule(value: IntSchedule, name: str, *, low: int) -> IntSchedule:
    if callable(value):
        return value
    return check_int(value, name, low=low)


def at_step_float(value: FloatSchedule, step: int, name: str, **bounds: float | bool | None) -> float:
    """The value of a float schedule at ``step``, validated."""
    raw = value(step) if callable(value) else value
    return check_float(raw, f"{name} (at step {step})" if callable(value) else name, **bounds)  # type: ignore[arg-type]


def at_step_int(value: IntSchedule, step: int, name: str, *, low: int) -> int:
    raw = value(step) if callable(value) else value
    return check_int(raw, f"{name} (at step {step})" if callable(value) else name, low=low)
