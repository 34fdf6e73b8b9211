"""One schema for options: dataclass fields that carry their help, bounds and choices.

Every option of the library is a field of a frozen dataclass (:mod:`rkfac.options`, the
decompositions), declared with :func:`option`. The field's metadata is the single place where
its default, its help text and its valid values live; :func:`validate` checks an instance
against it (raising ``ValueError`` that names the value), and the experiment code generates
its run configuration and command-line flags from the same fields, so that a default is never
written twice.

A field with ``schedule=True`` accepts a number or a callable of the step (see
:mod:`rkfac.schedules`): a number is checked when the options are made, a callable each time
it is evaluated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from rkfac.schedules import check_choice, check_float, check_int, float_schedule, int_schedule


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    kind: str = "float",
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    choices: Sequence[object] | None = None,
    schedule: bool = False,
    optional: bool = False,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field whose metadata says how to check it and how to describe it.

    ``kind`` is "float", "int", "bool", "choice" (one of ``choices``) or "any" (checked by the
    owning class itself). ``optional``: None is a value too (it always is when the default is None).
    """
    metadata = {
        "help": help,
        "kind": "choice" if choices is not None else kind,
        "bounds": {"low": low, "high": high, "low_inclusive": low_inclusive, "high_inclusive": high_inclusive},
        "choices": None if choices is None else tuple(choices),
        "schedule": schedule,
        "optional": optional or default is None,
    }
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_field(field: dataclasses.Field[Any], value: Any) -> Any:
    """``value`` checked against ``field``'s metadata; numbers come back as float or int."""
    meta = field.metadata
    kind, name = meta.get("kind", "any"), field.name
    bounds = meta.get("bounds", {})
    if kind == "choice":
        return check_choice(value, name, meta["choices"])
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        return value
    if kind == "int":
        if meta["schedule"]:
            return int_schedule(value, name, low=int(bounds["low"]))
        if value is None and meta.get("optional", field.default is None):
            return None
        return check_int(value, name, low=None if bounds["low"] is None else int(bounds["low"]))
    if kind == "float":
        if meta["schedule"]:
            return float_schedule(value, name, **bounds)
        return check_float(value, name, **bounds)
    return value


def validate(instance: Any) -> None:
    """Check every field of a (frozen) dataclass instance and store the checked values."""
    for field in dataclasses.fields(instance):
        object.__setattr__(instance, field.name, check_field(field, getattr(instance, field.name)))


def options_from(cls: type[Any], options: Any, given: dict[str, Any], owner: str) -> Any:
    """A constructor's options: the ready ``options`` object, or ``cls(**given)`` from its keywords."""
    if options is not None and given:
        raise ValueError(f"pass options= or keyword options, not both (got options= and {sorted(given)})")
    if options is not None and not isinstance(options, cls):
        raise ValueError(f"options must be a {cls.__name__}, got {options!r}")
    return options if options is not None else from_options(cls, given, owner)


def check_instance(value: Any, kind: type[Any], name: str) -> Any:
    """``value`` if it is None or a ``kind``, else a ValueError naming it."""
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"{name} must be a {kind.__module__}.{kind.__qualname__}, got {value!r}")
    return value


def from_options(cls: type[Any], given: dict[str, Any], owner: str) -> Any:
    """``cls(**given)``, with unknown names refused by a ValueError that lists the known ones."""
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"{owner} got unknown option(s) {unknown}; its options are {sorted(known)}")
    return cls(**given)


def default_of(cls: type[Any], name: str) -> Any:
    """The default of option ``name`` of the dataclass ``cls``, for code that must name it
    without writing it again (a preset, another class's default)."""
    for field in dataclasses.fields(cls):
        if field.name == name:
            if field.default_factory is not dataclasses.MISSING:
                return field.default_factory()
            return field.default
    raise ValueError(f"{cls.__name__} has no option {name!r}")
